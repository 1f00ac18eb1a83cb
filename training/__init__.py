"""Trainers: Dreambooth LoRA for SDXL (with optional pivotal tuning), and the shared run infrastructure in `common`.

Every trainer is a plain function over a config dataclass; the CLI, the nodes and the tests call the same function.
"""
