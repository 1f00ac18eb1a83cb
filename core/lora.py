"""LoRA files and the adapter stack on a shared pipeline.

Reads the old diffusers attention-processor format (the published wrong LoRA), diffusers/PEFT and kohya, all
converted by diffusers' own utilities. Before applying, the file's architecture fingerprint (cross-attention width,
text-encoder prefixes) is checked against the pipe, and keys that map onto no module are reported.
Writes safetensors: kohya keys by default (what ComfyUI's LoraLoader maps fully), diffusers keys on request.
"""
from __future__ import annotations

import json
import logging
import threading
from dataclasses import replace
from pathlib import Path
from typing import Optional

from .errors import TuneLabError
from .files import atomic_path, check_safetensors, sha256_file
from .models import LoraRef, PipeHandle, describe_width

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


def read_file(path) -> tuple[dict, dict]:
    """(state_dict, metadata) of a LoRA file; safetensors only."""
    from safetensors.torch import load_file

    p = check_safetensors(path, "lora")
    from .files import safetensors_metadata

    return load_file(str(p)), safetensors_metadata(p)


def cross_attention_width(state_dict: dict) -> Optional[int]:
    """Input width of a cross-attention key projection (attn2.to_k), whatever the key format."""
    for key, tensor in state_dict.items():
        k = key.replace("_", ".")
        if "attn2" in k and "to.k" in k and ("down" in k or "lora.A" in k) and getattr(tensor, "ndim", 0) == 2:
            return int(tensor.shape[1])
    return None


def _encoder_prefixes(state_dict: dict) -> set[str]:
    found = set()
    for key in state_dict:
        if key.startswith(("lora_te2_", "text_encoder_2.")):
            found.add("text_encoder_2")
        elif key.startswith(("lora_te1_", "lora_te_", "text_encoder.")):
            found.add("text_encoder")
    return found


def check_architecture(handle: PipeHandle, state_dict: dict, name: str) -> None:
    """Refuse a LoRA made for another base model, naming both architectures, before anything is applied."""
    width = cross_attention_width(state_dict)
    if width is not None and width != handle.cross_attention_dim:
        raise TuneLabError(f"'{name}' was made for {describe_width(width)}, but the pipe is "
                           f"{handle.architecture}; load a LoRA trained for this model", input_name="lora")
    encoders = _encoder_prefixes(state_dict)
    for enc in encoders:
        if getattr(handle.pipe, enc, None) is None:
            kind = "SDXL (two text encoders)" if enc == "text_encoder_2" else "a model with a first text encoder"
            raise TuneLabError(f"'{name}' has {enc} weights, so it was made for {kind}, but the pipe is "
                               f"{handle.architecture}", input_name="lora")


def _to_peft(handle: PipeHandle, state_dict: dict) -> dict[str, dict]:
    """Per component ('unet', 'text_encoder', 'text_encoder_2'), the file's weights in PEFT keys (diffusers' converters)."""
    from diffusers.utils.state_dict_utils import convert_state_dict_to_peft, convert_unet_state_dict_to_peft

    try:
        out = handle.pipe.lora_state_dict(dict(state_dict))
    except Exception as e:
        raise TuneLabError(f"not a LoRA file diffusers can read: {e}", input_name="lora") from e
    converted = out[0] if isinstance(out, tuple) else out
    parts: dict[str, dict] = {}
    for key, value in converted.items():
        comp, _, rest = key.partition(".")
        parts.setdefault(comp, {})[rest] = value
    result = {}
    for comp, sd in parts.items():
        try:
            result[comp] = (convert_unet_state_dict_to_peft(sd) if comp in ("unet", "transformer")
                            else convert_state_dict_to_peft(sd))
        except ValueError as e:  # diffusers: "Could not automatically infer state dict type"
            raise TuneLabError(f"no LoRA weights TuneLab recognises for the {comp} ({e})", input_name="lora") from e
    return result


def unmapped_modules(handle: PipeHandle, state_dict: dict) -> tuple[int, list[str]]:
    """(number of LoRA'd modules, those that exist nowhere in the pipe)."""
    modules, missing = set(), []
    for comp, sd in _to_peft(handle, state_dict).items():
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


# ---------------------------------------------------------------------------------------------------------------
# applying


def load(handle: PipeHandle, path, strength: float = 1.0, name: Optional[str] = None) -> PipeHandle:
    """A new handle with the LoRA on its stack. The incoming handle is never changed; the weights are loaded into
    the shared pipe once per file (as a disabled-by-default adapter), so branches share one copy."""
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
    sha = sha256_file(path)
    adapter = f"tl_{sha[:16]}"
    with _LOCK:
        if adapter not in loaded_adapters(handle.pipe):
            try:
                handle.pipe.load_lora_weights(dict(state_dict), adapter_name=adapter)
            except Exception as e:
                raise TuneLabError(f"could not apply '{name}': {e}", input_name="lora") from e
            # loading activates the new adapter; nothing runs until activate() picks a handle's stack
            handle.pipe.disable_lora()
    ref = LoraRef(adapter=adapter, weight=float(strength), name=name, sha256=sha)
    return handle.with_lora(ref)


# ---------------------------------------------------------------------------------------------------------------
# writing


def save(path, *, unet: dict, text_encoder: Optional[dict] = None, text_encoder_2: Optional[dict] = None,
         rank: int, alpha: float, metadata: Optional[dict] = None, fmt: str = "kohya") -> Path:
    """Write PEFT-keyed LoRA weights (as `get_peft_model_state_dict` gives them) to a safetensors file.

    kohya: `lora_unet_*` / `lora_te1_*` / `lora_te2_*` with `.alpha` = the trained lora_alpha (diffusers' converter
    writes alpha = rank, which is only right when they are equal). diffusers: `unet.*.lora.down/up` keys.
    """
    from diffusers.utils import convert_state_dict_to_diffusers, convert_state_dict_to_kohya
    from safetensors.torch import save_file

    if fmt not in ("kohya", "diffusers"):
        raise TuneLabError(f"unknown LoRA format '{fmt}'; choose kohya or diffusers", input_name="format")
    peft_sd = {}
    for prefix, sd in (("unet", unet), ("text_encoder", text_encoder), ("text_encoder_2", text_encoder_2)):
        for k, v in (sd or {}).items():
            peft_sd[f"{prefix}.{k}"] = v.detach().to("cpu").contiguous()
    if fmt == "kohya":
        out = convert_state_dict_to_kohya(peft_sd)
        for k in out:
            if k.endswith(".alpha"):
                out[k] = out[k].new_tensor(float(alpha))
    else:
        out = convert_state_dict_to_diffusers(peft_sd)
    out = {k: v.contiguous() for k, v in out.items()}
    meta = {"format": "pt", "tunelab_format": fmt, "rank": str(rank), "alpha": str(alpha)}
    for k, v in (metadata or {}).items():
        meta[k] = v if isinstance(v, str) else json.dumps(v)
    path = Path(path)
    with atomic_path(path) as tmp:
        save_file(out, str(tmp), metadata=meta)
    return path


def describe(handle: PipeHandle) -> str:
    if not handle.loras:
        return "no LoRA"
    return ", ".join(f"{r.name} @ {r.weight:g}" for r in handle.loras)
