"""The one place that talks to ComfyUI (`folder_paths`, `comfy.*`).

Inside ComfyUI it uses its folders, progress bar, interrupt flag, device and memory manager; outside it falls
back to plain local behaviour, so nodes, the CLI and tests run the same code. No other file imports ComfyUI.
"""
from __future__ import annotations

import os
import re
import weakref
from pathlib import Path
from typing import Optional

from .core.progress import Progress


def _comfy():
    """(folder_paths, comfy.model_management, comfy.utils) when running inside ComfyUI, else None."""
    try:
        import folder_paths  # type: ignore
        import comfy.model_management as mm  # type: ignore
        import comfy.utils as cu  # type: ignore
    except Exception:
        return None
    return folder_paths, mm, cu


def inside_comfyui() -> bool:
    return _comfy() is not None


def local_models_dir() -> Path:
    """Outside ComfyUI: $TUNELAB_MODELS, or ./models (laid out like ComfyUI's models/)."""
    return Path(os.environ.get("TUNELAB_MODELS", "models")).resolve()


def local_output_dir() -> Path:
    return Path(os.environ.get("TUNELAB_OUTPUT", "output")).resolve()


# folder kind -> file endings offered in lists. Pickle formats are listed so that picking one gets the
# clear "safetensors only" refusal instead of a silently missing file.
_EXTENSIONS = {
    "checkpoints": (".safetensors", ".sft", ".ckpt", ".pt", ".bin"),
    "loras": (".safetensors", ".sft", ".ckpt", ".pt", ".bin"),
    "vae": (".safetensors", ".sft", ".ckpt", ".pt", ".bin"),
}


# Model folder kinds that hold *folders* (one model per subfolder) and the file that marks one.
# "scorers" is TuneLab's own: models/scorers/<name>/ holds a transformers model folder (CLIP, PickScore, DINOv2)
# for scored comparisons and learned metrics; it is registered with folder_paths on first use, so
# extra_model_paths.yaml may add more roots under the key `scorers`.
_FOLDER_KINDS = {"diffusers": "model_index.json", "scorers": "config.json"}


def _register(folder_paths, kind: str) -> None:
    if kind == "scorers" and kind not in folder_paths.folder_names_and_paths:
        folder_paths.add_model_folder_path(kind, os.path.join(folder_paths.models_dir, kind))


def filename_list(kind: str) -> list[str]:
    """Files of a model folder kind ("checkpoints", "loras", "vae"), or model folders for "diffusers" and
    "scorers"."""
    c = _comfy()
    if c is not None:
        folder_paths = c[0]
        _register(folder_paths, kind)
        if kind in _FOLDER_KINDS:
            marker = _FOLDER_KINDS[kind]
            names = []
            for root in folder_paths.get_folder_paths(kind):
                if os.path.isdir(root):
                    names += [d for d in sorted(os.listdir(root)) if os.path.isfile(os.path.join(root, d, marker))]
            return names
        return list(folder_paths.get_filename_list(kind))
    root = local_models_dir() / kind
    if not root.is_dir():
        return []
    if kind in _FOLDER_KINDS:
        return [p.name for p in sorted(root.iterdir()) if (p / _FOLDER_KINDS[kind]).is_file()]
    return sorted(str(p.relative_to(root)).replace(os.sep, "/") for p in root.rglob("*")
                  if p.is_file() and p.suffix.lower() in _EXTENSIONS.get(kind, (".safetensors",)))


def full_path(kind: str, name: str) -> Optional[Path]:
    """The path of a listed model file or folder, or None if it is not there."""
    c = _comfy()
    if c is not None:
        folder_paths = c[0]
        _register(folder_paths, kind)
        if kind in _FOLDER_KINDS:
            for root in folder_paths.get_folder_paths(kind):
                p = Path(root) / name
                if (p / _FOLDER_KINDS[kind]).is_file():
                    return p
            return None
        p = folder_paths.get_full_path(kind, name)
        return Path(p) if p else None
    p = local_models_dir() / kind / name
    return p if p.exists() else None


def model_dirs(kind: str) -> list[Path]:
    c = _comfy()
    if c is not None:
        _register(c[0], kind)
        return [Path(p) for p in c[0].get_folder_paths(kind)]
    return [local_models_dir() / kind]


def output_dir() -> Path:
    c = _comfy()
    return Path(c[0].get_output_directory()) if c is not None else local_output_dir()


def input_dir() -> Path:
    c = _comfy()
    return Path(c[0].get_input_directory()) if c is not None else Path(os.environ.get("TUNELAB_INPUT", "input")).resolve()


def comfy_tokenizer_dir() -> Optional[Path]:
    """ComfyUI's bundled CLIP tokenizer (`comfy/sd1_tokenizer`), used when a single-file checkpoint has none."""
    try:
        import comfy  # type: ignore
    except Exception:
        return None
    # comfy is a namespace package in recent ComfyUI (no __file__)
    for root in getattr(comfy, "__path__", []):
        p = Path(root) / "sd1_tokenizer"
        if (p / "vocab.json").is_file():
            return p
    return None


def device():
    import torch

    c = _comfy()
    if c is not None:
        return c[1].get_torch_device()
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def default_dtype(dev=None):
    """fp16/bf16 on an accelerator as ComfyUI would choose, fp32 on CPU."""
    import torch

    dev = dev or device()
    if getattr(dev, "type", str(dev)) == "cpu":
        return torch.float32
    c = _comfy()
    if c is not None:
        mm = c[1]
        if mm.should_use_bf16(dev):
            return torch.bfloat16
        if mm.should_use_fp16(dev):
            return torch.float16
        return torch.float32
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def free_comfy_models() -> None:
    """Ask ComfyUI to release the models it holds before diffusers work, so both don't sit in VRAM."""
    c = _comfy()
    if c is not None:
        c[1].unload_all_models()
        c[1].soft_empty_cache()


def interrupted() -> bool:
    c = _comfy()
    return bool(c is not None and c[1].processing_interrupted())


PREVIEW_MAX_SIZE = 512  # longest side of a progress preview, as ComfyUI's latent previews


class ComfyProgress(Progress):
    """ComfyUI's progress bar; `check()` raises ComfyUI's own interrupt exception so the run ends as
    `execution_interrupted`, not as an error. It writes no log lines: ComfyUI shows the bar itself."""

    log_lines = False

    def __init__(self, total: int, desc: str = ""):
        super().__init__(total, desc)
        self._comfy = _comfy()
        self._pbar = self._comfy[2].ProgressBar(self.total) if self._comfy else None

    def update(self, n: int = 1, info: Optional[str] = None) -> None:
        super().update(n, info)
        if self._pbar is not None:
            self._pbar.update_absolute(self.value, self.total)
            if info:
                _progress_text(info)

    def preview(self, image) -> None:
        """The image in the running node's progress preview (sent to the browser as a JPEG frame over /ws)."""
        if self._pbar is not None and image is not None:
            self._pbar.update_absolute(self.value, self.total, ("JPEG", image.convert("RGB"), PREVIEW_MAX_SIZE))

    def interrupted(self) -> bool:
        return interrupted()

    def check(self) -> None:
        if self._comfy is not None:
            self._comfy[1].throw_exception_if_processing_interrupted()


def _progress_text(text: str) -> None:
    """Show a line (e.g. the training loss) under the running node in ComfyUI's UI; best effort."""
    try:
        from comfy_execution.utils import get_executing_context  # type: ignore
        from server import PromptServer  # type: ignore

        ctx = get_executing_context()
        if ctx is not None and PromptServer.instance is not None:
            PromptServer.instance.send_progress_text(text, ctx.node_id)
    except Exception:  # older ComfyUI without progress text: the bar still moves
        pass


def progress_factory():
    """The factory core functions take: ComfyUI's bar inside ComfyUI, tqdm outside."""
    return ComfyProgress if inside_comfyui() else Progress


def model_choices() -> list[str]:
    """Tiny presets, then ComfyUI's checkpoints, then its diffusers folders (prefixed 'diffusers/')."""
    from .core import tiny

    return list(tiny.PRESETS) + filename_list("checkpoints") + [f"diffusers/{n}" for n in filename_list("diffusers")]


def resolve_model(name: str) -> str:
    """A model choice -> what `core.models.load` takes (a preset name or a path). Unknown names pass through so
    the core can say what is wrong with them."""
    from .core import tiny

    if name in tiny.PRESETS:
        return name
    if name.startswith("diffusers/"):
        p = full_path("diffusers", name[len("diffusers/"):])
        return str(p) if p else name
    p = full_path("checkpoints", name)
    return str(p) if p else name


def resolve_file(kind: str, name: str) -> str:
    p = full_path(kind, name)
    return str(p) if p else name


def check_model(name, input_name: str = "model") -> str:
    """`resolve_model`, refusing a name that is neither a listed model (`model_choices`) nor an existing file or
    folder, with the closest listed names; loads nothing."""
    from .core.checks import unknown_name
    from .core.files import check_path_text

    check_path_text(name, input_name, "model")  # empty, NUL
    text = str(name).strip()
    from .core import tiny

    resolved = resolve_model(text)
    if text in tiny.PRESETS or resolved != text or Path(text).expanduser().exists():
        return resolved
    where = "models/checkpoints or models/diffusers" if inside_comfyui() else f"{local_models_dir()}"
    raise unknown_name(text, model_choices(), input_name, "model",
                       more=f"(a tiny preset, a name from {where}, a .safetensors file or a diffusers folder)")


def check_file(kind: str, name, input_name: str) -> str:
    """`resolve_file`, refusing a name that is neither listed in the `kind` folder nor an existing file."""
    from .core.checks import unknown_name
    from .core.files import check_path_text

    check_path_text(name, input_name, kind)  # empty, NUL
    text = str(name).strip()
    resolved = resolve_file(kind, text)
    p = Path(resolved).expanduser()
    if p.is_file():
        return resolved
    if p.is_dir():
        from .core.errors import TuneLabError

        raise TuneLabError(f"'{text}' is a folder; give a file", input_name=input_name)
    raise unknown_name(text, filename_list(kind), input_name, kind.rstrip("s") + " file",
                       more=f"(a name from {model_dirs(kind)[0]} or a path to a file)")


def runtime(device_choice: str = "auto", dtype_choice: str = "auto"):
    """(device, dtype) following ComfyUI's choice for "auto"."""
    import torch

    dev = torch.device(device()) if device_choice in (None, "auto") else torch.device(device_choice)
    dt = default_dtype(dev) if dtype_choice in (None, "auto") else dtype_choice
    return dev, dt


# ---------------------------------------------------------------------------------------------------------------
# Native ComfyUI objects: a user's CLIP, MODEL and VAE (TuneLab Weighted Prompt (CLIP), TuneLab Compare (native)).
# Only ComfyUI's public surfaces: CLIP.tokenize / encode_from_tokens (as CLIPTextEncode), its node classes for text
# encoding, LoRA loading, sampling and decoding, and comfy.hooks. The one exception is documented at
# `_encode_masked`.


def _comfy_import(name: str, what: str):
    import importlib

    try:
        return importlib.import_module(name)
    except Exception as e:
        from .core.errors import TuneLabError

        raise TuneLabError(f"{what} needs ComfyUI ('{name}' is not importable: {e}); run it inside ComfyUI") from None


def _core_choices(node: str, name: str) -> list:
    from .core import workflow

    return list(workflow.CORE_NODES[node]["input"]["required"][name][0])


def sampler_names() -> list:
    """KSampler's sampler choices: this ComfyUI's own, or the table ComfyUI 0.8.0 serves outside it."""
    if inside_comfyui():
        import comfy.samplers  # type: ignore

        return list(comfy.samplers.KSampler.SAMPLERS)
    return _core_choices("KSampler", "sampler_name")


def scheduler_names() -> list:
    if inside_comfyui():
        import comfy.samplers  # type: ignore

        return list(comfy.samplers.KSampler.SCHEDULERS)
    return _core_choices("KSampler", "scheduler")


# CLIP family -> (token keys in concatenation order, key of the pooled vector)
CLIP_FAMILIES = {"sdxl": (("l", "g"), "g"), "sdxl-refiner": (("g",), "g"), "sd15": (("l",), None),
                 "sd2": (("h",), None)}


def clip_family(clip) -> str:
    """'sdxl', 'sdxl-refiner', 'sd15' or 'sd2' for a native CLIP; a clear error for any other text encoder."""
    from .core.errors import TuneLabError

    sd1 = _comfy_import("comfy.sd1_clip", "A native CLIP")
    sdxl = _comfy_import("comfy.sdxl_clip", "A native CLIP")
    model = getattr(clip, "cond_stage_model", None)
    if isinstance(model, sdxl.SDXLClipModel):
        return "sdxl"
    if isinstance(model, sdxl.SDXLRefinerClipModel):
        return "sdxl-refiner"
    if isinstance(model, sd1.SD1ClipModel) and getattr(model, "clip_name", None) in ("l", "h"):
        return "sd15" if model.clip_name == "l" else "sd2"
    raise TuneLabError(f"compel weighting supports the CLIP of SD1.x, SD2.x, SDXL and the SDXL refiner; this CLIP "
                       f"is {type(model).__name__}. Use CLIPTextEncode for it", input_name="clip")


def _widths(clip, keys) -> dict:
    # the tokenizer's embedding size is the width of its encoder's token embeddings (textual inversion uses it)
    tok = clip.tokenizer
    return {k: int(getattr(getattr(tok, f"clip_{k}", None) or getattr(tok, tok.clip), "embedding_size")) for k in keys}


_SPECIALS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


class _ClipVocabularies:
    """`weighting.Vocabulary` per token key, tokenizing with `clip.tokenize` (weights off, as plain text)."""

    def __init__(self, clip, keys):
        from .core import weighting

        self.clip, self.keys, self.memo = clip, keys, {}
        specials = _SPECIALS.get(clip.tokenizer)
        if specials is None:  # BOS, EOS and pad as ComfyUI's tokenizer lays out "" (cached per tokenizer)
            empty = clip.tokenize("", return_word_ids=True)
            specials = _SPECIALS[clip.tokenizer] = {k: tuple(int(t[0]) for t in empty[k][0][:3]) for k in empty}
        self.vocabularies = {}
        for k in keys:
            bos, eos, pad = specials[k]
            self.vocabularies[k] = weighting.Vocabulary(
                bos=bos, eos=eos, pad=pad,
                tokenize=lambda texts, k=k: [self._ids(t)[k] for t in texts], token_strings=self._strings)

    def _ids(self, text: str) -> dict:
        from .core.errors import TuneLabError

        got = self.memo.get(text)
        if got is None:
            got = {}
            # ComfyUI's tokenizer turns \( and \) into ( and ) even with weights off; one more backslash keeps the
            # text as compel tokenizes it (compel's pooled vector reads the raw prompt, escapes included)
            kept = re.sub(r"\\(?=[()])", r"\\\\", text)
            tokens = self.clip.tokenize(kept, return_word_ids=True, disable_weights=True)
            for k in self.keys:
                ids = []
                for chunk in tokens[k]:
                    for token, _, word in chunk:
                        if word == 0:  # BOS, EOS, padding
                            continue
                        if not isinstance(token, int):
                            raise TuneLabError(f"'{text}' names a textual-inversion embedding; compel syntax here "
                                               f"takes plain words only", input_name="prompt")
                        ids.append(int(token))
                got[k] = ids
            self.memo[text] = got
        return got

    def _strings(self, ids):
        return [s for _, s in self.clip.tokenizer.untokenize([(i, 1.0) for i in ids])]


def _encode_plain(clip, keys, pooled_key, windows: dict, pooled: list, empty: dict):
    """Windows without an attention mask, through `clip.encode_from_tokens` like CLIPTextEncode. ComfyUI returns
    the pooled vector of the first window of a call only, so each pooled window opens its own call; the other
    windows are spread over the calls, and keys are topped up with repeats so every key has as many windows per
    call (SDXL encodes CLIP-L and CLIP-G side by side)."""
    import torch

    calls = [{k: [] for k in keys} for _ in range(max(1, len(pooled)))]
    for j, w in enumerate(pooled):
        calls[j][pooled_key].append(w)
    for k in keys:
        for w in windows.get(k, ()):
            if k == pooled_key and w.ids in [p.ids for p in pooled]:
                continue  # encoded as the first window of its pooled call
            min(calls, key=lambda c: len(c[k]))[k].append(w)
    widths = _widths(clip, keys)
    z = {k: {} for k in keys}
    vectors = []
    for call in calls:
        n = max(len(v) for v in call.values())
        if n == 0:
            continue
        for k in keys:
            call[k] += [call[k][-1] if call[k] else empty[k]] * (n - len(call[k]))
        tokens = {k: [[(int(t), 1.0) for t in w.ids] for w in call[k]] for k in keys}
        cond, vector = clip.encode_from_tokens(tokens, return_pooled=True)
        cond = cond.reshape(n, -1, cond.shape[-1])
        start = 0
        for k in keys:
            part = cond[..., start:start + widths[k]]
            start += widths[k]
            for i, w in enumerate(call[k]):
                z[k].setdefault(w.ids, part[i:i + 1])
        if pooled_key is not None and call[pooled_key]:
            vectors.append((call[pooled_key][0].ids, vector))
    out = {k: torch.cat([z[k][w.ids] for w in windows.get(k, ())]) if windows.get(k) else None for k in keys}
    pooled_out = []
    for w in pooled:
        pooled_out.append(next(v for ids, v in vectors if ids == w.ids))
    return out, pooled_out


def _encode_masked(clip, key: str, windows: list):
    """Windows with an attention mask: compel's down-weighting masks a fragment's tokens out of attention, which
    `encode_from_tokens` cannot express (ComfyUI's SD1/SDXL CLIP runs without an attention mask). This runs the
    same text-encoder module as `encode_from_tokens` does, after the same `clip.load_model()` (so LoRA patches,
    hooks, dtype casting and offloading apply) and with the same layer options, and passes the mask to it: what
    `SDClipModel.forward` does, plus the mask."""
    import torch

    from .core.errors import TuneLabError

    model = clip.cond_stage_model
    model.reset_clip_options()
    if clip.layer_idx is not None:
        model.set_clip_options({"layer": clip.layer_idx})
    clip.load_model()
    model.set_clip_options({"execution_device": clip.patcher.load_device})
    te = getattr(model, f"clip_{key}")
    if isinstance(te.layer, list) or te.layer == "all":
        raise TuneLabError(f"this CLIP returns layer '{te.layer}', which compel weighting cannot use",
                           input_name="clip")
    device = te.execution_device or te.transformer.get_input_embeddings().weight.device
    embeds, _, num_tokens, embeds_info = te.process_tokens([list(w.ids) for w in windows], device)
    mask = torch.tensor([list(w.mask) for w in windows], dtype=torch.long, device=device)
    try:
        outputs = te.transformer(None, mask, embeds=embeds, num_tokens=num_tokens,
                                 intermediate_output=te.layer_idx if te.layer == "hidden" else None,
                                 final_layer_norm_intermediate=te.layer_norm_hidden_state, dtype=torch.float32,
                                 embeds_info=embeds_info)
    except TypeError as e:
        raise TuneLabError(f"this ComfyUI's text encoder does not take an attention mask ({e}); weights below 1 "
                           f"need one", input_name="clip") from None
    z = outputs[0].float() if te.layer == "last" else outputs[1].float()
    model.reset_clip_options()
    return z.to(_comfy()[1].intermediate_device())


def clip_text_encoders(clip):
    """(family, `core.prompt.TextEncoders`) for a native CLIP: compel's math runs on ComfyUI's own encoder."""
    from .core import prompt, weighting

    family = clip_family(clip)
    keys, pooled_key = CLIP_FAMILIES[family]
    vocabs = _ClipVocabularies(clip, keys)

    def encode(requests, pooled):
        import torch

        plain = {k: [w for w in ws if w.mask is None or all(w.mask)] for k, ws in requests.items()}
        masked = {k: [w for w in ws if not (w.mask is None or all(w.mask))] for k, ws in requests.items()}
        empty = {k: weighting.empty_window(vocabs.vocabularies[k], masked=False) for k in keys}
        with torch.no_grad():
            z_plain, vectors = _encode_plain(clip, keys, pooled_key, plain, list(pooled.get(pooled_key, ())), empty)
            z_masked = {k: _encode_masked(clip, k, ws) for k, ws in masked.items() if ws}
        z = {}
        for k, ws in requests.items():
            rows, ip, im = [], 0, 0
            for w in ws:
                if w.mask is None or all(w.mask):
                    rows.append(z_plain[k][ip:ip + 1])
                    ip += 1
                else:
                    rows.append(z_masked[k][im:im + 1])
                    im += 1
            z[k] = torch.cat(rows)
        out_pooled = {pooled_key: torch.cat(vectors)} if vectors else {}
        return z, out_pooled

    return family, prompt.TextEncoders(vocabularies=vocabs.vocabularies, encode=encode, order=keys,
                                       pooled_key=pooled_key)


def clip_cond_extras(clip) -> dict:
    """What CLIPTextEncode adds to each conditioning dict from the CLIP itself (hooks set by Set CLIP Hooks)."""
    return clip.add_hooks_to_dict({})


def native_conditioning(family, clip, embeds, pooled, *, sizes=None, aesthetic_score=6.0):
    """[[tensor, dict]] as ComfyUI's own text-encode nodes build it for the family (CLIPTextEncodeSDXL's size keys,
    CLIPTextEncodeSDXLRefiner's aesthetic score and size), with the CLIP's hooks as CLIPTextEncode adds them."""
    extra = {}
    if family == "sdxl":
        extra = {"pooled_output": pooled, **{k: int(v) for k, v in (sizes or {}).items()}}
    elif family == "sdxl-refiner":
        sizes = sizes or {}
        extra = {"pooled_output": pooled, "aesthetic_score": float(aesthetic_score),
                 "width": int(sizes.get("width", 1024)), "height": int(sizes.get("height", 1024))}
    extra.update(clip_cond_extras(clip))
    return [[embeds, extra]]


def clip_encode_pair(clip, positive, negative, *, pooled_from="raw", sizes=None, aesthetic_scores=(6.0, 2.5),
                     text_l=None, names_l=("positive", "negative"), names_g=("positive", "negative")):
    """(positive CONDITIONING, negative CONDITIONING) with compel's math on a native CLIP; both padded to one
    length as compel pads a pair. `text_l`: SDXL only, (positive, negative) for CLIP-L when it reads other text
    than CLIP-G (CLIPTextEncodeSDXL's text_l); `names_*`: the input names syntax errors point at."""
    from .core import prompt
    from .core.errors import TuneLabError

    family, encoders = clip_text_encoders(clip)
    split = names = None
    if text_l is not None:
        if family != "sdxl":
            raise TuneLabError(f"text_g/text_l is SDXL's pair of encoders; this CLIP is {family}",
                               input_name="clip")
        key_l, key_g = encoders.order  # CLIP-L first, as SDXL concatenates them
        split, names = {key_l: tuple(text_l)}, {key_l: names_l, key_g: names_g}
    embeds, neg_embeds, pooled, neg_pooled = prompt.encode_with(encoders, positive, negative, pooled_from=pooled_from,
                                                                split=split, names=names)
    return (native_conditioning(family, clip, embeds, pooled, sizes=sizes, aesthetic_score=aesthetic_scores[0]),
            native_conditioning(family, clip, neg_embeds, neg_pooled, sizes=sizes,
                                aesthetic_score=aesthetic_scores[1]))


def native_text_encode(clip, text: str):
    """Exactly what ComfyUI's CLIPTextEncode node returns for `text` (ComfyUI's own weighting syntax)."""
    nodes = _comfy_import("nodes", "CLIPTextEncode")
    return nodes.CLIPTextEncode().encode(clip, text)[0]


def native_lora(model, clip, lora_name: str, strength_model: float, strength_clip: float):
    """LoraLoader on clones of `model` and `clip` (theirs stay unpatched), plus the LoRA's tensors (for hooks) and
    how many of its modules this model maps. A non-safetensors file, a missing file or a LoRA that maps onto none of
    the model's layers is refused."""
    from .core.errors import TuneLabError

    folder_paths = _comfy_import("folder_paths", "A LoRA from models/loras")
    comfy_sd = _comfy_import("comfy.sd", "A LoRA from models/loras")
    comfy_lora = _comfy_import("comfy.lora", "A LoRA from models/loras")
    comfy_utils = _comfy_import("comfy.utils", "A LoRA from models/loras")
    path = folder_paths.get_full_path("loras", lora_name) if lora_name else None
    if not path:
        raise TuneLabError(f"no LoRA '{lora_name}' in models/loras; put the .safetensors file there and refresh",
                           input_name="lora_name")
    if not str(path).lower().endswith((".safetensors", ".sft")):
        raise TuneLabError(f"'{lora_name}' is not a .safetensors file; TuneLab loads weights from safetensors only "
                           f"(pickle files can run code)", input_name="lora_name")
    lora_sd = comfy_utils.load_torch_file(path, safe_load=True)
    key_map = comfy_lora.model_lora_keys_unet(model.model, {})
    key_map = comfy_lora.model_lora_keys_clip(clip.cond_stage_model, key_map)
    import comfy.lora_convert  # type: ignore

    patches = comfy_lora.load_lora(comfy.lora_convert.convert_lora(lora_sd), key_map, log_missing=False)
    if not patches:
        raise TuneLabError(f"'{lora_name}' maps onto none of this model's layers: it is for another base model "
                           f"or in a format ComfyUI does not read", input_name="lora_name")
    new_model, new_clip = comfy_sd.load_lora_for_models(model, clip, lora_sd, strength_model, strength_clip)
    return new_model, new_clip, lora_sd, len(patches)


def lora_hooks(lora_sd, strength_model: float, strength_clip: float):
    """What Create Hook LoRA makes of the LoRA's tensors."""
    hooks = _comfy_import("comfy.hooks", "LoRA hooks")
    return hooks.create_hook_lora(lora=lora_sd, strength_model=strength_model, strength_clip=strength_clip)


def with_hooks(conditioning, hook_group):
    """What Cond Set Props does with only `hooks` set (strength 1, default area): the hooks ride on the cond, so
    the sampler patches the model with them for this cond's predictions only."""
    hooks = _comfy_import("comfy.hooks", "LoRA hooks")
    return hooks.set_conds_props(conds=[conditioning], strength=1.0, set_cond_area="default", mask=None,
                                 hooks=hook_group, timesteps_range=None)[0]


def empty_latent(width: int, height: int):
    nodes = _comfy_import("nodes", "EmptyLatentImage")
    return nodes.EmptyLatentImage().generate(width, height, 1)[0]


def ksample(model, seed: int, steps: int, cfg: float, sampler_name: str, scheduler: str, positive, negative,
            latent, *, start_step=None, last_step=None, add_noise=True, force_full_denoise=True):
    """KSampler (all steps) or KSamplerAdvanced (a step range): ComfyUI's own `common_ksampler` call."""
    nodes = _comfy_import("nodes", "KSampler")
    if start_step is None and last_step is None:
        return nodes.common_ksampler(model, seed, steps, cfg, sampler_name, scheduler, positive, negative, latent,
                                     denoise=1.0)[0]
    return nodes.common_ksampler(model, seed, steps, cfg, sampler_name, scheduler, positive, negative, latent,
                                 denoise=1.0, disable_noise=not add_noise, start_step=start_step, last_step=last_step,
                                 force_full_denoise=force_full_denoise)[0]


def vae_decode(vae, latent):
    nodes = _comfy_import("nodes", "VAEDecode")
    return nodes.VAEDecode().decode(vae, latent)[0]


def check_interrupt() -> None:
    c = _comfy()
    if c is not None:
        c[1].throw_exception_if_processing_interrupted()


def comfyui_version():
    try:
        import comfyui_version  # type: ignore

        return comfyui_version.__version__
    except Exception:
        return None
def scorer_choices(kind: str) -> list[str]:
    """For a scorer input ("clip", "pickscore", "dino"): its tiny preset, then the folders in models/scorers."""
    from .core import scoring

    return [scoring.DEFAULT_PRESETS[kind]] + filename_list("scorers")


def resolve_scorer(name: str) -> str:
    """A scorer choice -> what `core.scoring.load` takes: a preset, the folder in models/scorers of that name, or
    the text as a path (the core says what is wrong with it)."""
    from .core import tiny

    if name in tiny.SCORER_PRESETS:
        return name
    p = full_path("scorers", name)
    return str(p) if p else name
