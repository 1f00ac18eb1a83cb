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
