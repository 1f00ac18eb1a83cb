"""Test helper: write a diffusers pipeline's weights in the original single-file (LDM/SGM) key layout.

The inverse of diffusers' single-file conversion, written from the layout rules. `check_inverse` proves it is
exact: it feeds uniquely-valued tensors through the inverse and then through diffusers' forward converters and
demands every tensor come back under its own name.
"""
from __future__ import annotations

import re

import torch

UNET = "model.diffusion_model."
VAE = "first_stage_model."

_UNET_TOP = {"conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2",
             "time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
             "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2"}
_UNET_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
                "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
_VAE_TOP = {"conv_norm_out": "norm_out"}
_VAE_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
_OPENCLIP_LAYER = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
                   "self_attn.out_proj": "attn.out_proj"}


def _split(key: str, module_names) -> tuple[str, str]:
    """('conv_in', 'weight') for 'conv_in.weight' when 'conv_in' is a known module name."""
    for m in sorted(module_names, key=len, reverse=True):
        if key.startswith(m + "."):
            return m, key[len(m) + 1:]
    raise KeyError(key)


def unet_to_ldm(sd: dict, config) -> dict:
    lpb = config["layers_per_block"]
    has_attn = ["CrossAttn" in t for t in config["up_block_types"]]
    out = {}
    for key, t in sd.items():
        m = re.match(r"(down|up)_blocks\.(\d+)\.(resnets|attentions|downsamplers|upsamplers)\.(\d+)\.(.*)", key)
        if m:
            side, b, kind, j, rest = m.group(1), int(m.group(2)), m.group(3), int(m.group(4)), m.group(5)
            if kind == "resnets":
                mod, param = _split(rest, _UNET_RESNET)
                rest = f"{_UNET_RESNET[mod]}.{param}"
            if side == "down":
                if kind == "downsamplers":  # conv -> op, in the slot after the block's layers
                    new = f"input_blocks.{(b + 1) * (lpb + 1)}.0.op.{rest.split('.', 1)[1]}"
                else:
                    new = f"input_blocks.{1 + b * (lpb + 1) + j}.{0 if kind == 'resnets' else 1}.{rest}"
            else:
                if kind == "upsamplers":  # after the resnet (and the attention, if the block has one)
                    new = f"output_blocks.{b * (lpb + 1) + lpb}.{2 if has_attn[b] else 1}.{rest}"
                else:
                    new = f"output_blocks.{b * (lpb + 1) + j}.{0 if kind == 'resnets' else 1}.{rest}"
        elif key.startswith("mid_block."):
            m = re.match(r"mid_block\.(resnets|attentions)\.(\d+)\.(.*)", key)
            kind, j, rest = m.group(1), int(m.group(2)), m.group(3)
            if kind == "resnets":
                mod, param = _split(rest, _UNET_RESNET)
                new = f"middle_block.{2 * j}.{_UNET_RESNET[mod]}.{param}"
            else:
                new = f"middle_block.1.{rest}"
        else:
            mod, param = _split(key, _UNET_TOP)
            new = f"{_UNET_TOP[mod]}.{param}"
        out[UNET + new] = t
    return out


def vae_to_ldm(sd: dict, config, prefix: str = VAE) -> dict:
    n_up = len(config["up_block_types"])
    out = {}
    for key, t in sd.items():
        side, rest = key.split(".", 1) if key.startswith(("encoder.", "decoder.")) else ("", key)
        m = re.match(r"(down|up)_blocks\.(\d+)\.(resnets|downsamplers|upsamplers)\.(\d+)\.(.*)", rest)
        if m:
            kind, b, j, tail = m.group(3), int(m.group(2)), int(m.group(4)), m.group(5)
            b = b if m.group(1) == "down" else n_up - 1 - b  # the original counts decoder levels upwards
            level = f"{m.group(1)}.{b}"
            if kind == "resnets":
                new = f"{level}.block.{j}.{tail.replace('conv_shortcut', 'nin_shortcut')}"
            else:
                new = f"{level}.{'downsample' if kind == 'downsamplers' else 'upsample'}.{tail}"
        elif rest.startswith("mid_block.resnets."):
            j, tail = rest[len("mid_block.resnets."):].split(".", 1)
            new = f"mid.block_{int(j) + 1}.{tail}"
        elif rest.startswith("mid_block.attentions.0."):
            mod, param = _split(rest[len("mid_block.attentions.0."):], _VAE_ATTN)
            new = f"mid.attn_1.{_VAE_ATTN[mod]}.{param}"
            if t.ndim == 2:  # the original uses 1x1 convolutions
                t = t[:, :, None, None]
        else:
            mod, param = rest.rsplit(".", 1)
            new = f"{_VAE_TOP.get(mod, mod)}.{param}"
        out[prefix + (f"{side}." if side else "") + new] = t
    return out


def clip_to_ldm(sd: dict, prefix: str) -> dict:
    """CLIP ViT-L in the HF layout under a prefix (transformers >= 5.6 drops `text_model.` from CLIPTextModel)."""
    return {prefix + (k if k.startswith("text_model.") else "text_model." + k): t for k, t in sd.items()}


def open_clip_to_ldm(sd: dict, prefix: str) -> dict:
    """CLIP bigG (CLIPTextModelWithProjection) in OpenCLIP's layout: fused in_proj, text_projection as a matrix."""
    sd = {k.removeprefix("text_model."): t for k, t in sd.items()}
    top = {"embeddings.token_embedding.weight": "token_embedding.weight",
           "embeddings.position_embedding.weight": "positional_embedding",
           "final_layer_norm.weight": "ln_final.weight", "final_layer_norm.bias": "ln_final.bias"}
    out = {}
    for key, t in sd.items():
        if key in top:
            out[prefix + top[key]] = t
        elif key == "text_projection.weight":
            out[prefix + "text_projection"] = t.T.contiguous()
        elif key.startswith("encoder.layers."):
            i, rest = key[len("encoder.layers."):].split(".", 1)
            block = f"{prefix}transformer.resblocks.{i}."
            m = re.match(r"self_attn\.(q|k|v)_proj\.(weight|bias)", rest)
            if m:
                if m.group(1) == "q":
                    qkv = [sd[f"encoder.layers.{i}.self_attn.{p}_proj.{m.group(2)}"] for p in "qkv"]
                    out[block + f"attn.in_proj_{m.group(2)}"] = torch.cat(qkv, 0)
                continue
            mod, param = _split(rest, _OPENCLIP_LAYER)
            out[block + f"{_OPENCLIP_LAYER[mod]}.{param}"] = t
        else:
            raise KeyError(key)
    return out


def base_weights(model) -> dict:
    """`model.state_dict()` without LoRA adapters: peft's wrappers hold the base weight as `<module>.base_layer.*`
    (a shared test pipe keeps the adapters other tests loaded)."""
    return {k.replace(".base_layer.", "."): v for k, v in model.state_dict().items()
            if ".lora_" not in k and "lora_magnitude_vector" not in k}


def pipeline_to_ldm(pipe) -> dict:
    """The whole checkpoint of an SDXL base / refiner / SD1.x / InstructPix2Pix pipeline, as one flat dict."""
    out = {}
    out.update(unet_to_ldm(base_weights(pipe.unet), pipe.unet.config))
    out.update(vae_to_ldm(base_weights(pipe.vae), pipe.vae.config))
    te1, te2 = getattr(pipe, "text_encoder", None), getattr(pipe, "text_encoder_2", None)
    if te2 is not None:  # SGM layout: embedders.0 is CLIP-L (base only), the last one is OpenCLIP bigG
        last = 1 if te1 is not None else 0
        out.update(open_clip_to_ldm(base_weights(te2), f"conditioner.embedders.{last}.model."))
        if te1 is not None:
            out.update(clip_to_ldm(base_weights(te1), "conditioner.embedders.0.transformer."))
    else:
        out.update(clip_to_ldm(base_weights(te1), "cond_stage_model.transformer."))
    return {k: v.detach().clone().contiguous() for k, v in out.items()}


# ---------------------------------------------------------------------------------------------------------------


def _unique_like(sd: dict) -> dict:
    """Same keys and shapes, every element a distinct integer, so any mix-up shows."""
    out, start = {}, 0
    for k, t in sd.items():
        out[k] = torch.arange(start, start + t.numel(), dtype=torch.float64).reshape(t.shape)
        start += t.numel()
    return out


def check_inverse(pipe) -> None:
    """Assert that diffusers' forward conversion undoes ours exactly, component by component."""
    from diffusers.loaders import single_file_utils as sfu

    def same(orig: dict, back: dict, what: str):
        assert set(back) == set(orig), f"{what}: {sorted(set(orig) ^ set(back))[:5]}"
        for k in orig:
            assert torch.equal(back[k], orig[k]), f"{what}: {k} differs"

    sd = _unique_like(pipe.unet.state_dict())
    same(sd, sfu.convert_ldm_unet_checkpoint(unet_to_ldm(sd, pipe.unet.config), dict(pipe.unet.config)), "unet")
    sd = _unique_like(pipe.vae.state_dict())
    same(sd, sfu.convert_ldm_vae_checkpoint(vae_to_ldm(sd, pipe.vae.config), dict(pipe.vae.config)), "vae")
    te1, te2 = getattr(pipe, "text_encoder", None), getattr(pipe, "text_encoder_2", None)
    if te1 is not None:
        sd = _unique_like(te1.state_dict())
        back = sfu.convert_ldm_clip_checkpoint(clip_to_ldm(sd, "cond_stage_model.transformer."))
        if not any(k.startswith("text_model.") for k in sd):
            back = {k.removeprefix("text_model."): v for k, v in back.items()}
        same(sd, back, "text_encoder")
    if te2 is not None:
        sd = _unique_like(te2.state_dict())
        prefix = "conditioner.embedders.1.model."
        same(sd, sfu.convert_open_clip_checkpoint(te2, open_clip_to_ldm(sd, prefix), prefix=prefix), "text_encoder_2")
