"""TuneLab engine: pure Python on diffusers, compel and peft. Never imports ComfyUI."""
