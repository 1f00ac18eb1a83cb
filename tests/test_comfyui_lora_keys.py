"""ComfyUI's own LoRA key mapping applies every key of a TuneLab kohya LoRA (marked comfyui).

A real server cannot load the tiny SDXL checkpoint (ComfyUI pins its model types to full-size configs), so this runs
ComfyUI's loader code directly, in ComfyUI's own environment: detect the UNet from the single-file checkpoint, build
LoraLoader's key map (`comfy.lora.model_lora_keys_unet`) and map the file with `comfy.lora.load_lora`, counting the
"lora key not loaded" lines ComfyUI logs. The diffusers-format copy is the control: ComfyUI maps none of its UNet
attention keys, which is why TuneLab writes kohya keys by default.
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
