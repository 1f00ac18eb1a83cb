"""ComfyUI-side setup for bench/bench_native_prompt.py (the pack itself reaches ComfyUI only through host.py).

Runs inside ComfyUI's environment: parse ComfyUI's arguments, build a native CLIP of ComfyUI's own SDXL classes
holding tiny-sdxl's text encoders (via comfyui_tiny_models), and hand out ComfyUI's CLIPTextEncode node.
"""
import os
import sys


def start(cpu: bool = True) -> None:
    sys.argv = [sys.argv[0]] + (["--cpu"] if cpu else [])
    import comfy.options

    comfy.options.enable_args_parsing()


def tiny_sdxl_clip(tokenizer_dir, pipe):
    """A native CLIP with `pipe`'s two text encoders, stored in fp16 as ComfyUI stores them."""
    import torch

    os.environ["TUNELAB_TINY_TOKENIZER"] = str(tokenizer_dir)
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import comfyui_tiny_models as tm

    import comfy.sd
    import comfy.supported_models_base

    sd = {}
    for key, te in (("clip_l", pipe.text_encoder), ("clip_g", pipe.text_encoder_2)):
        for k, v in te.state_dict().items():
            if k.endswith("position_ids"):
                continue
            if k.endswith("token_embedding.weight"):
                v = torch.cat([v, torch.zeros(49408 - v.shape[0], v.shape[1])])
            name = k if k.startswith(("text_model.", "text_projection")) else "text_model." + k
            sd[f"{key}.transformer.{name}"] = v.half()
    target = comfy.supported_models_base.ClipTarget(tm.TinySDXLTokenizer, tm.TinySDXLClipModel)
    return comfy.sd.CLIP(target, state_dict=sd)


def clip_text_encode():
    import nodes

    return nodes.CLIPTextEncode()
