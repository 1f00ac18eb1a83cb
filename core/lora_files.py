"""LoRA files: reading, the architecture fingerprint of a state dict, and writing kohya / diffusers safetensors.

Pure file and key handling on diffusers' converters; it knows no pipe, so the model layer and the tiny presets can
write LoRAs without importing the adapter stack (`lora.py`).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from .errors import TuneLabError
from .files import atomic_path, check_safetensors, safetensors_metadata


def read_file(path) -> tuple[dict, dict]:
    """(state_dict, metadata) of a LoRA file; safetensors only."""
    from safetensors.torch import load_file

    p = check_safetensors(path, "lora")
    return load_file(str(p)), safetensors_metadata(p)


def cross_attention_width(state_dict: dict) -> Optional[int]:
    """Input width of a cross-attention key projection (attn2.to_k), whatever the key format."""
    for key, tensor in state_dict.items():
        if key.endswith((".dora_scale", "lora_magnitude_vector")):
            continue
        k = key.replace("_", ".")
        if "attn2" in k and "to.k" in k and ("down" in k or "lora.A" in k) and getattr(tensor, "ndim", 0) == 2:
            return int(tensor.shape[1])
    return None


def encoder_prefixes(state_dict: dict) -> set[str]:
    found = set()
    for key in state_dict:
        if key.startswith(("lora_te2_", "text_encoder_2.")):
            found.add("text_encoder_2")
        elif key.startswith(("lora_te1_", "lora_te_", "text_encoder.")):
            found.add("text_encoder")
    return found


# The CLIP text transformer's modules sit under `text_model.` in transformers 4 (both SDXL encoders) and in
# transformers 5's CLIPTextModelWithProjection, but transformers 5's CLIPTextModel dropped that level. Files keep the
# ecosystem's names whatever is installed: kohya `lora_te1_text_model_encoder_layers_*`, diffusers
# `text_encoder.text_model.encoder.layers.*` (ComfyUI maps only these), and are matched to the model on reading.
TEXT_MODEL = "text_model."
_OUTSIDE_TEXT_MODEL = ("text_projection.",)  # CLIPTextModelWithProjection's own module beside text_model


def with_text_model_level(peft_sd: dict) -> dict:
    """A text encoder's PEFT-keyed weights with every CLIP transformer key under `text_model.`."""
    return {k if k.startswith((TEXT_MODEL,) + _OUTSIDE_TEXT_MODEL) else TEXT_MODEL + k: v
            for k, v in peft_sd.items()}


def match_text_model_level(peft_sd: dict, model) -> dict:
    """A text encoder's PEFT-keyed weights named as `model`'s modules are: with `text_model.` where the model has
    that level, without it where it does not (transformers 5's CLIPTextModel)."""
    sd = with_text_model_level(peft_sd)
    if "text_model" in dict(model.named_children()):
        return sd
    return {k[len(TEXT_MODEL):] if k.startswith(TEXT_MODEL) else k: v for k, v in sd.items()}


def fold_alpha(peft_sd: dict, alpha: float) -> dict:
    """PEFT-keyed weights with each module's lora_B scaled by alpha/rank, so a loader that assumes scale 1 (the
    diffusers/PEFT convention when a file carries no alpha) applies the trained strength."""
    ranks = {k.split(".lora_A.")[0]: int(v.shape[0]) for k, v in peft_sd.items() if ".lora_A." in k}
    out = {}
    for k, v in peft_sd.items():
        module = k.split(".lora_B.")[0]
        out[k] = v * (float(alpha) / ranks[module]) if ".lora_B." in k and module in ranks else v
    return out


DORA_MAGNITUDE = ".lora_magnitude_vector"
_KOHYA_PREFIX = {"unet": "lora_unet", "text_encoder": "lora_te1", "text_encoder_2": "lora_te2"}


def kohya_dora_scales(magnitudes: dict, peft_sd: dict) -> dict:
    """DoRA magnitudes (PEFT `<component>.<module>.lora_magnitude_vector`, shape [out]) as kohya/LyCORIS
    `<lora key>.dora_scale`, shaped [out, 1] (conv: [out, 1, 1, 1]): the output-axis layout ComfyUI's
    `weight_decompose` broadcasts against the weight. diffusers' converter leaves these keys misnamed."""
    out = {}
    for key, value in magnitudes.items():
        component, _, module = key[: -len(DORA_MAGNITUDE)].partition(".")
        down = peft_sd.get(f"{component}.{module}.lora_A.weight")
        ndim = down.ndim if down is not None else 2
        out[f"{_KOHYA_PREFIX[component]}_{module.replace('.', '_')}.dora_scale"] = \
            value.reshape(-1, *([1] * (ndim - 1))).contiguous()
    return out


def save(path, *, unet: dict, text_encoder: Optional[dict] = None, text_encoder_2: Optional[dict] = None,
         rank: int, alpha: float, metadata: Optional[dict] = None, fmt: str = "kohya") -> Path:
    """Write PEFT-keyed LoRA weights (as `get_peft_model_state_dict` gives them) to a safetensors file.

    kohya: `lora_unet_*` / `lora_te1_text_model_*` / `lora_te2_text_model_*` with `.alpha` = the trained lora_alpha
    (diffusers' converter writes alpha = rank, which is only right when they are equal). diffusers: `unet.*.lora.down/up`
    and `text_encoder(_2).text_model.*.lora_linear_layer.down/up` keys, which carry no alpha, so alpha/rank is folded
    into lora_B: every loader then applies the strength the kohya file has.
    """
    from diffusers.utils import convert_state_dict_to_diffusers, convert_state_dict_to_kohya
    from safetensors.torch import save_file

    if fmt not in ("kohya", "diffusers"):
        raise TuneLabError(f"unknown LoRA format '{fmt}'; choose kohya or diffusers", input_name="format")
    peft_sd = {}
    for prefix, sd in (("unet", unet), ("text_encoder", text_encoder), ("text_encoder_2", text_encoder_2)):
        sd = {k: v.detach().to("cpu").contiguous() for k, v in (sd or {}).items()}
        if prefix != "unet":
            sd = with_text_model_level(sd)
        if fmt == "diffusers":
            sd = fold_alpha(sd, alpha)
        peft_sd.update({f"{prefix}.{k}": v for k, v in sd.items()})
    if fmt == "kohya":
        magnitudes = {k: peft_sd.pop(k) for k in list(peft_sd) if k.endswith(DORA_MAGNITUDE)}
        out = convert_state_dict_to_kohya(peft_sd)
        for k in out:
            if k.endswith(".alpha"):
                out[k] = out[k].new_tensor(float(alpha))
        out.update(kohya_dora_scales(magnitudes, peft_sd))
    else:
        out = convert_state_dict_to_diffusers(peft_sd)
    out = {k: v.contiguous() for k, v in out.items()}
    meta = {"format": "pt", "tunelab_format": fmt, "rank": str(rank), "alpha": str(alpha)}
    if fmt == "diffusers":
        meta["tunelab_alpha_folded"] = "true"  # lora_B holds alpha/rank already; apply at scale 1
    for k, v in (metadata or {}).items():
        meta[k] = v if isinstance(v, str) else json.dumps(v)
    path = Path(path)
    with atomic_path(path) as tmp:
        save_file(out, str(tmp), metadata=meta)
    return path
