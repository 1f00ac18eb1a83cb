"""Single-file checkpoints (.safetensors in the original LDM/SGM key layout, as kept in ComfyUI's
models/checkpoints) -> diffusers pipelines, offline.

diffusers' own single-file machinery converts the weights. We only choose what it would otherwise fetch from a hub:
the component configs (shipped in core/configs/, or a tiny preset's folder for tiny-shaped checkpoints, picked from
the checkpoint's keys and shapes) and the tokenizers (from disk).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Optional

from . import tiny
from .errors import TuneLabError
from .files import check_safetensors
from .quiet import dtype_kwargs

CONFIG_ROOT = Path(__file__).parent / "configs"
SUPPORTED = "SDXL base, SDXL refiner, SD1.x (1.4/1.5) and InstructPix2Pix"

FAMILY_NAMES = {"sdxl": "SDXL base", "sdxl-refiner": "SDXL refiner", "sd15": "SD1.x",
                "ip2p": "InstructPix2Pix (SD1.x)"}
_SHIPPED = {"sdxl": "sdxl-base", "sdxl-refiner": "sdxl-refiner", "sd15": "sd15", "ip2p": "ip2p"}
_TINY = {"sdxl": "tiny-sdxl", "sdxl-refiner": "tiny-sdxl-refiner", "sd15": "tiny-sd15", "ip2p": "tiny-ip2p"}
_PIPELINES = {"sdxl": "StableDiffusionXLPipeline", "sdxl-refiner": "StableDiffusionXLImg2ImgPipeline",
              "sd15": "StableDiffusionPipeline", "ip2p": "StableDiffusionInstructPix2PixPipeline"}

# Key prefixes of the original layout.
UNET = "model.diffusion_model."
VAE = "first_stage_model."
CLIP_L_SDXL = "conditioner.embedders.0.transformer."
CLIP_G_SDXL = "conditioner.embedders.1.model."
CLIP_G_REFINER = "conditioner.embedders.0.model."
CLIP_L_SD1 = "cond_stage_model.transformer."
OPENCLIP_SD2 = "cond_stage_model.model."

# family -> (component, key prefix, "clip" (HF layout) or "openclip")
_TEXT_ENCODERS = {
    "sdxl": (("text_encoder", CLIP_L_SDXL, "clip"), ("text_encoder_2", CLIP_G_SDXL, "openclip")),
    "sdxl-refiner": (("text_encoder_2", CLIP_G_REFINER, "openclip"),),
    "sd15": (("text_encoder", CLIP_L_SD1, "clip"),),
    "ip2p": (("text_encoder", CLIP_L_SD1, "clip"),),
}
_TOKENIZER_FOR = {"text_encoder": "tokenizer", "text_encoder_2": "tokenizer_2"}
# SDXL's second tokenizer pads with "!" (id 0), the first with the end token.
_PAD = {"tokenizer": "<|endoftext|>", "tokenizer_2": "!"}


class _Shape:
    """A tensor stand-in carrying only `.shape`, so key/shape probes never load weights."""

    __slots__ = ("shape",)

    def __init__(self, shape):
        self.shape = tuple(shape)


def read_shapes(path: Path) -> dict:
    """{key: shape} from the safetensors header (no tensor data is read)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception as e:
        raise TuneLabError(f"'{path.name}' could not be read as safetensors ({e})", input_name="model") from None


def _has(shapes: dict, prefix: str) -> bool:
    return any(k.startswith(prefix) for k in shapes)


def _looks_like(shapes: dict) -> str:
    """diffusers' own guess at a foreign architecture, for the refusal message ('' when it has none)."""
    try:
        from diffusers.loaders.single_file_utils import infer_diffusers_model_type

        guess = infer_diffusers_model_type({k: _Shape(s) for k, s in shapes.items()})
    except Exception:
        return ""
    return "" if guess in ("v1", "xl_base", "xl_refiner", "instruct-pix2pix") else guess


def _unsupported(path: Path, why: str) -> TuneLabError:
    return TuneLabError(f"'{path.name}' {why}. TuneLab loads single-file checkpoints of {SUPPORTED} "
                        "(.safetensors in the original LDM/SGM layout).", input_name="model")


def detect_family(shapes: dict, path: Path) -> str:
    """The family from which key prefixes are present, refined by the UNet's input channels."""
    conv_in = shapes.get(UNET + "input_blocks.0.0.weight")
    if conv_in is None or len(conv_in) != 4:
        guess = _looks_like(shapes)
        looks = f" (it looks like {guess})" if guess else ""
        raise _unsupported(path, f"is not a Stable Diffusion UNet checkpoint{looks}")
    in_ch = conv_in[1]
    if _has(shapes, CLIP_L_SDXL) and _has(shapes, CLIP_G_SDXL):
        family = "sdxl"
    elif _has(shapes, CLIP_G_REFINER):
        family = "sdxl-refiner"
    elif _has(shapes, CLIP_L_SD1):
        family = "ip2p" if in_ch == 8 else "sd15"
    elif _has(shapes, OPENCLIP_SD2):
        raise _unsupported(path, "is an SD2.x checkpoint, which has no single-file support here; load it as a "
                                 "diffusers folder")
    else:
        raise _unsupported(path, "holds no text encoder weights (a UNet-only file?)")
    if "edm_mean" in shapes:  # Playground v2.5: SDXL keys, but an EDM schedule no shipped config describes
        raise _unsupported(path, "is a Playground v2.5 (EDM) checkpoint")
    expected_in = 8 if family == "ip2p" else 4
    if in_ch != expected_in:
        kind = "an inpainting" if in_ch == 9 else f"a {in_ch}-channel"
        raise _unsupported(path, f"is {kind} {FAMILY_NAMES[family]} variant")
    if not _has(shapes, VAE):
        raise TuneLabError(f"'{path.name}' holds no VAE weights ({VAE}*); TuneLab needs a full checkpoint "
                           "(UNet, VAE and text encoders)", input_name="model")
    return family


# ---------------------------------------------------------------------------------------------------------------
# config choice


def _json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def expected_shapes(config_dir: Path, family: str) -> dict:
    """Shapes that tell one config of a family from another (standard size vs tiny preset)."""
    unet = _json(config_dir / "unet" / "config.json")
    vae = _json(config_dir / "vae" / "config.json")
    c0 = unet["block_out_channels"][0]
    k_in, k_out = unet.get("conv_in_kernel", 3), unet.get("conv_out_kernel", 3)
    exp = {
        UNET + "input_blocks.0.0.weight": (c0, unet["in_channels"], k_in, k_in),
        UNET + "out.2.weight": (unet["out_channels"], c0, k_out, k_out),
        VAE + "encoder.conv_in.weight": (vae["block_out_channels"][0], vae["in_channels"], 3, 3),
        VAE + "quant_conv.weight": (2 * vae["latent_channels"], 2 * vae["latent_channels"], 1, 1),
    }
    if unet.get("addition_embed_type") == "text_time":
        exp[UNET + "label_emb.0.0.weight"] = (c0 * 4, unet["projection_class_embeddings_input_dim"])
    for comp, prefix, kind in _TEXT_ENCODERS[family]:
        te = _json(config_dir / comp / "config.json")
        width, n_pos, vocab = te["hidden_size"], te["max_position_embeddings"], te["vocab_size"]
        if kind == "clip":
            exp[prefix + "text_model.embeddings.position_embedding.weight"] = (n_pos, width)
            exp[prefix + "text_model.embeddings.token_embedding.weight"] = (vocab, width)
        else:
            exp[prefix + "positional_embedding"] = (n_pos, width)
            exp[prefix + "token_embedding.weight"] = (vocab, width)
            exp[prefix + "text_projection"] = (width, te.get("projection_dim", width))
    return exp


def _mismatches(shapes: dict, config_dir: Path, family: str) -> list:
    out = [(k, shapes[k], v) for k, v in expected_shapes(config_dir, family).items()
           if k in shapes and tuple(shapes[k]) != tuple(v)]
    width = _json(config_dir / "unet" / "config.json")["cross_attention_dim"]
    to_k = next((k for k in shapes if k.startswith(UNET) and k.endswith("attn2.to_k.weight")), None)
    if to_k is not None and shapes[to_k][-1] != width:
        out.append((to_k, shapes[to_k], ("*", width)))
    return out


def choose_config(shapes: dict, family: str, path: Path) -> tuple[Path, bool]:
    """(config dir, is_tiny): the shipped standard config, else the tiny preset's folder, whichever the shapes fit."""
    shipped = CONFIG_ROOT / _SHIPPED[family]
    bad = _mismatches(shapes, shipped, family)
    if not bad:
        return shipped, False
    preset = tiny.ensure(_TINY[family])  # built once and cached; only for checkpoints that are not standard size
    if not _mismatches(shapes, preset, family):
        return preset, True
    detail = "; ".join(f"{k}: {tuple(got)} in the file, {tuple(want)} expected" for k, got, want in bad[:3])
    raise _unsupported(path, f"has {FAMILY_NAMES[family]} keys but not the standard {FAMILY_NAMES[family]} shapes "
                             f"({detail}), so no shipped config fits it")


# ---------------------------------------------------------------------------------------------------------------
# tokenizers


def _has_vocab(folder: Optional[Path]) -> bool:
    return folder is not None and folder.is_dir() and (
        ((folder / "vocab.json").is_file() and (folder / "merges.txt").is_file())
        or (folder / "tokenizer.json").is_file())


def _make_tokenizer(folder: Path, pad_token: str):
    from transformers import CLIPTokenizer

    if (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
        return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=77,
                             pad_token=pad_token)
    return CLIPTokenizer.from_pretrained(str(folder), local_files_only=True, model_max_length=77, pad_token=pad_token)


def tiny_tokenizer_dir() -> Path:
    """The tiny presets' character-level vocabulary, written once to the cache (temp dir, then renamed)."""
    final = tiny.cache_dir() / "tokenizer-char"
    if _has_vocab(final):
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tokenizer-", dir=final.parent))
    try:
        tiny.write_tokenizer_files(tmp)
        try:
            os.replace(tmp, final)
        except OSError:  # another process won the race; its copy is identical
            if not _has_vocab(final):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def _tokenizer_sources(name: str, path: Path, tokenizer_dir) -> list:
    here = path.parent
    cands = [here / name]
    if name == "tokenizer_2":
        cands.append(here / "tokenizer")  # SDXL's two tokenizers share one BPE vocabulary
    cands += [here, Path(tokenizer_dir) if tokenizer_dir else None]
    return cands


def resolve_tokenizers(family: str, path: Path, shapes: dict, *, is_tiny: bool, tokenizer_dir=None) -> dict:
    """{"tokenizer": ..., "tokenizer_2": ...} as the family needs, checked against the text encoders' vocab size."""
    toks = {}
    for comp, prefix, kind in _TEXT_ENCODERS[family]:
        name = _TOKENIZER_FOR[comp]
        if is_tiny:
            folder = tiny_tokenizer_dir()
        else:
            folder = next((c for c in _tokenizer_sources(name, path, tokenizer_dir) if _has_vocab(c)), None)
        if folder is None:
            where = path.parent / "tokenizer"
            raise TuneLabError(
                f"no CLIP tokenizer found for '{path.name}': provide vocab.json and merges.txt (the CLIP ViT-L/14 BPE "
                f"tokenizer, e.g. from openai/clip-vit-large-patch14 or ComfyUI's comfy/sd1_tokenizer) in {where}"
                + (f" (and optionally {path.parent / 'tokenizer_2'} for the second encoder; TuneLab otherwise "
                   "reuses the first, padded with '!')" if family == "sdxl" else "")
                + (f"; the fallback {tokenizer_dir} has neither" if tokenizer_dir else ""), input_name="model")
        try:
            tok = _make_tokenizer(folder, _PAD[name])
        except Exception as e:
            raise TuneLabError(f"the tokenizer in {folder} could not be read ({e}); provide vocab.json and "
                               "merges.txt of the CLIP BPE tokenizer", input_name="model") from e
        emb = shapes.get(prefix + ("text_model.embeddings.token_embedding.weight" if kind == "clip"
                                   else "token_embedding.weight"))
        if emb is not None and emb[0] != len(tok):
            raise TuneLabError(f"the tokenizer in {folder} has {len(tok)} tokens but the {comp} of '{path.name}' "
                               f"has {emb[0]}; provide the matching vocab.json and merges.txt", input_name="model")
        toks[name] = tok
    return toks


# ---------------------------------------------------------------------------------------------------------------
# loading


def _explain(e: Exception) -> str:
    """diffusers' reason in the user's terms: its advice (ignore_mismatched_sizes, to_empty) does not apply here."""
    if isinstance(e, KeyError):
        return f"the file lacks the weight {e.args[0]!r}; it is incomplete or a variant TuneLab has no config for"
    msg = str(e)
    m = re.search(r"because (\S+) expected shape (.+?), but got (.+?)\. ", msg + " ")
    if m:
        return (f"its weight {m.group(1)} has shape {m.group(3)} where the config expects {m.group(2)}; the file is "
                "a variant TuneLab has no config for")
    if "meta tensor" in msg:
        return "weights the model needs are missing from the file (it is incomplete or a variant with other layers)"
    return msg.split("\n")[0]


def _check_complete(model, what: str, path: Path, input_name: str = "model") -> None:
    """diffusers builds models on the meta device; a weight the file lacked stays there, unloaded."""
    missing = [n for n, p in model.named_parameters() if p.is_meta]
    if missing:
        raise TuneLabError(f"'{path.name}' lacks {len(missing)} weights of the {what} (e.g. {missing[0]}); the file "
                           "is incomplete or a variant TuneLab has no config for", input_name=input_name)


def load_single_file(path, *, dtype, tokenizer_dir=None):
    """Load an SDXL base / SDXL refiner / SD1.x / InstructPix2Pix single-file checkpoint as a diffusers pipeline.

    `tokenizer_dir`: a CLIP tokenizer folder to fall back on (inside ComfyUI: its bundled `sd1_tokenizer`), used when
    none lies next to the checkpoint.
    """
    path = check_safetensors(path, "model")
    shapes = read_shapes(path)
    family = detect_family(shapes, path)
    config_dir, is_tiny = choose_config(shapes, family, path)
    toks = resolve_tokenizers(family, path, shapes, is_tiny=is_tiny, tokenizer_dir=tokenizer_dir)

    import diffusers

    kwargs = dict(config=str(config_dir), local_files_only=True, **dtype_kwargs(dtype), **toks)
    if family == "sdxl-refiner":
        kwargs.update(text_encoder=None, tokenizer=None, requires_aesthetics_score=True)
    if family in ("sd15", "ip2p"):
        kwargs.update(safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    cls = getattr(diffusers, _PIPELINES[family])
    try:
        pipe = cls.from_single_file(str(path), **kwargs)
    except TuneLabError:
        raise
    except Exception as e:  # surface diffusers' reason with the file name, not a deep traceback
        raise TuneLabError(f"could not load '{path.name}' as {FAMILY_NAMES[family]}: {_explain(e)}",
                           input_name="model") from e
    for comp in ("unet", "vae", "text_encoder", "text_encoder_2"):
        model = getattr(pipe, comp, None)
        if model is not None:
            _check_complete(model, comp, path)
    return pipe


# ---------------------------------------------------------------------------------------------------------------
# VAE override

_VAE_FAMILY = {"sdxl": "sdxl", "sdxl-refiner": "sdxl", "sd15": "sd15", "ip2p": "sd15", "sd2": "sd15"}


def load_vae(path, *, family: str, dtype):
    """A VAE override: a single .safetensors file (original or diffusers key layout, e.g. sdxl-vae-fp16-fix) or a
    diffusers VAE folder (config.json + safetensors weights)."""
    from diffusers import AutoencoderKL

    p = Path(path).expanduser()
    if p.is_dir():
        folder = p / "vae" if (p / "model_index.json").is_file() and (p / "vae").is_dir() else p
        if not (folder / "config.json").is_file():
            raise TuneLabError(f"'{p}' is not a diffusers VAE folder: config.json is missing", input_name="vae")
        if not list(folder.glob("*.safetensors")):
            pickled = [q.name for q in folder.glob("*.bin")]
            why = (f"only pickle weights ({', '.join(pickled)}) were found; TuneLab loads safetensors only"
                   if pickled else "no .safetensors weights were found")
            raise TuneLabError(f"'{folder}': {why}", input_name="vae")
        try:
            vae = AutoencoderKL.from_pretrained(str(folder), **dtype_kwargs(dtype), use_safetensors=True,
                                                local_files_only=True)
        except Exception as e:
            raise TuneLabError(f"could not load the VAE folder '{folder}': {_explain(e)}", input_name="vae") from e
        _check_complete(vae, "VAE", folder, "vae")
        return vae

    p = check_safetensors(p, "vae")
    shapes = read_shapes(p)
    prefix = next((pre for pre in ("", VAE, "vae.") if pre + "encoder.conv_in.weight" in shapes), None)
    if prefix is None:
        raise TuneLabError(f"'{p.name}' is not a VAE (no encoder.conv_in.weight)", input_name="vae")
    fam = _VAE_FAMILY.get(family, "sdxl")  # the family sets the scaling factor; the shapes pick standard or tiny
    conv_in = tuple(shapes[prefix + "encoder.conv_in.weight"])

    def fits(config_dir: Path) -> bool:
        cfg = _json(config_dir / "vae" / "config.json")
        return conv_in == (cfg["block_out_channels"][0], cfg["in_channels"], 3, 3)

    config_dir = CONFIG_ROOT / _SHIPPED[fam]
    if not fits(config_dir):
        config_dir = tiny.ensure(_TINY[fam])
    if not fits(config_dir):
        raise TuneLabError(f"'{p.name}' is not a VAE for {FAMILY_NAMES.get(family, family)}: its encoder input "
                           f"has shape {conv_in}", input_name="vae")
    try:
        vae = AutoencoderKL.from_single_file(str(p), config=str(config_dir), subfolder="vae", local_files_only=True,
                                             **dtype_kwargs(dtype))
    except Exception as e:
        raise TuneLabError(f"could not load the VAE '{p.name}': {_explain(e)}", input_name="vae") from e
    _check_complete(vae, "VAE", p, "vae")
    return vae
