"""LoRA files and the adapter stack on a shared pipeline.

Reads the old diffusers attention-processor format (the published wrong LoRA), diffusers/PEFT and kohya, all
converted by diffusers' own utilities; text-encoder keys are matched to the installed transformers' module names
(with or without the `text_model` level). The UNet part loads through diffusers, the text encoders through peft
(`adapters`). Before applying, the file's architecture fingerprint (cross-attention width,
text-encoder prefixes) is checked against the pipe, and keys that map onto no module are reported.
Reading and writing the files themselves is `lora_files`.
"""
from __future__ import annotations

import json
import logging
import threading
from pathlib import Path
from typing import Optional

from .errors import TuneLabError
from .files import check_safetensors, sha256_file
from . import adapters, lora_files
from .lora_files import cross_attention_width, encoder_prefixes, read_file, save  # noqa: F401 (re-exported)
from .models import LoraRef, PipeHandle, describe_width, outside_inference_mode

log = logging.getLogger("tunelab")

MAX_UNMAPPED_FRACTION = 0.05  # refuse when more than 5% of a file's modules are missing from the model
_LOCK = threading.RLock()


# ---------------------------------------------------------------------------------------------------------------
# activation


def loaded_adapters(pipe) -> set[str]:
    try:
        lists = pipe.get_list_adapters()
    except (AttributeError, ValueError):
        return set()
    return {name for names in lists.values() for name in names}


def activate(handle) -> None:
    """Make the shared pipe run with exactly `handle.loras` and nothing else (called before encode and sample)."""
    pipe = handle.pipe
    if not loaded_adapters(pipe):
        return
    if not handle.loras:
        pipe.disable_lora()
        return
    weights: dict[str, float] = {}
    for ref in handle.loras:  # the same file stacked twice adds up
        weights[ref.adapter] = weights.get(ref.adapter, 0.0) + float(ref.weight)
    pipe.enable_lora()
    pipe.set_adapters(list(weights), list(weights.values()))


# ---------------------------------------------------------------------------------------------------------------
# reading and checking


def check_architecture(handle: PipeHandle, state_dict: dict, name: str) -> None:
    """Refuse a LoRA made for another base model, naming both architectures, before anything is applied."""
    width = cross_attention_width(state_dict)
    if width is not None and width != handle.cross_attention_dim:
        raise TuneLabError(f"'{name}' was made for {describe_width(width)}, but the pipe is "
                           f"{handle.architecture}; load a LoRA trained for this model", input_name="lora")
    encoders = encoder_prefixes(state_dict)
    for enc in encoders:
        if getattr(handle.pipe, enc, None) is None:
            kind = "SDXL (two text encoders)" if enc == "text_encoder_2" else "a model with a first text encoder"
            raise TuneLabError(f"'{name}' has {enc} weights, so it was made for {kind}, but the pipe is "
                               f"{handle.architecture}", input_name="lora")


def _split_dora_scales(state_dict: dict) -> tuple[dict, dict]:
    """(the state dict without kohya/LyCORIS `.dora_scale` keys, {kohya module: magnitude as [out]}). diffusers
    drops those keys for SD/SDXL ("not compatible in Diffusers"), so they are put back on the PEFT side."""
    scales = {k[: -len(".dora_scale")]: v.reshape(-1) for k, v in state_dict.items() if k.endswith(".dora_scale")}
    if not scales:
        return state_dict, {}
    return {k: v for k, v in state_dict.items() if not k.endswith(".dora_scale")}, scales


def _dora_for(comp: str, weights: dict, scales: dict) -> dict:
    """{PEFT module: magnitude} for the modules of `comp` whose kohya name has a dora_scale."""
    heads = {"unet": ("lora_unet_",), "transformer": ("lora_unet_",), "text_encoder": ("lora_te1_", "lora_te_"),
             "text_encoder_2": ("lora_te2_",)}.get(comp, ())
    found = {}
    for key in weights:
        if not key.endswith(".lora_A.weight"):
            continue
        module = key[: -len(".lora_A.weight")]
        named = module if comp in ("unet", "transformer") else \
            next(iter(lora_files.with_text_model_level({module: None})))
        for head in heads:
            scale = scales.get(head + named.replace(".", "_"))
            if scale is not None:
                found[module] = scale
                break
    return found


def _to_peft(handle: PipeHandle, state_dict: dict) -> tuple[dict[str, tuple[dict, dict]], dict, dict]:
    """diffusers' reading of a LoRA file, split per component ('unet', 'text_encoder', 'text_encoder_2').

    Returns ({component: (weights in PEFT keys, {module: alpha})}, diffusers' state dict, diffusers' network
    alphas). Text-encoder keys are matched to the installed model's module names (with or without the `text_model`
    level). The key conversion is diffusers' own (`lora_state_dict`, then `state_dict_utils`); the converters map
    keys only, so they run on the keys and the weights follow."""
    from diffusers.utils.state_dict_utils import (convert_state_dict_to_diffusers, convert_state_dict_to_peft,
                                                  convert_unet_state_dict_to_peft)

    pipe = handle.pipe
    state_dict, dora_scales = _split_dora_scales(state_dict)
    try:
        out = pipe.lora_state_dict(dict(state_dict), unet_config=pipe.unet.config)
    except Exception as e:
        raise TuneLabError(f"not a LoRA file diffusers can read: {e}", input_name="lora") from e
    converted, network_alphas = (out[0], out[1]) if isinstance(out, tuple) else (out, None)
    network_alphas = dict(network_alphas or {})
    parts: dict[str, dict] = {}
    for key in converted:
        comp, _, rest = key.partition(".")
        parts.setdefault(comp, {})[rest] = key
    result = {}
    for comp, keys in parts.items():
        try:  # {PEFT key: the diffusers key it came from}
            origin = (convert_unet_state_dict_to_peft(keys) if comp in ("unet", "transformer")
                      else convert_state_dict_to_peft(convert_state_dict_to_diffusers(keys)))
        except ValueError as e:  # diffusers: "Could not automatically infer state dict type"
            raise TuneLabError(f"no LoRA weights TuneLab recognises for the {comp} ({e})", input_name="lora") from e
        model = getattr(pipe, comp, None)
        if comp.startswith("text_encoder") and model is not None:
            origin = lora_files.match_text_model_level(origin, model)
        weights = {k: converted[src] for k, src in origin.items()}
        if dora_scales:
            for module, scale in _dora_for(comp, weights, dora_scales).items():
                weights[f"{module}.lora_magnitude_vector"] = scale
                if comp in ("unet", "transformer"):
                    converted[f"{comp}.{module}.lora_magnitude_vector"] = scale
        alphas = {k.split(".lora_A.")[0]: float(network_alphas[f"{src}.alpha"]) for k, src in origin.items()
                  if ".lora_A." in k and f"{src}.alpha" in network_alphas}
        result[comp] = (weights, alphas)
    return result, converted, network_alphas


def unmapped_modules(handle: PipeHandle, state_dict: dict) -> tuple[int, list[str]]:
    """(number of LoRA'd modules, those that exist nowhere in the pipe)."""
    modules, missing = set(), []
    for comp, (sd, _) in _to_peft(handle, state_dict)[0].items():
        model = getattr(handle.pipe, comp, None)
        names = {n for n, _ in model.named_modules()} if model is not None else set()
        for key in sd:
            if ".lora_" not in key:
                continue
            mod = f"{comp}.{key.split('.lora_')[0]}"
            if mod in modules:
                continue
            modules.add(mod)
            if mod.split(".", 1)[1] not in names:
                missing.append(mod)
    return len(modules), sorted(missing)


def mismatched_shape(handle: PipeHandle, parts: dict) -> Optional[str]:
    """The first LoRA weight whose shape does not fit the module it patches, described in one line, or None.

    `parts`: {component: weights in PEFT keys} (what `_to_peft` gives). lora_A must take the module's input width
    (Linear in_features, Conv2d in_channels), lora_B give its output width, and both share one rank. diffusers
    would otherwise refuse the file with its whole state dict in the message."""
    for comp, sd in parts.items():
        model = getattr(handle.pipe, comp, None)
        if model is None:
            continue
        modules = dict(model.named_modules())
        ranks: dict = {}
        for key in sorted(sd):
            mod_name, sep, rest = key.partition(".lora_")
            weight = getattr(modules.get(mod_name), "weight", None)
            tensor = sd[key]
            if not sep or weight is None or getattr(tensor, "ndim", 0) < 2 or weight.ndim < 2:
                continue
            side, axis = ("A", 1) if rest.startswith("A") else ("B", 0)
            if tensor.shape[axis] != weight.shape[axis]:
                what = "inputs" if side == "A" else "outputs"
                return (f"{comp}.{key} has shape {tuple(tensor.shape)}, but {comp}.{mod_name} has "
                        f"{weight.shape[axis]} {what} (weight {tuple(weight.shape)})")
            rank = tensor.shape[0] if side == "A" else tensor.shape[1]
            if ranks.setdefault(mod_name, (rank, key))[0] != rank:
                return (f"{comp}.{key} has rank {rank}, but {comp}.{ranks[mod_name][1]} has rank "
                        f"{ranks[mod_name][0]}")
    return None


# ---------------------------------------------------------------------------------------------------------------
# applying


@outside_inference_mode
def load(handle: PipeHandle, path, strength: float = 1.0, name: Optional[str] = None) -> PipeHandle:
    """A new handle with the LoRA on its stack. The incoming handle is never changed; the weights are loaded into
    the shared pipe once per file (as a disabled-by-default adapter), so branches share one copy."""
    from .checks import check_number

    check_number(strength, "strength", -100.0, 100.0)
    path = Path(path)
    name = name or path.name
    state_dict, metadata = read_file(path)
    if not state_dict:
        raise TuneLabError(f"'{name}' holds no tensors", input_name="lora")
    check_architecture(handle, state_dict, name)
    total, missing = unmapped_modules(handle, state_dict)
    if total == 0:
        raise TuneLabError(f"'{name}' has no LoRA weights TuneLab recognises (expected kohya lora_up/lora_down, "
                           "diffusers lora.up/lora.down or PEFT lora_A/lora_B keys)", input_name="lora")
    if missing:
        msg = f"'{name}': {len(missing)} of {total} LoRA modules do not exist in the model: {', '.join(missing[:5])}"
        if len(missing) > MAX_UNMAPPED_FRACTION * total:
            raise TuneLabError(msg + "; it was probably made for another model", input_name="lora")
        log.warning("TuneLab: %s (ignored)", msg)
    bad = mismatched_shape(handle, {comp: weights for comp, (weights, _) in _to_peft(handle, state_dict)[0].items()})
    if bad:
        raise TuneLabError(f"'{name}' does not fit this model: {bad}; it was made for another model (or another "
                           f"size of it). Load a LoRA trained for {handle.architecture}", input_name="lora")
    embeddings = read_embeddings(handle, path, metadata)  # checked before anything is applied
    sha = sha256_file(path)
    adapter = f"tl_{sha[:16]}"
    with _LOCK:
        if adapter not in loaded_adapters(handle.pipe):
            _apply(handle, state_dict, adapter, name, metadata)
            # loading activates the new adapter; nothing runs until activate() picks a handle's stack
            handle.pipe.disable_lora()
        tokens = apply_embeddings(handle, embeddings) if embeddings else ()
    ref = LoraRef(adapter=adapter, weight=float(strength), name=name, sha256=sha, embeddings=tokens)
    return handle.with_lora(ref)


def _apply(handle: PipeHandle, state_dict: dict, adapter: str, name: str, metadata: Optional[dict] = None) -> None:
    """Load the file's weights into the shared pipe as adapter `adapter`: the UNet part with diffusers'
    `load_lora_into_unet` (what `load_lora_weights` does), each text-encoder part with peft itself (`adapters`),
    since diffusers' text-encoder path goes through transformers' PEFT integration and its version gate. All or
    nothing."""
    from diffusers.utils import logging as diffusers_logging

    pipe = handle.pipe
    parts, converted, network_alphas = _to_peft(handle, state_dict)
    unet_prefix = getattr(pipe, "unet_name", "unet")
    # diffusers warns "No LoRA keys associated to ..." for components a file leaves out; unmapped keys were
    # already checked
    verbosity = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()
    try:
        unet_sd = {k: v for k, v in converted.items() if k.startswith(f"{unet_prefix}.")}
        if unet_sd:
            with adapters.peft_notes_quiet():
                type(pipe).load_lora_into_unet(unet_sd, network_alphas=network_alphas or None, unet=pipe.unet,
                                               adapter_name=adapter, _pipeline=pipe)
        for comp in ("text_encoder", "text_encoder_2"):
            model = getattr(pipe, comp, None)
            if comp not in parts or model is None:
                continue
            weights, alphas = parts[comp]
            config = adapters.lora_config(weights, alphas, init_lora_weights=False, inference_mode=True)
            adapters.add(model, config, adapter, weights)
        if (metadata or {}).get("tunelab_dora_scale") == adapters.DORA_SCALE_BASE_NORM:  # see core.adapters
            for comp in ("unet", "text_encoder", "text_encoder_2"):
                if getattr(pipe, comp, None) is not None:
                    adapters.dora_from_base_norm(getattr(pipe, comp), adapter)
    except Exception as e:  # one line: diffusers' messages can hold the whole state dict
        remove(handle.pipe, adapter)
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise TuneLabError(f"could not apply '{name}': {first[:300]}", input_name="lora") from e
    finally:
        diffusers_logging.set_verbosity(verbosity)


def remove(pipe, adapter: str) -> None:
    """Take the adapter out of every component of the pipe that holds it."""
    for comp in ("unet", "text_encoder", "text_encoder_2"):
        model = getattr(pipe, comp, None)
        if model is not None and adapter in adapters.names(model):
            adapters.delete(model, adapter)


# ---------------------------------------------------------------------------------------------------------------
# pivotal-tuning embeddings saved beside a LoRA: <name>_emb.safetensors with clip_l (TE1) / clip_g (TE2)

_EMBEDDING_KEYS = (("clip_l", "text_encoder", "tokenizer"), ("clip_g", "text_encoder_2", "tokenizer_2"))


def embeddings_file(path) -> Optional[Path]:
    """The pivotal-tuning embeddings file that belongs to a LoRA file, if there is one."""
    p = Path(path)
    emb = p.with_name(p.stem + "_emb.safetensors")
    return emb if emb.is_file() else None


def read_embeddings(handle: PipeHandle, lora_path, lora_metadata: Optional[dict] = None) -> Optional[dict]:
    """{"tokens": [...], "clip_l": tensor, "clip_g": tensor} from the LoRA's `_emb.safetensors`, checked against
    the pipe's text encoders; None when the LoRA has none."""
    from safetensors.torch import load_file

    from .files import safetensors_metadata

    emb_path = embeddings_file(lora_path)
    if emb_path is None:
        if (lora_metadata or {}).get("tunelab_embeddings"):
            log.warning("TuneLab: '%s' was trained with new tokens, but %s is missing; the tokens will not be "
                        "understood", Path(lora_path).name, lora_metadata["tunelab_embeddings"])
        return None
    check_safetensors(emb_path, "lora")
    sd, meta = load_file(str(emb_path)), safetensors_metadata(emb_path)
    try:
        tokens = json.loads(meta.get("tokens") or "null")
    except ValueError:
        tokens = None
    rows = {int(sd[k].shape[0]) for k, _, _ in _EMBEDDING_KEYS if k in sd}
    if not rows or len(rows) != 1:
        raise TuneLabError(f"'{emb_path.name}' holds no clip_l / clip_g embeddings of one length", input_name="lora")
    n = rows.pop()
    if not (isinstance(tokens, list) and len(tokens) == n and all(isinstance(t, str) and t for t in tokens)):
        tokens = [f"<s{i}>" for i in range(n)]
    out = {"tokens": tokens, "file": emb_path.name}
    for key, te_name, tok_name in _EMBEDDING_KEYS:
        if key not in sd:
            continue
        te, tok = getattr(handle.pipe, te_name, None), getattr(handle.pipe, tok_name, None)
        if te is None or tok is None:
            raise TuneLabError(f"'{emb_path.name}' has {key} embeddings but the pipe has no {te_name}",
                               input_name="lora")
        width = te.get_input_embeddings().weight.shape[1]
        if sd[key].ndim != 2 or sd[key].shape[1] != width:
            raise TuneLabError(f"'{emb_path.name}': {key} embeddings are {tuple(sd[key].shape)}, but the pipe's "
                               f"{te_name} takes width {width}; they were made for another model", input_name="lora")
        out[key] = sd[key]
    return out


def apply_embeddings(handle: PipeHandle, embeddings: dict) -> tuple:
    """Add the tokens to both tokenizers/encoders with diffusers' `load_textual_inversion`, so the prompt encoder
    understands them. The tokens are new words: prompts without them encode exactly as before. Loading the same
    embeddings again is a no-op; tokens already taken by different embeddings are refused."""
    import torch

    tokens = list(embeddings["tokens"])
    for key, te_name, tok_name in _EMBEDDING_KEYS:
        if key not in embeddings:
            continue
        te, tok = getattr(handle.pipe, te_name), getattr(handle.pipe, tok_name)
        vocab = tok.get_vocab()
        present = [t for t in tokens if t in vocab]
        if present:
            weight = te.get_input_embeddings().weight
            ids = tok.convert_tokens_to_ids(tokens) if len(present) == len(tokens) else None
            same = ids is not None and torch.allclose(weight[ids].detach().float().cpu(),
                                                      embeddings[key].float(), atol=1e-3, rtol=1e-2)
            if not same:
                raise TuneLabError(f"the tokens {', '.join(present)} of '{embeddings['file']}' are already taken by "
                                   "other embeddings loaded into this model; load one pivotal-tuned LoRA per token "
                                   "set (reload the model to switch)", input_name="lora")
            continue
        try:
            handle.pipe.load_textual_inversion(embeddings[key], token=tokens, text_encoder=te, tokenizer=tok)
        except ValueError as e:
            raise TuneLabError(f"could not load the embeddings of '{embeddings['file']}': {e}",
                               input_name="lora") from e
    return tuple(tokens)


# ---------------------------------------------------------------------------------------------------------------
# writing


def describe(handle: PipeHandle) -> str:
    if not handle.loras:
        return "no LoRA"
    return ", ".join(f"{r.name} @ {r.weight:g}" for r in handle.loras)
