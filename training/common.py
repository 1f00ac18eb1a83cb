"""What every TuneLab trainer shares: checkpoints, resume, stop requests, the non-finite loss guard, progress with
the loss, the loss curve, and training adapters on a shared pipe that leave no trace.

Plain functions and two small classes; a trainer writes its own loop (diffusers' scripts are the model) and calls:

    acc = make_accelerator(mixed_precision, gradient_accumulation_steps, device)
    ckpt = load_checkpoint(find_checkpoint(run_dir / "checkpoints", "latest"), config=cfg, base=base_identity(h))
    with preserved(unet), training_adapter(unet, LoraConfig(...)), Control(progress, total, start=step) as ctl:
        ...  ctl.finite(loss) / ctl.stepped(loss) / ctl.stop_requested()
        save_checkpoint(run_dir / "checkpoints", step, weights=..., optimizer=..., lr_scheduler=..., ...)

Checkpoints never use pickle: tensors go to `state.safetensors`, everything else (optimizer hyper-parameters, the LR
scheduler, RNG states, the trainer's own state) to `state.json`. A checkpoint is written to a temporary folder,
renamed into place, verified by reopening, and only then gets its `COMPLETE` marker; older checkpoints are pruned
only after that. Resume refuses (with the reason) a missing, incomplete or foreign checkpoint; it never silently
starts over.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import random
import re
import shutil
import signal
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Optional

from ..core import adapters, progress as progress_mod
from ..core.errors import Interrupted, TuneLabError, ref, render_refs
from ..core.files import check_safetensors, write_text_atomic

log = logging.getLogger("tunelab")

CHECKPOINT_FORMAT = "tunelab-checkpoint/1"
MARKER = "COMPLETE"
STATE_TENSORS = "state.safetensors"
STATE_JSON = "state.json"
CHECKPOINT_NAME = re.compile(r"^checkpoint-(\d+)$")
TRAIN_ADAPTER = "tunelab_training"  # peft adapter name used while training; removed afterwards
MIXED_PRECISION = ("auto", "no", "fp16", "bf16")


# ---------------------------------------------------------------------------------------------------------------
# accelerate


MIN_RESOLUTION = 64


def is_tiny(model) -> bool:
    """A built-in tiny preset, by name or as a loaded pipe."""
    from ..core import tiny

    source = getattr(model, "source", model)
    return isinstance(source, str) and source in tiny.PRESETS


def training_resolution(resolution: Optional[int], model, sizes, real_default: int) -> int:
    """The resolution a trainer uses. An explicit value is kept. None means the trainer's default: `real_default`
    on real models; on the tiny presets the dataset's smallest side (rounded down to a multiple of 8, at least 64,
    at most `real_default`), so a dataset made on a tiny preset trains without size flags."""
    if resolution is not None:
        return resolution
    if not is_tiny(model) or not sizes:
        return real_default
    side = min(min(w, h) for w, h in sizes)
    return max(MIN_RESOLUTION, min(real_default, side - side % 8))


def check_upscale(sizes_by_name, resolution: int, allow_upscale: bool, input_name: str = "dataset") -> None:
    """The one rule of both trainers: images smaller than the training resolution are refused unless
    `allow_upscale` is set (then they are upscaled, with a warning)."""
    small = [(n, s) for n, s in sizes_by_name if min(s) < resolution]
    if small and not allow_upscale:
        shown = ", ".join(f"{n} ({w}x{h})" for n, (w, h) in small[:4]) + (", ..." if len(small) > 4 else "")
        smallest = min(min(s) for _, s in small)
        fit = max(MIN_RESOLUTION, smallest - smallest % 8)
        raise TuneLabError(f"{len(small)} image(s) are smaller than the training resolution {resolution}: {shown}. "
                           f"Upscaling blurs what the model learns; train at resolution {fit} or lower "
                           f"(--resolution {fit}), replace the images, or allow upscaling (allow_upscale, "
                           f"--allow-upscale)", input_name=input_name)
    if small:
        log.warning("TuneLab: upscaling %d image(s) smaller than %d px", len(small), resolution)


def resolve_mixed_precision(choice: str, device, weight_dtype=None) -> str:
    """"auto" follows the weights: fp16 weights -> "fp16", bf16 -> "bf16", else "no". fp16 on a CPU is refused."""
    import torch

    if choice not in MIXED_PRECISION:
        raise TuneLabError(f"unknown value '{choice}'; choose one of {', '.join(MIXED_PRECISION)}",
                           input_name="mixed_precision")
    dev = torch.device(device) if device is not None else None
    if choice == "auto":
        choice = {torch.float16: "fp16", torch.bfloat16: "bf16"}.get(weight_dtype, "no")
    if choice == "fp16" and dev is not None and dev.type == "cpu":
        raise TuneLabError("fp16 mixed precision needs a GPU; choose no or bf16 on the CPU",
                           input_name="mixed_precision")
    return choice


def make_accelerator(mixed_precision: str = "no", gradient_accumulation_steps: int = 1, device=None,
                     report_to: str = "none", logging_dir=None):
    """`accelerate.Accelerator` owning device, precision and gradient accumulation.

    In one process (a ComfyUI node, tests) runs follow each other with different settings; accelerate keeps its
    state per process and refuses a change, so a single-process state is reset before a new one is made.
    Under `accelerate launch` (several processes) the launcher's state is kept as is.
    """
    import torch
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, PartialState

    cpu = device is not None and torch.device(device).type == "cpu"
    kwargs = dict(mixed_precision=mixed_precision, gradient_accumulation_steps=int(gradient_accumulation_steps),
                  cpu=cpu)
    if report_to and report_to != "none":
        kwargs.update(log_with=report_to, project_dir=str(logging_dir) if logging_dir else None)
    try:
        return Accelerator(**kwargs)
    except ValueError as e:
        if "already been initialized" not in str(e) or PartialState().num_processes > 1:
            raise
        AcceleratorState._reset_state(reset_partial_state=True)
        return Accelerator(**kwargs)


# ---------------------------------------------------------------------------------------------------------------
# logging: accelerate's trackers (TensorBoard)

REPORT_TO = ("none", "tensorboard")


def check_report_to(value: str, input_name: str = "report_to") -> None:
    """Refuse an unknown tracker, or TensorBoard when it is not installed, before anything loads."""
    if value not in REPORT_TO:
        raise TuneLabError(f"unknown value '{value}'; choose one of {', '.join(REPORT_TO)}", input_name=input_name)
    if value == "tensorboard":
        try:
            import tensorboard  # noqa: F401
            from torch.utils import tensorboard as _tb  # noqa: F401
        except ImportError:
            raise TuneLabError("report_to=tensorboard needs the 'tensorboard' package, which is not installed in "
                               "this Python (pip install tensorboard); or choose none", input_name=input_name) from None


class Tracker:
    """Scalars and images to accelerate's trackers (`report_to`), from the main process only; a no-op for none.
    Logs go to <run_dir>/logs (open with `tensorboard --logdir <run_dir>/logs`)."""

    def __init__(self, accelerator, report_to: str, project: str, config: dict):
        self.accelerator = accelerator
        self.on = bool(report_to and report_to != "none")
        if self.on:
            plain = {k: v if isinstance(v, (int, float, str, bool)) else json.dumps(v, default=str)
                     for k, v in config.items()}
            accelerator.init_trackers(project, config=plain)

    def log(self, step: int, **values) -> None:
        if self.on:
            self.accelerator.log({k: float(v) for k, v in values.items() if v is not None}, step=int(step))

    def images(self, tag: str, images: list, step: int) -> None:
        if not (self.on and images and self.accelerator.is_main_process):
            return
        import numpy as np

        for tracker in self.accelerator.trackers:
            if tracker.name == "tensorboard":
                size = images[0].size
                arr = np.stack([np.asarray(im.convert("RGB").resize(size)) for im in images])
                tracker.writer.add_images(tag, arr, int(step), dataformats="NHWC")
                tracker.writer.flush()

    def close(self) -> None:
        if self.on:
            self.accelerator.end_training()
            self.on = False


# ---------------------------------------------------------------------------------------------------------------
# optimizers: AdamW (torch), 8-bit AdamW (bitsandbytes), Prodigy (prodigyopt); the last two are optional packages

OPTIMIZERS = ("adamw", "adamw8bit", "prodigy")
_OPTIMIZER_PACKAGES = {"adamw8bit": "bitsandbytes", "prodigy": "prodigyopt"}


def check_optimizer(name: str, input_name: str = "optimizer") -> None:
    """Refuse an unknown optimizer, or one whose package is missing, before anything loads."""
    if name not in OPTIMIZERS:
        raise TuneLabError(f"unknown optimizer '{name}'; choose one of {', '.join(OPTIMIZERS)}",
                           input_name=input_name)
    package = _OPTIMIZER_PACKAGES.get(name)
    if package is None:
        return
    import importlib

    try:
        importlib.import_module(package)
    except ImportError:
        raise TuneLabError(f"the {name} optimizer needs the '{package}' package, which is not installed in this "
                           f"Python; install it there (pip install {package}, or the pack's 'train' extra) or "
                           "choose adamw", input_name=input_name) from None


def scaled_lr(lr: float, scale: bool, batch_size: int, accumulation: int, processes: int) -> float:
    """--scale_lr of diffusers' scripts: the learning rate times the total batch (batch x accumulation x
    processes)."""
    return float(lr) * batch_size * accumulation * processes if scale else float(lr)


def make_optimizer(name: str, groups: list, *, betas: tuple, eps: float, device=None, fused: bool = True,
                   prodigy: Optional[dict] = None, input_name: str = "optimizer"):
    """The optimizer over parameter groups (each with its lr and weight_decay), as diffusers' scripts build it.

    adamw: torch's AdamW, fused (one kernel for a LoRA's hundreds of small tensors; same math) where the device
    allows. adamw8bit: bitsandbytes' AdamW8bit (8-bit state for tensors of 4096+ elements, as bitsandbytes decides),
    checked with one step on `device` first, so a build without support for it fails here with a clear message.
    prodigy: prodigyopt's Prodigy with `prodigy` settings (beta3, decouple, use_bias_correction, safeguard_warmup,
    d_coef); Prodigy estimates one step size for all groups, so every group must have the same lr."""
    import torch

    check_optimizer(name, input_name)
    if name == "adamw":
        if fused:
            try:
                return torch.optim.AdamW(groups, fused=True, betas=betas, eps=eps)
            except (RuntimeError, TypeError, ValueError):
                pass
        return torch.optim.AdamW(groups, foreach=True, betas=betas, eps=eps)
    if name == "adamw8bit":
        import bitsandbytes as bnb

        try:  # one step on a throwaway tensor: bitsandbytes builds differ in what devices they support
            probe = torch.nn.Parameter(torch.zeros(4096, device=device))
            probe.grad = torch.ones_like(probe)
            bnb.optim.AdamW8bit([probe]).step()
        except Exception as e:
            raise TuneLabError(f"bitsandbytes {getattr(bnb, '__version__', '')} cannot run 8-bit AdamW on "
                               f"{device or 'this device'} ({type(e).__name__}: {e}); choose adamw or prodigy",
                               input_name=input_name) from None
        return bnb.optim.AdamW8bit(groups, betas=betas, eps=eps)
    import prodigyopt

    lrs = {float(g["lr"]) for g in groups}
    if len(lrs) > 1:
        raise TuneLabError(f"Prodigy estimates one step size for every parameter group, so all groups need the "
                           f"same learning rate (got {sorted(lrs)})", input_name=input_name)
    p = dict(prodigy or {})
    return prodigyopt.Prodigy(groups, betas=betas, eps=eps, beta3=p.get("beta3"),
                              decouple=bool(p.get("decouple", True)),
                              use_bias_correction=bool(p.get("use_bias_correction", True)),
                              safeguard_warmup=bool(p.get("safeguard_warmup", True)),
                              d_coef=float(p.get("d_coef", 1.0)))


# ---------------------------------------------------------------------------------------------------------------
# tensors + JSON packing (what replaces pickle in a checkpoint)


def pack(obj, tensors: dict, prefix: str):
    """A JSON-able copy of `obj` with every tensor moved into `tensors` (key -> CPU tensor) and referenced by key.
    Dict keys keep their type (optimizer state is keyed by int), tuples stay tuples, numpy arrays come back."""
    import numpy as np
    import torch

    if torch.is_tensor(obj):
        t = obj.detach()
        t = t.to("cpu").contiguous() if t.device.type != "cpu" else t.clone().contiguous()
        tensors[prefix] = t
        return {"__tensor__": prefix}
    if isinstance(obj, np.ndarray):
        tensors[prefix] = torch.from_numpy(obj.astype(np.int64) if obj.dtype.kind in "ui" else obj.copy())
        return {"__ndarray__": prefix, "dtype": str(obj.dtype)}
    if isinstance(obj, dict):
        return {"__dict__": [[k, pack(v, tensors, f"{prefix}.{i}")] for i, (k, v) in enumerate(obj.items())]}
    if isinstance(obj, tuple):
        return {"__tuple__": [pack(v, tensors, f"{prefix}.{i}") for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [pack(v, tensors, f"{prefix}.{i}") for i, v in enumerate(obj)]
    if isinstance(obj, (bool, int, float, str)) or obj is None:
        return obj
    if isinstance(obj, (np.integer, np.floating, np.bool_)):
        return obj.item()
    raise TypeError(f"cannot store a {type(obj).__name__} in a checkpoint ({prefix})")


def unpack(obj, tensors: dict):
    import numpy as np

    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return tensors[obj["__tensor__"]]
        if "__ndarray__" in obj:
            return tensors[obj["__ndarray__"]].numpy().astype(np.dtype(obj["dtype"]))
        if "__dict__" in obj:
            return {(tuple(k) if isinstance(k, list) else k): unpack(v, tensors) for k, v in obj["__dict__"]}
        if "__tuple__" in obj:
            return tuple(unpack(v, tensors) for v in obj["__tuple__"])
        return {k: unpack(v, tensors) for k, v in obj.items()}
    if isinstance(obj, list):
        return [unpack(v, tensors) for v in obj]
    return obj


# ---------------------------------------------------------------------------------------------------------------
# RNG


def rng_state(generators: Optional[dict] = None) -> dict:
    """Global torch (CPU and CUDA), Python and numpy RNG states, plus named `torch.Generator`s."""
    import numpy as np
    import torch

    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = list(torch.cuda.get_rng_state_all())
    state["generators"] = {name: g.get_state() for name, g in (generators or {}).items()}
    return state


def set_rng_state(state: dict, generators: Optional[dict] = None) -> None:
    import numpy as np
    import torch

    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if state.get("cuda") and torch.cuda.is_available():
        cuda = state["cuda"]
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)
        else:
            log.warning("TuneLab: the checkpoint has CUDA RNG states for %d devices, this machine has %d; CUDA RNG "
                        "not restored (training noise is drawn from TuneLab's own generators, so this only matters "
                        "for dropout)", len(cuda), torch.cuda.device_count())
    saved = state.get("generators") or {}
    for name, g in (generators or {}).items():
        if name not in saved:
            raise TuneLabError(f"the checkpoint has no state for the '{name}' random generator", input_name="resume")
        g.set_state(saved[name])


# ---------------------------------------------------------------------------------------------------------------
# identity: the config and the base model a checkpoint belongs to


def config_hash(config: dict) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()


def config_diff(saved: dict, current: dict) -> list:
    """['rank: 4 -> 8', ...] for every key whose value differs."""
    out = []
    for k in sorted(set(saved) | set(current)):
        a, b = saved.get(k, "<absent>"), current.get(k, "<absent>")
        if json.dumps(a, sort_keys=True, default=str) != json.dumps(b, sort_keys=True, default=str):
            out.append(f"{k}: {a!r} -> {b!r}")
    return out


_PROBES = ("conv_in.weight", "conv_out.weight")


def base_identity(handle) -> dict:
    """What identifies the base model a run trains on: family, source, file hash, and a probe of weights sampled
    across a few UNet tensors (compared with a tolerance, so fp16/bf16/fp32 loads of one model agree)."""
    import torch

    unet = handle.pipe.unet
    # names without peft's ".base_layer": a layer wrapped by an earlier LoRA is the same weight
    named = {n.replace(".base_layer", ""): p for n, p in unet.named_parameters() if ".lora_" not in n}
    names = [n for n in _PROBES if n in named]
    names += sorted(n for n in named if n.endswith("attn2.to_k.weight"))[:1]
    probe = {}
    with torch.no_grad():
        for n in names:
            flat = named[n].detach().flatten()
            idx = torch.linspace(0, flat.numel() - 1, steps=min(16, flat.numel())).long().to(flat.device)
            probe[n] = [float(v) for v in flat[idx].float().cpu()]
    return {"family": handle.family, "source": str(handle.source), "sha256": handle.sha256 or "",
            "cross_attention_dim": int(unet.config.cross_attention_dim), "probe": probe}


def check_base(saved: dict, current: dict, path) -> None:
    where = f"the checkpoint {path}"
    if saved.get("family") != current.get("family") or \
            saved.get("cross_attention_dim") != current.get("cross_attention_dim"):
        raise TuneLabError(f"{where} was trained on a {saved.get('family')} model ({saved.get('source')}), but this "
                           f"run uses a {current.get('family')} model ({current.get('source')}); resume with the "
                           "same base model", input_name="resume")
    a, b = saved.get("probe") or {}, current.get("probe") or {}
    same = set(a) == set(b) and all(
        len(a[k]) == len(b[k]) and all(abs(x - y) <= 1e-3 + 1e-2 * abs(y) for x, y in zip(a[k], b[k])) for k in a)
    if not same:
        raise TuneLabError(f"{where} was trained on {saved.get('source')} (sha256 {saved.get('sha256') or 'n/a'}), "
                           f"but this run's base model {current.get('source')} has different weights; resume with "
                           "the model the run started with", input_name="resume")


# ---------------------------------------------------------------------------------------------------------------
# checkpoints


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # Windows cannot open folders; the rename is still atomic
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def is_complete(path) -> bool:
    return (Path(path) / MARKER).is_file()


def list_checkpoints(folder) -> list:
    """[(step, path)] of complete checkpoints in `folder`, oldest first; other entries are ignored."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = []
    for p in folder.iterdir():
        m = CHECKPOINT_NAME.match(p.name)
        if m and p.is_dir() and is_complete(p):
            found.append((int(m.group(1)), p))
    return sorted(found)


def verify_checkpoint(path) -> dict:
    """Reopen a checkpoint and check it against its own manifest: the JSON parses, the safetensors file is whole
    and holds exactly the listed tensors with their shapes. Returns the JSON document."""
    from safetensors import safe_open

    path = Path(path)
    try:
        doc = json.loads((path / STATE_JSON).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise TuneLabError(f"{path / STATE_JSON} is unreadable ({e})", input_name="resume") from None
    if doc.get("format") != CHECKPOINT_FORMAT:
        raise TuneLabError(f"{path} is not a TuneLab checkpoint ({STATE_JSON} has format {doc.get('format')!r})",
                           input_name="resume")
    check_safetensors(path / STATE_TENSORS, "resume")
    manifest = doc.get("tensors") or {}
    with safe_open(str(path / STATE_TENSORS), framework="pt") as f:
        keys = set(f.keys())
        if keys != set(manifest):
            raise TuneLabError(f"{path / STATE_TENSORS} holds {len(keys)} tensors but the manifest lists "
                               f"{len(manifest)}", input_name="resume")
        for k in keys:
            if list(f.get_slice(k).get_shape()) != manifest[k][0]:
                raise TuneLabError(f"{path / STATE_TENSORS}: tensor {k} has the wrong shape", input_name="resume")
    return doc


def save_checkpoint(folder, step: int, *, weights: dict, optimizer=None, lr_scheduler=None, scaler=None,
                    generators: Optional[dict] = None, state: Optional[dict] = None, config: Optional[dict] = None,
                    base: Optional[dict] = None, keep: Optional[int] = 2) -> Path:
    """Write `folder/checkpoint-<step>`: trainable `weights` (name -> tensor), optimizer, LR scheduler, grad scaler,
    RNG states (global + named generators), the trainer's `state` (JSON-able, may hold tensors), the `config` it
    belongs to and the `base` model identity. Temp folder -> rename -> verify -> COMPLETE marker -> prune to the
    newest `keep` complete checkpoints (None keeps all)."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / f"checkpoint-{int(step):06d}"
    tensors: dict = {}
    doc = {
        "format": CHECKPOINT_FORMAT,
        "step": int(step),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "config": config or {},
        "config_hash": config_hash(config or {}),
        "base": base or {},
        "weights": pack(dict(weights), tensors, "weights"),
        "optimizer": pack(optimizer.state_dict(), tensors, "optimizer") if optimizer is not None else None,
        "lr_scheduler": pack(lr_scheduler.state_dict(), tensors, "lr_scheduler") if lr_scheduler is not None else None,
        "scaler": pack(scaler.state_dict(), tensors, "scaler") if scaler is not None else None,
        "rng": pack(rng_state(generators), tensors, "rng"),
        "state": pack(state or {}, tensors, "state"),
    }
    doc["tensors"] = {k: [list(v.shape), str(v.dtype)] for k, v in tensors.items()}
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=folder))
    try:
        save_file(tensors, str(tmp / STATE_TENSORS), metadata={"format": "pt", "tunelab": CHECKPOINT_FORMAT})
        (tmp / STATE_JSON).write_text(json.dumps(doc, indent=1), encoding="utf-8")
        _fsync_file(tmp / STATE_TENSORS)
        _fsync_file(tmp / STATE_JSON)
        old = None
        if final.exists():  # a save of this very step (e.g. cut short); set aside, removed once the new one is in
            old = folder / f".{final.name}.{os.getpid()}.old"
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
        os.replace(tmp, final)
        _fsync_dir(folder)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    verify_checkpoint(final)
    files = {name: (final / name).stat().st_size for name in (STATE_TENSORS, STATE_JSON)}
    write_text_atomic(final / MARKER, json.dumps({"step": int(step), "files": files}) + "\n")
    prune_checkpoints(folder, keep)
    return final


def prune_checkpoints(folder, keep: Optional[int]) -> list:
    """Remove complete checkpoints beyond the newest `keep`, and leftovers of interrupted saves (temporary folders,
    checkpoints without a marker older than the newest complete one). Never touches anything else."""
    folder = Path(folder)
    complete = list_checkpoints(folder)
    removed = []
    if keep is not None and keep >= 1:
        for _, p in complete[:-keep]:
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    newest = complete[-1][0] if complete else None
    for p in folder.iterdir() if folder.is_dir() else ():
        m = CHECKPOINT_NAME.match(p.name)
        stale_tmp = p.is_dir() and p.name.startswith(".checkpoint-") and p.name.endswith((".tmp", ".old"))
        partial = m and p.is_dir() and not is_complete(p) and newest is not None and int(m.group(1)) < newest
        if stale_tmp or partial:
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    return removed


def find_checkpoint(folder, resume) -> Path:
    """The checkpoint to resume from: `resume` is "latest" (the newest complete one in `folder`) or a path (a
    checkpoint folder, or a folder of checkpoints: its newest). Anything else is refused with the reason."""
    folder = Path(folder)
    if resume is None or str(resume).strip() in ("", "none"):
        raise TuneLabError("no checkpoint requested", input_name="resume")
    resume = str(resume).strip()
    if resume == "latest":
        found = list_checkpoints(folder)
        if not found:
            partial = sorted(p.name for p in folder.iterdir() if CHECKPOINT_NAME.match(p.name)) \
                if folder.is_dir() else []
            why = (f"; {', '.join(partial)} {'is' if len(partial) == 1 else 'are'} incomplete (no {MARKER} marker: "
                   "the save was cut short)") if partial else ""
            raise TuneLabError(f"{folder} holds no complete checkpoint{why}. Start without {ref('resume')}, or give "
                               "the path of a checkpoint", input_name="resume", value="latest")
        return found[-1][1]
    path = Path(resume).expanduser()
    if not path.exists():
        raise TuneLabError(f"checkpoint not found: {path}", input_name="resume")
    if path.is_dir() and not is_complete(path):
        inner = list_checkpoints(path)
        if inner:
            return inner[-1][1]
        if (path / STATE_JSON).exists() or CHECKPOINT_NAME.match(path.name):
            raise TuneLabError(f"{path} is an incomplete checkpoint (no {MARKER} marker: the save was cut short); "
                               "resume from an older one", input_name="resume")
        raise TuneLabError(f"{path} is not a checkpoint and holds no complete checkpoint", input_name="resume")
    if not path.is_dir():
        raise TuneLabError(f"{path} is a file; give a checkpoint folder (checkpoint-N) or 'latest'",
                           input_name="resume")
    return path


@dataclass
class Checkpoint:
    path: Path
    step: int
    weights: dict  # name -> CPU tensor
    state: dict  # the trainer's own state
    config: dict
    doc: dict = field(repr=False, default_factory=dict)
    tensors: dict = field(repr=False, default_factory=dict)

    def load_weights(self, params: dict) -> None:
        """Copy the saved weights into `params` (name -> parameter); the names and shapes must match exactly."""
        import torch

        missing, extra = sorted(set(params) - set(self.weights)), sorted(set(self.weights) - set(params))
        if missing or extra:
            raise TuneLabError(f"{self.path} does not match this run's trainable weights (missing {missing[:3]}, "
                               f"unexpected {extra[:3]})", input_name="resume")
        with torch.no_grad():
            for name, p in params.items():
                src = self.weights[name]
                if tuple(src.shape) != tuple(p.shape):
                    raise TuneLabError(f"{self.path}: '{name}' has shape {tuple(src.shape)}, this run has "
                                       f"{tuple(p.shape)}", input_name="resume")
                p.copy_(src.to(device=p.device, dtype=p.dtype))

    def restore(self, *, optimizer=None, lr_scheduler=None, scaler=None, generators: Optional[dict] = None) -> None:
        """Load optimizer, LR scheduler, grad scaler and RNG states (global and the named generators)."""
        if optimizer is not None:
            optimizer.load_state_dict(unpack(self.doc["optimizer"], self.tensors))
        if lr_scheduler is not None:
            lr_scheduler.load_state_dict(unpack(self.doc["lr_scheduler"], self.tensors))
        if scaler is not None and self.doc.get("scaler") is not None:
            scaler.load_state_dict(unpack(self.doc["scaler"], self.tensors))
        set_rng_state(unpack(self.doc["rng"], self.tensors), generators)


def load_checkpoint(path, *, config: Optional[dict] = None, base: Optional[dict] = None) -> Checkpoint:
    """Open and validate a checkpoint: complete, intact, made with the same `config` (every key must match; leave
    run-length keys such as max_train_steps out of it) and the same `base` model."""
    from safetensors.torch import load_file

    path = Path(path)
    if not is_complete(path):
        raise TuneLabError(f"{path} is an incomplete checkpoint (no {MARKER} marker)", input_name="resume")
    doc = verify_checkpoint(path)
    if config is not None:
        diff = config_diff(doc.get("config") or {}, config)
        if diff:
            raise TuneLabError(f"the checkpoint {path} was made with other settings ({'; '.join(diff[:6])}); "
                               "resume with the settings it was made with, or start without resume",
                               input_name="resume")
    if base is not None:
        check_base(doc.get("base") or {}, base, path)
    tensors = load_file(str(path / STATE_TENSORS))
    return Checkpoint(path=path, step=int(doc["step"]), weights=unpack(doc["weights"], tensors),
                      state=unpack(doc["state"], tensors), config=doc.get("config") or {}, doc=doc, tensors=tensors)


# ---------------------------------------------------------------------------------------------------------------
# stop requests, the non-finite guard and the progress bar


class Control:
    """One run's progress bar (with the smoothed loss), stop requests and non-finite loss guard.

    Stop requests: ComfyUI's interrupt (through the progress object), and Ctrl-C / SIGTERM when the run owns the
    main thread (the CLI); a second Ctrl-C aborts at once. The trainer checks `stop_requested()` at each step
    boundary, saves a checkpoint and calls `interrupted(...)`.
    """

    def __init__(self, progress=None, total: int = 1, *, start: int = 0, desc: str = "train",
                 max_nonfinite: int = 5, ema_beta: float = 0.9):
        self._factory = progress
        self.total, self.start, self.desc = int(total), int(start), desc
        self.max_nonfinite = max(1, int(max_nonfinite))
        self.nonfinite_in_row = 0
        self.nonfinite_total = 0
        self.ema_beta = ema_beta
        self.ema: Optional[float] = None
        self._ema_n = 0
        self._raw_ema = 0.0
        self.bar = None
        self._signal: Optional[str] = None
        self._host_stop: Optional[BaseException] = None  # ComfyUI's interrupt, raised from inside a bar update
        self._saved_handlers: dict = {}

    # context
    def __enter__(self):
        self.bar = progress_mod.make(self._factory, self.total, self.desc)
        if self.start:
            self.bar.update(self.start)
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, getattr(signal, "SIGTERM", None)):
                if sig is None:
                    continue
                try:
                    self._saved_handlers[sig] = signal.signal(sig, self._on_signal)
                except (ValueError, OSError):  # not allowed here (embedded interpreter)
                    pass
        return self

    def __exit__(self, *exc):
        for sig, handler in self._saved_handlers.items():
            with contextlib.suppress(ValueError, OSError):
                signal.signal(sig, handler)
        self._saved_handlers.clear()
        if self.bar is not None:
            self.bar.close()
        return False

    def _on_signal(self, signum, frame):
        name = signal.Signals(signum).name
        if self._signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # second Ctrl-C: stop now, without a checkpoint
        self._signal = name
        log.warning("TuneLab: %s received; saving a checkpoint at the next step boundary (Ctrl-C again aborts "
                    "at once)", name)

    # stop requests
    def stop_requested(self) -> bool:
        return self._signal is not None or self._host_stop is not None or \
            bool(self.bar is not None and self.bar.interrupted())

    def _to_bar(self, call) -> None:
        """Update the bar. ComfyUI's progress hook raises its interrupt from inside the update (and clears the
        flag); that is kept as a stop request, so the step boundary still saves a checkpoint first."""
        try:
            call()
        except Exception as e:
            if type(e).__name__ != "InterruptProcessingException":
                raise
            self._host_stop = e

    def preview(self, image) -> None:
        """Show a PIL image in the progress (ComfyUI's node preview); best effort."""
        if self.bar is not None and image is not None and hasattr(self.bar, "preview"):
            self._to_bar(lambda: self.bar.preview(image))

    def check(self) -> None:
        """Before training starts (nothing to save yet): raise if a stop was requested."""
        if self.stop_requested():
            self._raise_interrupted("interrupted before training started; nothing was saved")

    def interrupted(self, step: int, checkpoint) -> None:
        """Raise after the checkpoint at `step` was saved (ComfyUI's own interrupt inside ComfyUI)."""
        where = f"; checkpoint saved at {checkpoint}, resume with {ref('resume')} latest" if checkpoint else ""
        log.warning("TuneLab: training interrupted at step %d%s", step, render_refs(where))
        self._raise_interrupted(f"training interrupted at step {step}{where}")

    def _raise_interrupted(self, message: str) -> None:
        if self._host_stop is not None:
            raise self._host_stop  # ComfyUI's own interrupt: the run ends as interrupted, the checkpoint is saved
        if self._signal is None and self.bar is not None:
            try:
                self.bar.check()  # inside ComfyUI this raises ComfyUI's interrupt, so the run ends as interrupted
            except Interrupted:
                pass  # ours: raised below with the step and the checkpoint in the message
        raise Interrupted(message)

    # losses
    def finite(self, loss) -> bool:
        """False (and counted) when the loss is NaN or infinite: the trainer skips that step."""
        value = float(loss.detach().float().item()) if hasattr(loss, "detach") else float(loss)
        if math.isfinite(value):
            self.nonfinite_in_row = 0
            return True
        self.nonfinite_in_row += 1
        self.nonfinite_total += 1
        log.warning("TuneLab: non-finite loss (%s), step skipped (%d in a row, limit %d)", value,
                    self.nonfinite_in_row, self.max_nonfinite)
        return False

    @property
    def too_many_nonfinite(self) -> bool:
        return self.nonfinite_in_row >= self.max_nonfinite

    def nonfinite_error(self, step: int, checkpoint) -> TuneLabError:
        where = f"; the last good state is saved at {checkpoint}" if checkpoint else ""
        return TuneLabError(
            f"the loss was NaN or infinite {self.nonfinite_in_row} times in a row at step {step}, so training "
            f"stopped{where} and no LoRA was written. Lower the learning rate, use bf16 or fp32 instead of fp16, "
            "or use the fp16-fix VAE (the stock SDXL VAE overflows in fp16)", input_name="learning_rate")

    def stepped(self, loss: float) -> None:
        """One optimizer step done: update the smoothed loss and the bar."""
        self._ema_n += 1
        self._raw_ema = self.ema_beta * self._raw_ema + (1 - self.ema_beta) * float(loss)
        self.ema = self._raw_ema / (1 - self.ema_beta ** self._ema_n)
        if self.bar is not None:
            self._to_bar(lambda: self.bar.update(1, info=f"loss {self.ema:.4f}"))


# ---------------------------------------------------------------------------------------------------------------
# modules of a shared pipe: train on them, leave no trace


@contextlib.contextmanager
def preserved(*modules):
    """Restore each module's train/eval mode, every parameter's requires_grad and gradient checkpointing on exit,
    so training on a shared (cached) pipe leaves it as it was. `None` entries are skipped."""
    saved = []
    for m in modules:
        if m is None:
            continue
        # by parameter object, not name: peft wraps a targeted layer (to_q.weight -> to_q.base_layer.weight) and
        # the wrapper stays after its adapter is deleted
        saved.append((m, m.training, [(p, p.requires_grad) for p in m.parameters()], _checkpointing(m)))
    try:
        yield
    finally:
        for m, training, grads, checkpointing in saved:
            m.train(training)
            for p, flag in grads:
                p.requires_grad_(flag)
            if _checkpointing(m) != checkpointing:
                with contextlib.suppress(Exception):
                    (m.enable_gradient_checkpointing if checkpointing else m.disable_gradient_checkpointing)()


def _checkpointing(module) -> bool:
    """Whether gradient checkpointing is on: transformers 5 renamed `is_gradient_checkpointing` (now a deprecated
    alias that warns) to `is_activation_checkpointing`; diffusers models and older transformers have the old name."""
    name = ("is_activation_checkpointing" if hasattr(type(module), "is_activation_checkpointing")
            else "is_gradient_checkpointing")
    return bool(getattr(module, name, False))


def activate_adapter(model, name: str = TRAIN_ADAPTER) -> None:
    """Make `name` the only active adapter of `model`, enabled, with its weights trainable."""
    adapters.set_active(model, [name])
    # peft's set_adapter flags the active adapter's weights trainable; say it explicitly (validation may toggle it)
    for n, p in model.named_parameters():
        if f".{name}." in n or n.endswith(f".{name}"):
            p.requires_grad_(True)


@contextlib.contextmanager
def training_adapter(model, config, name: str = TRAIN_ADAPTER, input_name: str = "target_modules"):
    """Add a fresh PEFT adapter to `model` (a diffusers UNet or a transformers text encoder, built by
    `core.adapters` so transformers' PEFT version gate plays no part), make it the only active one, and on exit
    delete it and restore the adapters that were there before (active set, enabled or not).
    The base weights' requires_grad is the caller's business (use `preserved`)."""
    layers_before = adapters.tuner_layers(model)
    was_enabled = not any(getattr(layer, "disable_adapters", False) for layer in layers_before)
    was_active = list(layers_before[0].active_adapters) if layers_before else []
    if name in adapters.names(model):  # left by a run that crashed without cleaning up
        adapters.delete(model, name)
    try:
        adapters.add(model, config, name)
    except ValueError as e:
        raise TuneLabError(f"{e}", input_name=input_name) from None
    try:
        activate_adapter(model, name)
        yield model
    finally:
        adapters.delete(model, name)
        others = adapters.names(model)
        if others:
            active = [a for a in was_active if a in others] or others[:1]
            with contextlib.suppress(Exception):
                adapters.set_active(model, active)
            for layer in adapters.tuner_layers(model):
                layer.enable_adapters(was_enabled)


# ---------------------------------------------------------------------------------------------------------------
# the loss curve


def smooth(values: Iterable[float], beta: float = 0.9) -> list:
    """Bias-corrected exponential moving average (what the progress bar shows); non-finite values are skipped."""
    out, avg, n = [], 0.0, 0
    for v in values:
        v = float(v)
        if math.isfinite(v):
            n += 1
            avg = beta * avg + (1 - beta) * v
        out.append(avg / (1 - beta ** n) if n else float("nan"))
    return out


def loss_curve_image(losses, *, title: str = "training loss", width: int = 640, height: int = 360,
                     first_step: int = 1):
    """A PIL plot of per-step losses (light) and their moving average (dark). No plotting library needed."""
    from PIL import Image, ImageDraw

    from ..core.images import _font

    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    font = _font(12)
    left, right, top, bottom = 60, 16, 28, 36
    draw.text((left, 6), title, fill="black", font=font)
    values = [float(v) for v in losses]
    finite = [v for v in values if math.isfinite(v)]
    x0, x1, y0, y1 = left, width - right, top, height - bottom
    draw.rectangle([x0, y0, x1, y1], outline=(120, 120, 120))
    if not finite:
        draw.text((x0 + 10, (y0 + y1) // 2), "no steps yet", fill="gray", font=font)
        return img
    lo, hi = min(finite), max(finite)
    if hi - lo < 1e-12:
        lo, hi = lo - 0.5 * abs(lo or 1), hi + 0.5 * abs(hi or 1)
    pad = 0.05 * (hi - lo)
    lo, hi = lo - pad, hi + pad
    n = len(values)

    def xy(i, v):
        x = x0 + (x1 - x0) * (i / max(n - 1, 1))
        y = y1 - (y1 - y0) * ((v - lo) / (hi - lo))
        return (x, y)

    for k in range(5):  # horizontal grid lines with labels
        v = lo + (hi - lo) * k / 4
        _, y = xy(0, v)
        draw.line([x0, y, x1, y], fill=(230, 230, 230))
        draw.text((4, y - 7), f"{v:.4g}", fill="black", font=font)
    for k in range(5):  # step ticks
        i = round((n - 1) * k / 4) if n > 1 else 0
        x, _ = xy(i, lo)
        draw.line([x, y1, x, y1 + 4], fill="black")
        draw.text((x - 10, y1 + 8), str(first_step + i), fill="black", font=font)
    draw.text((x1 - 30, y1 + 20), "step", fill="black", font=font)
    for series, colour, w in ((values, (170, 190, 230), 1), (smooth(values), (20, 60, 160), 2)):
        pts = [xy(i, v) for i, v in enumerate(series) if math.isfinite(v)]
        if len(pts) == 1:
            x, y = pts[0]
            draw.ellipse([x - 2, y - 2, x + 2, y + 2], fill=colour)
        elif pts:
            draw.line(pts, fill=colour, width=w)
    draw.text((x1 - 200, 6), f"last {values[-1]:.4g}  smoothed {smooth(values)[-1]:.4g}", fill=(20, 60, 160),
              font=font)
    return img


def save_loss_curve(losses, path, *, title: str = "training loss", metadata: Optional[dict] = None):
    """Write the loss curve PNG atomically; returns (path, PIL image)."""
    from ..core.images import save_png

    img = loss_curve_image(losses, title=title)
    meta = {"losses": json.dumps([round(float(v), 6) if math.isfinite(v) else None for v in losses])}
    meta.update(metadata or {})
    return save_png(img, path, meta), img


def image_row(images: list):
    """PIL images side by side (one validation, as a progress preview); None for none."""
    from PIL import Image

    if not images:
        return None
    w, h = images[0].size
    row = Image.new("RGB", (w * len(images), h), "white")
    for k, im in enumerate(images):
        row.paste(im.convert("RGB").resize((w, h)), (k * w, 0))
    return row


VALIDATION_NAME = re.compile(r"^step-(\d+)-(\d+)\.png$")


def validation_grid(folder, last_step: int, path, caption: str = ""):
    """(PIL grid, path) of the validation images saved as <folder>/step-<step>-<nn>.png: one row per step up to
    `last_step` (a resumed run's earlier steps included), written atomically to `path`; (None, None) when there
    are none."""
    from PIL import Image

    from ..core.images import labelled_grid, save_png

    folder = Path(folder)
    rows: dict = {}
    for p in sorted(folder.glob("step-*-*.png")) if folder.is_dir() else []:
        m = VALIDATION_NAME.match(p.name)
        if m and int(m.group(1)) <= last_step:
            rows.setdefault(int(m.group(1)), []).append(p)
    if not rows:
        return None, None
    cols = max(len(v) for v in rows.values())
    images, labels = [], []
    for step in sorted(rows):
        for k in range(cols):
            if k < len(rows[step]):
                with Image.open(rows[step][k]) as im:
                    images.append(im.convert("RGB"))
            else:
                images.append(Image.new("RGB", images[-1].size, "white"))
            labels.append(f"step {step}" if k == 0 else "")
    grid = labelled_grid(images, labels, columns=cols, caption=caption)
    return grid, save_png(grid, path, {"steps": json.dumps(sorted(rows))})


def describe(obj: Any) -> Any:
    """A JSON-able view of a config value (paths as strings, tuples as lists, handles by their source)."""
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, (list, tuple)):
        return [describe(v) for v in obj]
    if isinstance(obj, dict):
        return {str(k): describe(v) for k, v in obj.items()}
    if hasattr(obj, "pipe") and hasattr(obj, "source"):
        return str(obj.source)
    return str(obj)


def trainable(func):
    """Run a trainer with autograd on, even when called from a ComfyUI node (ComfyUI runs nodes under
    `torch.inference_mode()`, where no tensor records gradients)."""
    import functools

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        import torch

        with torch.inference_mode(False), torch.enable_grad():
            return func(*args, **kwargs)

    return wrapper

