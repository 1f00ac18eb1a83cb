"""TuneLab: ComfyUI nodes for weighted prompts, the SDXL "wrong" LoRA and instruction-tuned InstructPix2Pix.

ComfyUI imports this file from custom_nodes/<folder>/. Importing loads no model and touches no network.
"""
from .nodes.registry import build as _build

__version__ = "0.1.0"

NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS = _build()

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
