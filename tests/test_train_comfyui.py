"""The trainer against real ComfyUI (marked comfyui; COMFYUI_PATH, see README): a DoRA LoRA maps fully in
ComfyUI's own LoRA loader, the train node streams its validation images as preview frames over /ws while it
trains (seen by TuneLab's queue client), and ComfyUI's interrupt leaves a complete checkpoint behind."""
import io
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from test_comfyui import API_DIR, RUN_TIMEOUT, _prepare, comfy, comfy_work  # noqa: E402,F401  (the server fixtures)
from test_comfyui_lora_keys import _PROBE  # noqa: E402
from test_train_lora import _write_dataset  # noqa: E402

from tunelab.core import queue_client as qc  # noqa: E402
from tunelab.training import common  # noqa: E402

pytestmark = pytest.mark.comfyui

_DORA_PROBE = _PROBE + r'''
import torch
ckpt = PATHS["ckpt"]
sd = comfy.utils.load_torch_file(ckpt)
prefix = "model.diffusion_model."
model = comfy.supported_models_base.BASE(comfy.model_detection.detect_unet_config(sd, prefix)).get_model(sd, prefix)
model.diffusion_model.load_state_dict({k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)},
                                      strict=False)
key_map = comfy.lora.model_lora_keys_unet(model, {})
lora = comfy.utils.load_torch_file(PATHS["lora"])
expected = comfy.utils.load_torch_file(PATHS["expected"])
records.clear()
patches = comfy.lora.load_lora(lora, key_map)
weights = model.state_dict()
worst, dora = 0.0, 0
for model_key, adapter in patches.items():
    w = weights[model_key].float()
    merged = adapter.calculate_weight(w.clone(), model_key, 1.0, 1.0, None, lambda a: a)
    base = next(k for k, v in key_map.items() if v == model_key and k + ".lora_down.weight" in lora)
    down, up = lora[base + ".lora_down.weight"].float(), lora[base + ".lora_up.weight"].float()
    dora += base + ".dora_scale" in lora
    adapted = expected[base].float()  # the weight as trained (peft's DoRA), computed by TuneLab
    worst = max(worst, float((merged - adapted).norm() / adapted.norm()))
print("RESULT " + json.dumps({"tensors": len(lora), "patched": len(patches), "dora_modules": dora,
                              "worst_relative_difference": worst,
                              "not_loaded": [r for r in records if "lora key not loaded" in r]}))
'''


def _trained_weights(handle, diffusers_copy, path):
    """{kohya module: W' = m (W + dW) / ||W + dW||} of each UNet DoRA module (peft's DoRA; the magnitudes from the
    diffusers copy, which holds peft's own), as a safetensors file."""
    import torch
    from safetensors.torch import save_file

    from tunelab.core import lora

    adapter = lora.load(handle, diffusers_copy).loras[-1].adapter
    out = {}
    with torch.no_grad():
        for name, layer in handle.pipe.unet.named_modules():
            mags = getattr(layer, "lora_magnitude_vector", None)
            if mags and adapter in mags:
                w = layer.get_base_layer().weight.float()
                merged = w + layer.get_delta_weight(adapter).float()
                m = mags[adapter].weight.float().reshape(-1, 1)
                out["lora_unet_" + name.replace(".", "_")] = (m * merged / merged.norm(dim=1, keepdim=True)).contiguous()
    lora.remove(handle.pipe, adapter)
    save_file(out, str(path))
    return path


def test_dora_lora_maps_fully_in_comfyui(tmp_path, tiny_sdxl):
    root = Path(os.environ["COMFYUI_PATH"])
    python = root / ".venv" / "bin" / "python"
    if not python.exists():
        pytest.skip(f"no ComfyUI environment at {python}")
    import ldm_layout
    from safetensors.torch import save_file

    from tunelab.training.lora_sdxl import LoraTrainConfig, train

    save_file(ldm_layout.pipeline_to_ldm(tiny_sdxl.pipe), str(tmp_path / "tiny_sdxl.safetensors"))
    data = _write_dataset(tmp_path / "data")
    r = train(LoraTrainConfig(data_dir=str(data), output=str(tmp_path / "dora.safetensors"), model=tiny_sdxl,
                              use_dora=True, resolution=64, train_batch_size=4, gradient_accumulation_steps=1,
                              learning_rate=3e-2, max_train_steps=4, checkpointing_steps=0, alpha=8,
                              save_diffusers_copy=True))
    paths = {"ckpt": str(tmp_path / "tiny_sdxl.safetensors"), "lora": str(r.lora_path),
             "expected": str(_trained_weights(tiny_sdxl, r.diffusers_path, tmp_path / "expected.safetensors"))}
    proc = subprocess.run([str(python), "-c", f"PATHS = {json.dumps(paths)}\n" + _DORA_PROBE], cwd=root,
                          env={**os.environ, "PYTHONPATH": str(root)}, capture_output=True, text=True, timeout=300)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    result = json.loads(lines[-1][len("RESULT "):])
    assert result["not_loaded"] == [] and result["patched"] == result["dora_modules"] == 64, result
    assert result["tensors"] == 4 * 64  # lora_down, lora_up, alpha and dora_scale per module, all used
    # ComfyUI applies the weights as they trained (its dora_scale convention is written; see core.adapters)
    print(f"DoRA in ComfyUI vs as trained: worst relative weight difference {result['worst_relative_difference']:.2e}")
    assert result["worst_relative_difference"] < 1e-5


def _train_graph(comfy, **inputs):
    graph = _prepare(API_DIR / "train_wrong_lora.json", comfy)
    node = next(k for k, v in graph.items() if v["class_type"] == "TuneLabTrainLora")
    graph[node]["inputs"].update(inputs)
    return graph, node


def test_train_node_streams_validation_previews_over_the_websocket(comfy):
    from PIL import Image

    graph, node = _train_graph(comfy, max_train_steps=3, validation_steps=1, validation_inference_steps=1)
    previews = []
    result = comfy.client().run(graph, timeout=RUN_TIMEOUT, on_preview=lambda kind, data: previews.append(
        (kind, Image.open(io.BytesIO(data)).size)))
    assert result.status == "success"
    # steps 1 and 2 during the run, step 3 after the LoRA is saved (the synthesis node before it sends none)
    # (ComfyUI scales previews to fit 512 px: one square image per validation here)
    assert len(previews) >= 3 and all(kind == "JPEG" and size[0] == size[1] for kind, size in previews[-3:]), previews


def test_comfyui_interrupt_saves_a_checkpoint(comfy):
    graph, node = _train_graph(comfy, max_train_steps=10_000, checkpointing_steps=0, validation_steps=0)
    client = comfy.client()
    pid, interrupted = [], threading.Event()

    def on_event(kind, data):
        if kind == "progress" and str(data.get("node")) == node and data.get("value", 0) >= 2 \
                and not interrupted.is_set():
            interrupted.set()
            client.interrupt(pid[0])

    with pytest.raises(qc.ExecutionInterrupted):
        client.run(graph, timeout=RUN_TIMEOUT, on_event=on_event, on_submit=pid.append)
    run_dir = comfy.output_dir / "tunelab" / "train" / graph[node]["inputs"]["lora_name"]
    saved = common.list_checkpoints(run_dir / "checkpoints")
    assert interrupted.is_set() and saved and saved[-1][0] >= 2, list(run_dir.rglob("*"))
