"""Model layer: caching, immutable handles, diffusers-folder refusals, and an import that loads nothing."""
import json
import os
import shutil
import subprocess
import sys

import pytest

from tunelab.core import models, tiny
from tunelab.core.errors import TuneLabError


def test_cache_returns_the_same_object(tiny_sdxl):
    assert models.load("tiny-sdxl", device="cpu", dtype="fp32") is tiny_sdxl
    assert models.load(" tiny-sdxl ", device="cpu", dtype="fp32") is tiny_sdxl
    folder = str(tiny.ensure("tiny-sdxl"))  # the same source by path is the same cache entry
    assert models.load(folder, device="cpu", dtype="fp32") is tiny_sdxl


def test_cache_keys_on_dtype(tiny_sd15):
    other = models.load("tiny-sd15", device="cpu", dtype="bf16")
    assert other is not tiny_sd15 and other.pipe is not tiny_sd15.pipe
    assert other is models.load("tiny-sd15", device="cpu", dtype="bf16")
    assert next(other.pipe.unet.parameters()).dtype.is_floating_point and other.dtype != tiny_sd15.dtype


def test_single_file_cached(tmp_path):
    from diffusers import StableDiffusionPipeline
    from safetensors.torch import save_file

    import ldm_layout

    clean = StableDiffusionPipeline.from_pretrained(str(tiny.ensure("tiny-sd15")), local_files_only=True)
    path = tmp_path / "sd15.safetensors"
    save_file(ldm_layout.pipeline_to_ldm(clean), str(path))
    first = models.load(str(path), device="cpu", dtype="fp32")
    assert first.family == "sd15" and first.sha256
    assert models.load(str(path), device="cpu", dtype="fp32") is first


def test_handles_are_immutable(tiny_sdxl):
    ref = models.LoraRef(adapter="a", weight=0.5, name="a.safetensors", sha256="x")
    with_lora = tiny_sdxl.with_lora(ref)
    assert with_lora.loras == (ref,) and tiny_sdxl.loras == ()
    assert with_lora.pipe is tiny_sdxl.pipe
    assert tiny_sdxl.family == "sdxl" and tiny_sdxl.is_sdxl
    assert tiny_sdxl.architecture == f"tiny SDXL base (cross-attention width {tiny.TE1_WIDTH + tiny.TE2_WIDTH})"


def test_bad_dtype_and_empty_source():
    with pytest.raises(TuneLabError, match="fp16 does not run on the CPU"):
        models.load("tiny-sdxl", device="cpu", dtype="fp16")
    with pytest.raises(TuneLabError, match="unknown dtype 'fp8'"):
        models.load("tiny-sdxl", device="cpu", dtype="fp8")
    with pytest.raises(TuneLabError, match="no model given"):
        models.load("  ", device="cpu", dtype="fp32")


@pytest.fixture
def sd15_copy(tmp_path):
    dst = tmp_path / "my-sd15"
    shutil.copytree(tiny.ensure("tiny-sd15"), dst)
    return dst


def test_diffusers_folder_with_only_bin_weights_refused(sd15_copy):
    for f in (sd15_copy / "unet").glob("*.safetensors"):
        f.rename(f.with_suffix(".bin"))
    with pytest.raises(TuneLabError) as e:
        models.load(str(sd15_copy), device="cpu", dtype="fp32")
    msg = str(e.value)
    assert e.value.input_name == "model" and str(sd15_copy / "unet") in msg
    assert "only pickle weights (diffusion_pytorch_model.bin)" in msg and "safetensors only" in msg


def test_diffusers_folder_missing_tokenizer_refused(sd15_copy):
    shutil.rmtree(sd15_copy / "tokenizer")
    with pytest.raises(TuneLabError) as e:
        models.load(str(sd15_copy), device="cpu", dtype="fp32")
    msg = str(e.value)
    assert "the tokenizer is missing" in msg
    assert str(sd15_copy / "tokenizer" / "vocab.json") in msg and str(sd15_copy / "tokenizer" / "merges.txt") in msg


def test_folder_without_model_index_refused(tmp_path):
    with pytest.raises(TuneLabError, match="is not a diffusers model folder: model_index.json is missing"):
        models.load(str(tmp_path), device="cpu", dtype="fp32")


_IMPORT_PROBE = r"""
import json, socket, sys
def _no_network(*a, **k):
    raise AssertionError("network access during import")
socket.socket.connect = _no_network
socket.create_connection = _no_network
socket.getaddrinfo = _no_network
import tunelab
from tunelab.core import models
print(json.dumps({"nodes": len(tunelab.NODE_CLASS_MAPPINGS), "cached": len(models._CACHE),
                  "modules": sorted(m for m in ("torch", "diffusers", "transformers", "compel", "peft")
                                    if m in sys.modules)}))
"""


def test_import_loads_no_model_and_touches_no_network(tmp_path):
    env = dict(os.environ, TUNELAB_CACHE=str(tmp_path / "cache"), HF_HUB_OFFLINE="1")
    out = subprocess.run([sys.executable, "-c", _IMPORT_PROBE], env=env, cwd=str(tmp_path), capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["nodes"] > 0 and report["cached"] == 0
    # No pipeline can have been built: the libraries that build one were never imported, and no tiny model was made.
    assert "diffusers" not in report["modules"] and "transformers" not in report["modules"], report
    assert not (tmp_path / "cache").exists()
