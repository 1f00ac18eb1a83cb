"""Test helper: make a LoRA for a tiny model with peft and write it in each on-disk format."""
from __future__ import annotations

import torch


def peft_unet_lora(handle, *, rank=4, alpha=4, seed=0, std=0.3, targets=("to_k", "to_q", "to_v", "to_out.0")):
    """PEFT-keyed state dict (lora_A/lora_B, no prefix) for handle's UNet, with non-zero B so it has an effect."""
    import copy

    from peft import LoraConfig, get_peft_model_state_dict

    unet = copy.deepcopy(handle.pipe.unet)
    # a deep copy of a pipe that already has adapters would carry them along
    if getattr(unet, "peft_config", None):
        for name in list(unet.peft_config):
            unet.delete_adapters(name)
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian", target_modules=list(targets)))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * std)
    return {k: v.clone() for k, v in get_peft_model_state_dict(unet).items()}


def write_formats(peft_sd, folder, *, rank=4, alpha=4):
    """Write the same weights as kohya, diffusers, raw PEFT and old attention-processor files. Returns {format: path}."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from safetensors.torch import save_file

    from tunelab.core import lora

    folder.mkdir(parents=True, exist_ok=True)
    paths = {"kohya": lora.save(folder / "kohya.safetensors", unet=peft_sd, rank=rank, alpha=alpha),
             "diffusers": lora.save(folder / "diffusers.safetensors", unet=peft_sd, rank=rank, alpha=alpha,
                                    fmt="diffusers")}
    peft_prefixed = {f"unet.{k}": v.contiguous() for k, v in peft_sd.items()}
    save_file(peft_prefixed, str(folder / "peft.safetensors"))
    paths["peft"] = folder / "peft.safetensors"
    # the 2023 attention-processor layout of the published wrong LoRA: attn1.processor.to_q_lora.down.weight
    old = {}
    for k, v in convert_state_dict_to_diffusers(peft_prefixed).items():
        k = k.replace(".to_out.0.lora.", ".processor.to_out_lora.")
        for proj in ("to_q", "to_k", "to_v"):
            k = k.replace(f".{proj}.lora.", f".processor.{proj}_lora.")
        old[k] = v.contiguous()
    save_file(old, str(folder / "old_processor.safetensors"))
    paths["old_processor"] = folder / "old_processor.safetensors"
    return paths
