"""Built-in tiny models: the real SDXL / refiner / SD1.5 / InstructPix2Pix architectures at toy size.

Built deterministically from a seed (same weights on every machine with the same torch), saved once as a diffusers
folder in the cache and then loaded through the ordinary diffusers-folder path. They produce noise; they exist so the
demo, the tests and the benchmarks run in seconds on a CPU. The VAE keeps four blocks (real 8x downsampling), so a
64x64 image is an 8x8 latent.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

PRESETS = ("tiny-sdxl", "tiny-sdxl-refiner", "tiny-ip2p", "tiny-sd15")
# Scoring models (transformers folders): CLIP for the CLIP score and image similarity, a CLIP standing in for
# PickScore, and DINOv2. Like the pipelines they are random, fixed, and only good for tests and the demo.
SCORER_PRESETS = ("tiny-clip", "tiny-pickscore", "tiny-dinov2")
_VERSION = 1  # bump when a builder changes, so stale caches are rebuilt
_SEED = 20230820  # the wrong-LoRA notebooks' date

# Distinct cross-attention widths, so architecture fingerprints tell the presets apart like the real models.
TE1_WIDTH, TE2_WIDTH = 32, 64


def cache_dir() -> Path:
    root = os.environ.get("TUNELAB_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "tunelab")
    return Path(root) / "tiny"


def _bytes_to_unicode() -> list[str]:
    # GPT-2/CLIP byte-level alphabet: every byte maps to a printable character.
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def write_tokenizer_files(folder: Path) -> None:
    """A character-level CLIP BPE vocabulary (no merges), for when no real CLIP tokenizer is at hand."""
    folder.mkdir(parents=True, exist_ok=True)
    vocab: dict[str, int] = {}
    for suffix in ("", "</w>"):
        for ch in _bytes_to_unicode():
            vocab[ch + suffix] = len(vocab)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")


def _tokenizer(folder: Path, pad_token: str = "<|endoftext|>"):
    from transformers import CLIPTokenizer

    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=77, pad_token=pad_token)


def _seeded(seed: int, make):
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return make()


def _text_encoder(tok, width: int, with_projection: bool, seed: int):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cfg = CLIPTextConfig(vocab_size=len(tok), hidden_size=width, intermediate_size=width * 2, num_hidden_layers=3,
                         num_attention_heads=4, max_position_embeddings=77, projection_dim=width, hidden_act="gelu",
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    cls = CLIPTextModelWithProjection if with_projection else CLIPTextModel
    return _seeded(seed, lambda: cls(cfg))


def _vae(scaling_factor: float, seed: int):
    from diffusers import AutoencoderKL

    return _seeded(seed, lambda: AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16, 16, 16), layers_per_block=1,
        down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4, norm_num_groups=4,
        sample_size=64, scaling_factor=scaling_factor))


def _unet(seed: int, in_channels: int, cross_attention_dim: int, **extra):
    from diffusers import UNet2DConditionModel

    return _seeded(seed, lambda: UNet2DConditionModel(
        sample_size=8, in_channels=in_channels, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True, cross_attention_dim=cross_attention_dim,
        norm_num_groups=8, **extra))


def _sdxl_scheduler():
    from diffusers import EulerDiscreteScheduler

    return EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1,
                                  timestep_spacing="leading", prediction_type="epsilon")


def build(name: str, tokenizer_dir: Path):
    """Build a preset pipeline in memory (deterministic)."""
    from diffusers import (EulerAncestralDiscreteScheduler, PNDMScheduler, StableDiffusionInstructPix2PixPipeline,
                           StableDiffusionPipeline, StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline)

    tok1 = _tokenizer(tokenizer_dir)
    tok2 = _tokenizer(tokenizer_dir, pad_token="!")  # SDXL's second tokenizer pads with "!"
    if name == "tiny-sdxl":
        return StableDiffusionXLPipeline(
            vae=_vae(0.13025, _SEED + 1),
            text_encoder=_text_encoder(tok1, TE1_WIDTH, False, _SEED + 2),
            text_encoder_2=_text_encoder(tok2, TE2_WIDTH, True, _SEED + 3),
            tokenizer=tok1, tokenizer_2=tok2, scheduler=_sdxl_scheduler(),
            unet=_unet(_SEED + 4, 4, TE1_WIDTH + TE2_WIDTH, addition_embed_type="text_time", addition_time_embed_dim=8,
                       transformer_layers_per_block=(1, 2), projection_class_embeddings_input_dim=6 * 8 + TE2_WIDTH))
    if name == "tiny-sdxl-refiner":
        # Shares the base's second encoder and VAE weights, as the real refiner does (same seeds).
        return StableDiffusionXLImg2ImgPipeline(
            vae=_vae(0.13025, _SEED + 1), text_encoder=None, tokenizer=None,
            text_encoder_2=_text_encoder(tok2, TE2_WIDTH, True, _SEED + 3), tokenizer_2=tok2,
            scheduler=_sdxl_scheduler(), requires_aesthetics_score=True, force_zeros_for_empty_prompt=False,
            unet=_unet(_SEED + 5, 4, TE2_WIDTH, addition_embed_type="text_time", addition_time_embed_dim=8,
                       transformer_layers_per_block=(1, 2), projection_class_embeddings_input_dim=5 * 8 + TE2_WIDTH))
    if name in ("tiny-ip2p", "tiny-sd15"):
        ip2p = name == "tiny-ip2p"
        common = dict(vae=_vae(0.18215, _SEED + 11), text_encoder=_text_encoder(tok1, TE1_WIDTH, False, _SEED + 12),
                      tokenizer=tok1, unet=_unet(_SEED + (13 if ip2p else 14), 8 if ip2p else 4, TE1_WIDTH),
                      safety_checker=None, feature_extractor=None, requires_safety_checker=False)
        if ip2p:
            sched = EulerAncestralDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
            return StableDiffusionInstructPix2PixPipeline(scheduler=sched, **common)
        sched = PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", skip_prk_steps=True,
                              steps_offset=1, set_alpha_to_one=False)
        return StableDiffusionPipeline(scheduler=sched, **common)
    raise KeyError(name)


def ensure(name: str) -> Path:
    """The preset's diffusers folder, built and saved on first use (written to a temp dir, then renamed)."""
    if name not in PRESETS:
        raise KeyError(name)
    final = cache_dir() / f"{name}-v{_VERSION}"
    if (final / "model_index.json").is_file():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=final.parent))
    try:
        write_tokenizer_files(tmp / "_vocab")
        pipe = build(name, tmp / "_vocab")
        pipe.save_pretrained(tmp, safe_serialization=True)
        shutil.rmtree(tmp / "_vocab")
        try:
            os.replace(tmp, final)
        except OSError:  # another process won the race; its copy is identical
            if not (final / "model_index.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def wrong_lora() -> Path:
    """A small LoRA made for tiny-sdxl (random but fixed weights, kohya format), so the demo's LoRA panel differs.
    It stands in for the published wrong LoRA; it has learned nothing."""
    final = cache_dir() / f"tiny-sdxl-wrong-lora-v{_VERSION}.safetensors"
    if final.is_file():
        return final
    import torch
    from diffusers import UNet2DConditionModel
    from peft import LoraConfig, get_peft_model_state_dict

    from . import lora_files

    unet = UNet2DConditionModel.from_pretrained(str(ensure("tiny-sdxl") / "unet"), use_safetensors=True)
    rank, alpha = 4, 4
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian",
                                target_modules=["to_k", "to_q", "to_v", "to_out.0"]))
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(_SEED + 100)
        for name, param in unet.named_parameters():
            if "lora_" in name:
                param.normal_(0.0, 0.5)
    lora_files.save(final, unet=get_peft_model_state_dict(unet), rank=rank, alpha=alpha,
              metadata={"base_model": "tiny-sdxl", "instance_prompt": "wrong",
                        "note": "built-in demo LoRA with fixed random weights; not trained"})
    return final


# ---------------------------------------------------------------------------------------------------------------
# scoring models

_OPENAI_MEAN, _OPENAI_STD = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]
_IMAGENET_MEAN, _IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
SCORER_SIDE = 32  # input side of the tiny vision towers
_SCORER_VERSION = 2  # bump when a scorer builder changes


def _image_processor_config(kind: str) -> dict:
    """preprocessor_config.json of the tiny scorers: the real models' processors (CLIP: shortest side, bicubic,
    centre crop, OpenAI mean/std; DINOv2: BitImageProcessor, resize 256/224 of the crop, ImageNet mean/std)."""
    side = SCORER_SIDE
    common = {"do_resize": True, "resample": 3, "do_center_crop": True, "crop_size": {"height": side, "width": side},
              "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True, "do_convert_rgb": True}
    if kind == "dino":
        return {"image_processor_type": "BitImageProcessor", "size": {"shortest_edge": side * 256 // 224},
                "image_mean": _IMAGENET_MEAN, "image_std": _IMAGENET_STD, **common}
    return {"image_processor_type": "CLIPImageProcessor", "size": {"shortest_edge": side},
            "image_mean": _OPENAI_MEAN, "image_std": _OPENAI_STD, **common}


def _build_scorer(name: str, folder: Path):
    import math

    import torch

    if name == "tiny-dinov2":
        from transformers import Dinov2Config, Dinov2Model

        cfg = Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, mlp_ratio=2,
                           image_size=SCORER_SIDE, patch_size=8)
        model = _seeded(_SEED + 202, lambda: Dinov2Model(cfg))
        kind = "dino"
    else:
        from transformers import CLIPConfig, CLIPModel

        write_tokenizer_files(folder)  # vocab.json + merges.txt stay: older transformers' CLIPTokenizer reads them
        tok = _tokenizer(folder)
        text = dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                    num_attention_heads=2, max_position_embeddings=77, bos_token_id=tok.bos_token_id,
                    eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
        vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                      image_size=SCORER_SIDE, patch_size=8)
        cfg = CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)
        model = _seeded(_SEED + (200 if name == "tiny-clip" else 201), lambda: CLIPModel(cfg))
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            # a shared direction in both towers' outputs, so cosines are mostly positive (like a trained CLIP's
            # 0.2..0.4) and the CLIP score, max(100 cos, 0), is not mostly zero: every LayerNorm output has the
            # mean of its bias, which this rank-1 term maps onto one common vector
            # (the projections are drawn here, not by transformers' initialiser, which differs between releases)
            torch.manual_seed(_SEED + 203)
            common = torch.randn(cfg.projection_dim)
            for norm, proj in ((model.vision_model.post_layernorm, model.visual_projection),
                               (model.text_model.final_layer_norm, model.text_projection)):
                width = proj.weight.shape[1]
                norm.bias.fill_(1.0)
                proj.weight.copy_(torch.randn(proj.weight.shape) / math.sqrt(width)
                                  + torch.outer(common, torch.ones(width)) * (1.5 / width))
            if name == "tiny-pickscore":  # PickScore's learned temperature: logit_scale.exp() == 100
                model.logit_scale.fill_(math.log(100.0))
        tok.save_pretrained(str(folder))
        kind = "clip"
    model.save_pretrained(str(folder), safe_serialization=True)
    (folder / "preprocessor_config.json").write_text(json.dumps(_image_processor_config(kind), indent=2),
                                                     encoding="utf-8")


def ensure_scorer(name: str) -> Path:
    """The tiny scoring model's transformers folder, built and saved on first use (temp dir, then renamed)."""
    if name not in SCORER_PRESETS:
        raise KeyError(name)
    final = cache_dir() / f"{name}-v{_SCORER_VERSION}"
    if (final / "config.json").is_file():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=final.parent))
    try:
        _build_scorer(name, tmp)
        try:
            os.replace(tmp, final)
        except OSError:  # another process won the race; its copy is identical
            if not (final / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final
