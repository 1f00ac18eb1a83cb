"""peft adapters on a pipe's models, with peft itself for the text encoders.

transformers' PEFT integration refuses peft releases below its own minimum: in transformers 5.24 `add_adapter`,
`set_adapter`, `enable/disable_adapters`, `active_adapters` and `delete_adapter` raise "please use a version >=
0.22.0" (newer than any peft the registry has), and which methods carry that gate changes between releases (diffusers
loads text-encoder LoRAs through transformers' `load_adapter`). So text-encoder adapters are injected, filled,
switched and removed here with peft's functions, whatever transformers says. The bookkeeping diffusers'
pipeline helpers read (`peft_config`, `_hf_peft_config_loaded`) is kept, so `get_list_adapters`, `set_adapters`,
`enable_lora` / `disable_lora` and `delete_adapters` keep working on every component. UNets stay on diffusers'
own adapter methods. Used by the LoRA loader (`lora.py`) and both trainers (`training/common.py`).
"""
from __future__ import annotations

import contextlib
import warnings
from typing import Iterable, Optional


@contextlib.contextmanager
def peft_notes_quiet():
    """Hide peft's notes that a model now holds several adapters and that deleting the active one activated
    another: both are how TuneLab works (one adapter per file; `lora.activate` picks the stack before each run)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*Already found a `peft_config` attribute.*")
        warnings.filterwarnings("ignore", message=".*which is now deleted.*")
        yield


def _is_diffusers_model(model) -> bool:
    from diffusers.models.modeling_utils import ModelMixin

    return isinstance(model, ModelMixin)


def tuner_layers(*models) -> list:
    """Every peft adapter layer (LoRA, DoRA ...) in `models`, in module order."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [m for model in models for m in model.modules() if isinstance(m, BaseTunerLayer)]


def names(model) -> list[str]:
    """The adapters `model` holds, in the order they were added."""
    cfg = getattr(model, "peft_config", None)
    return list(cfg) if isinstance(cfg, dict) else []


def lora_config(peft_state_dict: dict, alphas: Optional[dict] = None, **kwargs):
    """A peft LoraConfig for LoRA weights in PEFT keys (`<module>.lora_A.weight` ...): exactly the modules the
    weights name, each module's rank from its lora_A, its alpha from `alphas` ({module: alpha}) or, without one, the
    rank (the diffusers/PEFT convention of scale 1)."""
    import collections

    from peft import LoraConfig

    ranks = {k.split(".lora_A.")[0]: int(v.shape[0]) for k, v in peft_state_dict.items() if ".lora_A." in k}
    if not ranks:
        raise ValueError("no lora_A weights")
    module_alphas = {m: float((alphas or {}).get(m, r)) for m, r in ranks.items()}
    r = collections.Counter(ranks.values()).most_common(1)[0][0]
    alpha = collections.Counter(module_alphas.values()).most_common(1)[0][0]
    kwargs.setdefault("use_dora", any("lora_magnitude_vector" in k for k in peft_state_dict))  # DoRA weights
    return LoraConfig(r=r, lora_alpha=alpha, target_modules=sorted(ranks),
                      rank_pattern={m: v for m, v in ranks.items() if v != r},
                      alpha_pattern={m: v for m, v in module_alphas.items() if v != alpha}, **kwargs)


def add(model, config, name: str, state_dict: Optional[dict] = None) -> None:
    """Add the peft adapter `name` built from `config` to `model` (a diffusers UNet or a transformers text
    encoder) and, with `state_dict` (PEFT keys without the adapter name, as `get_peft_model_state_dict` gives them),
    fill it. Raises ValueError when the name is taken, a target is missing, or the weights do not fit."""
    if name in names(model):
        raise ValueError(f"an adapter named {name} already exists")
    with peft_notes_quiet():
        if _is_diffusers_model(model):
            model.add_adapter(config, adapter_name=name)
        else:
            from peft import inject_adapter_in_model

            inject_adapter_in_model(config, model, adapter_name=name)
            model._hf_peft_config_loaded = True  # what diffusers' helpers check before they touch peft_config
    if state_dict is not None:
        try:
            _fill(model, state_dict, name)
        except Exception:
            delete(model, name)
            raise


def _fill(model, state_dict: dict, name: str) -> None:
    from peft import set_peft_model_state_dict

    result = set_peft_model_state_dict(model, dict(state_dict), adapter_name=name)
    unexpected = [k for k in getattr(result, "unexpected_keys", ()) if "lora_" in k]
    missing = [k for k in getattr(result, "missing_keys", ()) if f".{name}." in k and "lora_" in k]
    if unexpected or missing:
        raise ValueError(f"the LoRA weights do not fit the model: {(unexpected or missing)[0]}"
                         f"{' and more' if len(unexpected) + len(missing) > 1 else ''}")


def set_active(model, active: Iterable[str]) -> None:
    """Make exactly `active` the active adapters of `model`, enabled."""
    active = list(active)
    if _is_diffusers_model(model):
        model.set_adapter(active if len(active) != 1 else active[0])
    for layer in tuner_layers(model):
        if not _is_diffusers_model(model):
            layer.set_adapter(active)
        layer.enable_adapters(True)


def delete(model, name: str) -> None:
    """Remove the adapter `name` from `model` (its weights and its config entry)."""
    with peft_notes_quiet():
        if _is_diffusers_model(model):
            model.delete_adapters(name)
            return
        for layer in tuner_layers(model):
            layer.delete_adapter(name)
    cfg = getattr(model, "peft_config", None)
    if isinstance(cfg, dict):
        cfg.pop(name, None)
        if not cfg:
            del model.peft_config
            model._hf_peft_config_loaded = False


# DoRA in kohya files. peft (and LyCORIS, and diffusers) scale each output row of W + dW to the learned magnitude
# m: m * (W + dW) / ||W + dW||. ComfyUI's LoraLoader (weight_decompose, output-axis `.dora_scale`) divides by the
# base weight's row norm instead: dora_scale * (W + dW) / ||W||. TuneLab's kohya files therefore hold
# dora_scale = m * ||W|| / ||W + dW||, so ComfyUI applies the trained weights exactly (metadata
# tunelab_dora_scale=base_norm); TuneLab's reader turns it back into m. The diffusers copy holds m itself.
DORA_SCALE_BASE_NORM = "base_norm"


def dora_norm_ratios(model, adapter: str) -> dict:
    """{module name: ||W|| / ||W + dW|| per output row, shape [out]} for every DoRA layer of `adapter` in `model`."""
    import torch

    out = {}
    for name, layer in model.named_modules():
        mags = getattr(layer, "lora_magnitude_vector", None)
        if not mags or adapter not in mags:
            continue
        with torch.no_grad():
            w = layer.get_base_layer().weight.float()
            merged = w + layer.get_delta_weight(adapter).float()
            rows = w.shape[0]
            out[name] = w.reshape(rows, -1).norm(dim=1) / merged.reshape(rows, -1).norm(dim=1).clamp_min(1e-12)
    return out


def dora_from_base_norm(model, adapter: str) -> int:
    """Turn the magnitudes of `adapter` (loaded from a base_norm kohya file) into peft's; returns the layers done."""
    import torch

    ratios = dora_norm_ratios(model, adapter)
    with torch.no_grad():
        for name, ratio in ratios.items():
            p = model.get_submodule(name).lora_magnitude_vector[adapter].weight
            p.copy_((p.float() / ratio.to(p.device)).to(p.dtype))
    return len(ratios)
