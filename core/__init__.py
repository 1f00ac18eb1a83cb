"""TuneLab engine: pure Python on diffusers, compel and peft. Never imports ComfyUI."""
from . import quiet as _quiet

_quiet.install()  # named library messages TuneLab quiets on purpose, before diffusers/transformers import
