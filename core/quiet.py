"""Library noise TuneLab avoids or quiets on purpose, one named message at a time (never a blanket filter).

- diffusers' `torch_dtype` deprecation: `dtype_kwargs` passes `dtype=` where the installed diffusers takes it (the
  newest releases) and `torch_dtype=` where it does not (the floors), so neither warns nor drops the dtype.
- diffusers' "modules ... that should be kept in float32: []" on every `.to(dtype)`: dropped only when the list is
  empty; a model that really holds fp32 modules still warns.
- transformers' "`CLIPImageProcessor` requires torchvision (not installed); falling back to ..." for the image
  processors of pipeline parts TuneLab never runs (the safety checker's feature extractor, IP-Adapter image
  encoders); any other processor still warns.
- bitsandbytes' "Failed to load CPU gemm_4bit_forward from kernels-community" at import (peft imports it when it is
  installed): a 4-bit CPU kernel TuneLab never uses (8-bit AdamW does not touch it).

`install()` attaches the log filters (idempotent, cheap, imports nothing heavy); `core/__init__` calls it, so the
filters are in place before diffusers or transformers import their pipelines.
"""
from __future__ import annotations

import logging

UNUSED_IMAGE_PROCESSORS = ("CLIPImageProcessor", "SiglipImageProcessor")


class _Drop(logging.Filter):
    def __init__(self, name: str, test):
        super().__init__()
        self.tunelab_name, self.test = name, test

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            return not self.test(record.getMessage())
        except Exception:  # a filter must never break logging
            return True


def _empty_fp32_list(msg: str) -> bool:
    return "that should be kept in float32: []." in msg


def _unused_torchvision_processor(msg: str) -> bool:
    return "requires torchvision (not installed); falling back to" in msg and any(
        msg.startswith(f"`{name}` requires torchvision") for name in UNUSED_IMAGE_PROCESSORS)


def _unused_4bit_cpu_kernel(msg: str) -> bool:
    return msg.startswith("Failed to load CPU gemm_4bit_forward from kernels-community")


FILTERS = {
    "bitsandbytes.backends.cpu.ops": ("tunelab-unused-4bit-cpu-kernel", _unused_4bit_cpu_kernel),
    "diffusers.models.modeling_utils": ("tunelab-empty-fp32-list", _empty_fp32_list),
    "transformers.utils.import_utils": ("tunelab-unused-torchvision-processor", _unused_torchvision_processor),
}


def install() -> None:
    for logger_name, (name, test) in FILTERS.items():
        logger = logging.getLogger(logger_name)
        if not any(getattr(f, "tunelab_name", None) == name for f in logger.filters):
            logger.addFilter(_Drop(name, test))


_DTYPE_KWARG = None


def diffusers_takes_dtype() -> bool:
    """Whether diffusers' from_pretrained/from_single_file take `dtype` (they deprecate `torch_dtype` for it). Older
    releases would pass an unknown `dtype` on and load in fp32, so this probes for the release that added it."""
    global _DTYPE_KWARG
    if _DTYPE_KWARG is None:
        try:
            from diffusers.utils import deprecation_utils

            _DTYPE_KWARG = hasattr(deprecation_utils, "_resolve_dtype")
        except ImportError:
            _DTYPE_KWARG = False
    return _DTYPE_KWARG


def dtype_kwargs(dtype) -> dict:
    """{"dtype": dtype} or {"torch_dtype": dtype}, whichever the installed diffusers expects."""
    return {"dtype": dtype} if diffusers_takes_dtype() else {"torch_dtype": dtype}
