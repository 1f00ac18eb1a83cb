"""ComfyUI's own LoRA key mapping applies every key of a TuneLab kohya LoRA (marked comfyui).

A real server cannot load the tiny SDXL checkpoint (ComfyUI pins its model types to full-size configs), so this runs
ComfyUI's loader code directly, in ComfyUI's own environment: detect the UNet from the single-file checkpoint, build
LoraLoader's key map (`comfy.lora.model_lora_keys_unet`, and for the text encoders `model_lora_keys_clip` on
ComfyUI's own `SDXLClipModel` sized like the tiny encoders) and map the file with `comfy.lora.load_lora`, as
`comfy.sd.load_lora_for_models` does, counting the "lora key not loaded" lines ComfyUI logs. The diffusers-format
copy is the control for the UNet: ComfyUI maps none of its UNet attention keys, which is why TuneLab writes kohya
keys by default.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.comfyui

_PROBE = r'''
import json, logging, sys
sys.argv = ["probe", "--cpu"]
records = []
class Keep(logging.Handler):
    def emit(self, record):
        records.append(record.getMessage())
logging.getLogger().addHandler(Keep()); logging.getLogger().setLevel(logging.WARNING)
import comfy.options; comfy.options.enable_args_parsing()
import comfy.lora, comfy.model_detection, comfy.supported_models_base, comfy.utils
'''


def _probe_script():
    return _PROBE + r'''
ckpt = PATHS["ckpt"]
sd = comfy.utils.load_torch_file(ckpt)
prefix = "model.diffusion_model."
model = comfy.supported_models_base.BASE(comfy.model_detection.detect_unet_config(sd, prefix)).get_model(sd, prefix)
missing, unexpected = model.diffusion_model.load_state_dict(
    {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}, strict=False)
key_map = comfy.lora.model_lora_keys_unet(model, {})
out = {"unet_missing": len(missing), "unet_unexpected": len(unexpected)}
for name, path in PATHS["loras"].items():
    records.clear()
    lora = comfy.utils.load_torch_file(path)
    patches = comfy.lora.load_lora(lora, key_map)
    out[name] = {"tensors": len(lora), "patched": len(patches),
                 "not_loaded": [r for r in records if "lora key not loaded" in r]}
print("RESULT " + json.dumps(out))
'''


def test_comfyui_lora_loader_maps_every_kohya_key(tmp_path, tiny_sdxl):
    root = Path(os.environ["COMFYUI_PATH"])
    python = root / ".venv" / "bin" / "python"
    if not python.exists():
        pytest.skip(f"no ComfyUI environment at {python}")
    sys.path.insert(0, str(Path(__file__).parent))
    import ldm_layout
    from lora_factory import peft_unet_lora
    from safetensors.torch import save_file

    from tunelab.core import lora

    save_file(ldm_layout.pipeline_to_ldm(tiny_sdxl.pipe), str(tmp_path / "tiny_sdxl.safetensors"))
    weights = peft_unet_lora(tiny_sdxl, rank=4, alpha=8, seed=1, std=0.05)
    modules = len({k.split(".lora_")[0] for k in weights})
    paths = {"ckpt": str(tmp_path / "tiny_sdxl.safetensors"), "loras": {
        "kohya": str(lora.save(tmp_path / "kohya.safetensors", unet=weights, rank=4, alpha=8)),
        "diffusers": str(lora.save(tmp_path / "diffusers.safetensors", unet=weights, rank=4, alpha=8, fmt="diffusers")),
    }}
    script = f"PATHS = {json.dumps(paths)}\n" + _probe_script()
    proc = subprocess.run([str(python), "-c", script], cwd=root, env={**os.environ, "PYTHONPATH": str(root)},
                          capture_output=True, text=True, timeout=300)
    lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    result = json.loads(lines[-1][len("RESULT "):])
    assert result["unet_missing"] == 0 and result["unet_unexpected"] == 0
    kohya = result["kohya"]
    assert kohya["not_loaded"] == [] and kohya["patched"] == modules == 64, kohya
    assert kohya["tensors"] == 3 * modules  # lora_down, lora_up and .alpha per module
    control = result["diffusers"]
    assert control["patched"] == 0 and len(control["not_loaded"]) == control["tensors"], control



_CLIP_PROBE = r"""
import torch
import comfy.sdxl_clip, comfy.lora_convert
ckpt = PATHS["ckpt"]
sd = comfy.utils.load_torch_file(ckpt)
prefix = "model.diffusion_model."
model = comfy.supported_models_base.BASE(comfy.model_detection.detect_unet_config(sd, prefix)).get_model(sd, prefix)
# ComfyUI's SDXL CLIP (clip_l + clip_g) with the tiny encoders' widths and depth (its *_model_config overrides)
clip = comfy.sdxl_clip.SDXLClipModel(device="cpu", dtype=torch.float32, model_options=PATHS["clip_configs"])
key_map = comfy.lora.model_lora_keys_unet(model, {})
key_map = comfy.lora.model_lora_keys_clip(clip, key_map)
weights = {**model.state_dict(), **clip.state_dict()}
records.clear()
lora = comfy.lora_convert.convert_lora(comfy.utils.load_torch_file(PATHS["lora"]))
patches = comfy.lora.load_lora(lora, key_map)
bad_shapes = []
for target, adapter in patches.items():
    up, down = adapter.weights[0], adapter.weights[1]
    w = weights[target]
    if (up.shape[0], down.shape[1]) != (w.shape[0], w[0].numel()):
        bad_shapes.append(target)
alphas = sorted({float(adapter.weights[2]) for adapter in patches.values()})
print("RESULT " + json.dumps({
    "tensors": len(lora), "not_loaded": [r for r in records if "lora key not loaded" in r],
    "patched": {part: sum(t.startswith(part) for t in patches) for part in ("diffusion_model.", "clip_l.", "clip_g.")},
    "bad_shapes": bad_shapes, "alphas": alphas}))
"""


def _tiny_clip_config(text_encoder):
    c = text_encoder.config
    return {"hidden_size": c.hidden_size, "intermediate_size": c.intermediate_size,
            "num_attention_heads": c.num_attention_heads, "num_hidden_layers": c.num_hidden_layers,
            "projection_dim": c.projection_dim, "vocab_size": c.vocab_size, "hidden_act": c.hidden_act}


def test_comfyui_maps_every_module_of_a_lora_trained_with_text_encoders(tmp_path, tiny_sdxl):
    """A LoRA from TuneLab's trainer with --train-text-encoder: every UNet, TE1 (clip_l) and TE2 (clip_g) module is
    patched, with its alpha, onto a weight of the right shape, and ComfyUI reports no key it did not load."""
    root = Path(os.environ["COMFYUI_PATH"])
    python = root / ".venv" / "bin" / "python"
    if not python.exists():
        pytest.skip(f"no ComfyUI environment at {python}")
    sys.path.insert(0, str(Path(__file__).parent))
    import ldm_layout
    import numpy as np
    from PIL import Image
    from safetensors.torch import save_file

    from tunelab.core import lora
    from tunelab.training.lora_sdxl import LoraTrainConfig, train

    data = tmp_path / "data"
    data.mkdir()
    for i in range(4):
        a = np.zeros((64, 64, 3), np.uint8)
        a[..., i % 3] = 200
        a[:: 4 + i] = 255
        Image.fromarray(a).save(data / f"{i:02d}.png")
    result = train(LoraTrainConfig(data_dir=str(data), output=str(tmp_path / "te.safetensors"), model=tiny_sdxl,
                                   resolution=64, train_batch_size=4, max_train_steps=1, rank=4, alpha=8,
                                   train_text_encoder=True, cache_latents=True, checkpointing_steps=0, seed=0))
    sd, _ = lora.read_file(result.lora_path)
    modules = {part: len({k.split(".")[0] for k in sd if k.startswith(part)})
               for part in ("lora_unet_", "lora_te1_", "lora_te2_")}
    assert modules["lora_te1_"] == modules["lora_te2_"] == 3 * 4  # 3 layers x q/k/v/out on each tiny encoder
    from diffusers import StableDiffusionXLPipeline

    from tunelab.core import tiny

    fresh = StableDiffusionXLPipeline.from_pretrained(str(tiny.ensure("tiny-sdxl")), local_files_only=True)
    save_file(ldm_layout.pipeline_to_ldm(fresh), str(tmp_path / "tiny_sdxl.safetensors"))  # no peft wrappers
    paths = {"ckpt": str(tmp_path / "tiny_sdxl.safetensors"), "lora": str(result.lora_path),
             "clip_configs": {"clip_l_model_config": _tiny_clip_config(tiny_sdxl.pipe.text_encoder),
                              "clip_g_model_config": _tiny_clip_config(tiny_sdxl.pipe.text_encoder_2)}}
    script = f"PATHS = {json.dumps(paths)}\n" + _PROBE + _CLIP_PROBE
    proc = subprocess.run([str(python), "-c", script], cwd=root, env={**os.environ, "PYTHONPATH": str(root)},
                          capture_output=True, text=True, timeout=300)
    lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    out = json.loads(lines[-1][len("RESULT "):])
    assert out["not_loaded"] == [] and out["bad_shapes"] == [], out
    assert out["patched"] == {"diffusion_model.": modules["lora_unet_"], "clip_l.": modules["lora_te1_"],
                              "clip_g.": modules["lora_te2_"]}, out
    assert out["tensors"] == 3 * sum(modules.values()) and out["alphas"] == [8.0]
