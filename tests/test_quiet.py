"""No library noise on an ordinary run: compare, edit and train-lora on the tiny presets, in a fresh interpreter
with FutureWarnings turned into errors, print none of the known noisy messages; the filters behind that drop only
those messages, so real problems still warn."""
import logging
import os
import subprocess
import sys
import textwrap

import numpy as np
from PIL import Image

from tunelab.core import quiet

NOISE = ("torch_dtype", "is_gradient_checkpointing", "kept in float32", "requires torchvision", "FutureWarning",
         "DeprecationWarning", "deprecated")


def test_compare_edit_and_train_lora_run_without_library_noise(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    rng = np.random.default_rng(0)
    for i in range(2):
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(data / f"{i}.png")
    Image.fromarray(rng.integers(0, 256, (48, 40, 3), dtype=np.uint8)).save(tmp_path / "in.png")
    script = textwrap.dedent(f"""
        from tunelab import cli
        runs = [
            ["compare", "--steps", "2", "--out", {str(tmp_path / "cmp")!r}],
            ["edit", "--image", {str(tmp_path / "in.png")!r}, "--instruction", "derain the image", "--steps", "2",
             "--out", {str(tmp_path / "out.png")!r}],
            ["train-lora", "--data", {str(data)!r}, "--out", {str(tmp_path / "l.safetensors")!r},
             "--max-train-steps", "2", "--gradient-accumulation-steps", "1", "--gradient-checkpointing"],
        ]
        for argv in runs:
            assert cli.main(argv + ["--device", "cpu"]) == 0, argv
    """)
    proc = subprocess.run([sys.executable, "-W", "error::FutureWarning", "-c", script], capture_output=True,
                          text=True, timeout=600, env={**os.environ, "PYTHONWARNINGS": "error::FutureWarning"})
    assert proc.returncode == 0, proc.stderr[-4000:]
    noisy = [line for line in proc.stderr.splitlines() if any(n in line for n in NOISE)]
    assert not noisy, "\n".join(noisy)
    assert (tmp_path / "cmp" / "grid.png").is_file() and (tmp_path / "l.safetensors").is_file()


def _emit(logger_name, message):
    quiet.install()
    seen = []

    class Keep(logging.Handler):
        def emit(self, record):
            seen.append(record.getMessage())

    logger = logging.getLogger(logger_name)
    handler = Keep()
    logger.addHandler(handler)
    try:
        logger.warning(message)
    finally:
        logger.removeHandler(handler)
    return seen


def test_filters_drop_only_the_named_messages():
    fp32 = ("There are modules in UNet2DConditionModel that should be kept in float32: {}. Casting directly with "
            "`to()` can lead to inconsistent results; set `torch_dtype` in `from_pretrained()` instead to keep "
            "these modules in float32.")
    assert _emit("diffusers.models.modeling_utils", fp32.format("[]")) == []
    assert _emit("diffusers.models.modeling_utils", fp32.format("['norm_out']")) == [fp32.format("['norm_out']")]
    tv = ("`{0}` requires torchvision (not installed); falling back to `{0}Pil` for backward compatibility. "
          "Install torchvision to use the default backend, or import `{0}Pil` directly to silence this warning.")
    assert _emit("transformers.utils.import_utils", tv.format("CLIPImageProcessor")) == []
    assert _emit("transformers.utils.import_utils", tv.format("SiglipImageProcessor")) == []
    assert _emit("transformers.utils.import_utils", tv.format("VideoMAEImageProcessor")) != []
    assert _emit("transformers.utils.import_utils", "something else went wrong") == ["something else went wrong"]
    quiet.install()  # idempotent
    assert sum(1 for f in logging.getLogger("diffusers.models.modeling_utils").filters
               if getattr(f, "tunelab_name", "")) == 1


def test_dtype_keyword_follows_the_installed_diffusers():
    import torch
    from diffusers.utils import deprecation_utils

    kw = quiet.dtype_kwargs(torch.float16)
    assert kw == ({"dtype": torch.float16} if hasattr(deprecation_utils, "_resolve_dtype")
                  else {"torch_dtype": torch.float16})
