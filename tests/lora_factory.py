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


# ---------------------------------------------------------------------------------------------------------------
# SDXL LoRAs with text encoders, written by hand in each format, and the reference they must equal

UNET_TARGETS = ("to_k", "to_q", "to_v", "to_out.0")
TE_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")
TEXT_ENCODERS = {"text_encoder": "lora_te1", "text_encoder_2": "lora_te2"}


def _targets(model, targets):
    """Names of the Linear layers `targets` picks, as the installed libraries name them (peft wrappers left out)."""
    out = []
    for name, module in model.named_modules():
        if ".base_layer" in name or not hasattr(module, "in_features"):
            continue
        if any(name == t or name.endswith("." + t) for t in targets):
            out.append(name)
    return sorted(out)


def sdxl_lora(pipe, *, rank=4, seed=0, std=0.1, text_encoders=True) -> dict:
    """{component: {module: (A [rank, in], B [out, rank])}}: random LoRA weights for the UNet's attention and both
    CLIP encoders' attention, module names as the installed diffusers/transformers have them. No peft involved."""
    g = torch.Generator().manual_seed(seed)
    comps = {"unet": (pipe.unet, UNET_TARGETS)}
    if text_encoders:
        comps.update({c: (getattr(pipe, c), TE_TARGETS) for c in TEXT_ENCODERS})
    out = {}
    for comp, (model, targets) in comps.items():
        out[comp] = {}
        for name in _targets(model, targets):
            lin = model.get_submodule(name)
            lin = getattr(lin, "base_layer", lin)
            out[comp][name] = (torch.randn(rank, lin.in_features, generator=g) * std,
                               torch.randn(lin.out_features, rank, generator=g) * std)
    return out


def standard_te_name(module: str) -> str:
    """The CLIP module name every tool uses: under `text_model.` (transformers 5's CLIPTextModel drops it)."""
    return module if module.startswith("text_model.") else f"text_model.{module}"


def write_kohya(weights, path, *, alpha):
    """The standard kohya SDXL layout, by hand: lora_unet_<diffusers name>, lora_te1_text_model_* and
    lora_te2_text_model_*, lora_down/lora_up and .alpha."""
    from safetensors.torch import save_file

    sd = {}
    for comp, modules in weights.items():
        for module, (a, b) in modules.items():
            if comp == "unet":
                key = "lora_unet_" + module.replace(".", "_")
            else:
                key = TEXT_ENCODERS[comp] + "_" + standard_te_name(module).replace(".", "_")
            sd[f"{key}.lora_down.weight"] = a.contiguous()
            sd[f"{key}.lora_up.weight"] = b.contiguous()
            sd[f"{key}.alpha"] = torch.tensor(float(alpha))
    save_file(sd, str(path))
    return path


def write_peft_style(weights, path, *, scale, text_model=True, diffusers_names=False):
    """The same weights as a file without alpha (strength 1), scale folded into B: PEFT keys
    (`text_encoder.text_model.*.lora_A.weight`), or with `diffusers_names` diffusers' keys
    (`unet.*.lora.down.weight`, `text_encoder.*.lora_linear_layer.down.weight`); `text_model=False` writes the
    text-encoder modules without the `text_model` level, as diffusers saves them under transformers 5."""
    from safetensors.torch import save_file

    sd = {}
    for comp, modules in weights.items():
        for module, (a, b) in modules.items():
            if comp != "unet":
                module = standard_te_name(module)
                if not text_model:
                    module = module[len("text_model."):]
            if not diffusers_names:
                down, up = "lora_A", "lora_B"
            elif comp == "unet":
                down, up = "lora.down", "lora.up"
            else:
                down, up = "lora_linear_layer.down", "lora_linear_layer.up"
            sd[f"{comp}.{module}.{down}.weight"] = a.contiguous()
            sd[f"{comp}.{module}.{up}.weight"] = (b * scale).contiguous()
    save_file(sd, str(path))
    return path


def peft_state_dicts(weights):
    """{component: PEFT-keyed state dict} as `get_peft_model_state_dict` gives them (what `lora.save` takes)."""
    return {comp: {k: v for module, (a, b) in modules.items()
                   for k, v in ((f"{module}.lora_A.weight", a), (f"{module}.lora_B.weight", b))}
            for comp, modules in weights.items()}


def merged_pipe(preset, weights, *, scale):
    """An independent reference: a fresh pipe of `preset` with W + scale * B @ A merged into each weight by hand."""
    from diffusers import StableDiffusionXLPipeline

    from tunelab.core import tiny

    pipe = StableDiffusionXLPipeline.from_pretrained(str(tiny.ensure(preset)), local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        for comp, modules in weights.items():
            model = getattr(pipe, comp)
            for module, (a, b) in modules.items():
                lin = model.get_submodule(module)
                lin.weight += scale * (b @ a)
    return pipe
