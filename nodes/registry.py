"""The one registry that builds NODE_CLASS_MAPPINGS / NODE_DISPLAY_NAME_MAPPINGS.

Each node module exposes `NODES = {node_id: (class, display name)}`. A module whose optional dependency is missing
is dropped with a warning naming the package, so one missing extra hides its nodes, not the pack.
"""
from __future__ import annotations

import importlib
import logging

log = logging.getLogger("tunelab")

# Module names under nodes/, in menu order.
MODULES = ["loader", "prompt", "native_prompt", "generate", "lora", "compare", "native_compare", "evaluate",
           "synthesis", "train", "instruct"]


def build() -> tuple[dict, dict]:
    classes, names = {}, {}
    for mod_name in MODULES:
        try:
            mod = importlib.import_module(f".{mod_name}", __package__)
        except ImportError as e:
            missing = getattr(e, "name", None) or str(e)
            log.warning("TuneLab: nodes in '%s' are disabled because '%s' is not installed "
                        "(pip install -r requirements.txt)", mod_name, missing)
            continue
        for node_id, (cls, display) in mod.NODES.items():
            assert node_id.startswith("TuneLab") and node_id not in classes, node_id
            classes[node_id] = cls
            names[node_id] = display
    return classes, names
