"""Test-only ComfyUI extension: teaches ComfyUI 0.8.0 the built-in tiny TuneLab architectures (comfyui tests only).

ComfyUI pins its model types to full-size configs, so a tiny single-file checkpoint is "not a checkpoint" to it.
Imported inside a ComfyUI process (as a custom node by the test server, or directly by the in-process probe), this
module registers model configs for tiny-sdxl, tiny-sdxl-refiner and tiny-sd15 in front of ComfyUI's own list:

- the UNet config matches the tiny UNets detected from their state dicts;
- the SDXL / refiner models embed their size conditioning with 8 channels per number (the tiny presets'
  `addition_time_embed_dim`) instead of 256;
- the CLIP targets are ComfyUI's own SDXL / refiner / SD1 CLIP classes built from the tiny text-encoder configs,
  with the character-level tokenizer the presets use (folder: $TUNELAB_TINY_TOKENIZER).

Nothing else is changed: loaders, LoRA mapping, hooks, samplers and the VAE are ComfyUI's own. ComfyUI's CLIP
embedding table has 49408 rows regardless of config, so the test checkpoints pad the tiny token tables to that size
(the rows the tiny vocabulary uses are the presets' own).
"""
import os

import comfy.model_base as model_base
import comfy.sd1_clip as sd1_clip
import comfy.sdxl_clip as sdxl_clip
import comfy.supported_models as supported_models
import comfy.supported_models_base as supported_models_base
from comfy.ldm.modules.diffusionmodules.openaimodel import Timestep

TOKENIZER = os.environ.get("TUNELAB_TINY_TOKENIZER", "")
BOS, EOS = 512, 513  # core/tiny.write_tokenizer_files: 2 x 256 byte symbols, then the two markers
TIME_EMBED = 8  # tiny presets' addition_time_embed_dim
TE1_WIDTH, TE2_WIDTH = 32, 64


def _te_config(width):
    return {"num_hidden_layers": 3, "hidden_size": width, "intermediate_size": width * 2, "num_attention_heads": 4,
            "max_position_embeddings": 77, "hidden_act": "gelu", "eos_token_id": EOS, "bos_token_id": BOS,
            "pad_token_id": EOS, "vocab_size": 49408, "projection_dim": width, "layer_norm_eps": 1e-5}


class TinyTokenizerL(sd1_clip.SDTokenizer):
    def __init__(self, embedding_directory=None, tokenizer_data={}):
        super().__init__(TOKENIZER, embedding_directory=embedding_directory, embedding_size=TE1_WIDTH,
                         embedding_key="clip_l", tokenizer_data=tokenizer_data)


class TinyTokenizerG(sd1_clip.SDTokenizer):
    def __init__(self, embedding_directory=None, tokenizer_data={}):
        super().__init__(TOKENIZER, pad_with_end=False, embedding_directory=embedding_directory,
                         embedding_size=TE2_WIDTH, embedding_key="clip_g", tokenizer_data=tokenizer_data)


class TinySDXLTokenizer(sdxl_clip.SDXLTokenizer):
    def __init__(self, embedding_directory=None, tokenizer_data={}):
        self.clip_l = TinyTokenizerL(embedding_directory=embedding_directory, tokenizer_data=tokenizer_data)
        self.clip_g = TinyTokenizerG(embedding_directory=embedding_directory, tokenizer_data=tokenizer_data)


class TinySD1Tokenizer(sd1_clip.SD1Tokenizer):
    def __init__(self, embedding_directory=None, tokenizer_data={}):
        super().__init__(embedding_directory=embedding_directory, tokenizer_data=tokenizer_data,
                         tokenizer=TinyTokenizerL)


class TinyClipL(sd1_clip.SDClipModel):
    """SDXL's CLIP-L: penultimate layer, no final layer norm (as sdxl_clip.SDXLClipModel builds it)."""

    def __init__(self, device="cpu", dtype=None, model_options={}):
        super().__init__(device=device, dtype=dtype, textmodel_json_config=_te_config(TE1_WIDTH), layer="hidden",
                         layer_idx=-2, layer_norm_hidden_state=False,
                         special_tokens={"start": BOS, "end": EOS, "pad": EOS},
                         model_options={**model_options, "model_name": "clip_l"})


class TinyClipLSD1(sd1_clip.SDClipModel):
    """SD1.x's CLIP-L: last layer with its final layer norm, unprojected pooled output (SD1CheckpointClipModel)."""

    def __init__(self, device="cpu", dtype=None, model_options={}):
        super().__init__(device=device, dtype=dtype, textmodel_json_config=_te_config(TE1_WIDTH),
                         return_projected_pooled=False, special_tokens={"start": BOS, "end": EOS, "pad": EOS},
                         model_options={**model_options, "model_name": "clip_l"})


class TinyClipG(sdxl_clip.SDXLClipG):
    def __init__(self, device="cpu", dtype=None, model_options={}):
        sd1_clip.SDClipModel.__init__(self, device=device, dtype=dtype, textmodel_json_config=_te_config(TE2_WIDTH),
                                      layer="hidden", layer_idx=-2, layer_norm_hidden_state=False,
                                      return_projected_pooled=True, special_tokens={"start": BOS, "end": EOS, "pad": 0},
                                      model_options={**model_options, "model_name": "clip_g"})


class TinySDXLClipModel(sdxl_clip.SDXLClipModel):
    def __init__(self, device="cpu", dtype=None, model_options={}):
        import torch

        torch.nn.Module.__init__(self)
        self.clip_l = TinyClipL(device=device, dtype=dtype, model_options=model_options)
        self.clip_g = TinyClipG(device=device, dtype=dtype, model_options=model_options)
        self.dtypes = {dtype}


class TinyRefinerClipModel(sdxl_clip.SDXLRefinerClipModel):
    def __init__(self, device="cpu", dtype=None, model_options={}):
        sd1_clip.SD1ClipModel.__init__(self, device=device, dtype=dtype, clip_name="g", clip_model=TinyClipG,
                                       model_options=model_options)


class TinySD1ClipModel(sd1_clip.SD1ClipModel):
    def __init__(self, device="cpu", dtype=None, model_options={}, **kwargs):
        super().__init__(device=device, dtype=dtype, model_options=model_options, clip_model=TinyClipLSD1, **kwargs)


class TinySDXLModel(model_base.SDXL):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.embedder = Timestep(TIME_EMBED)


class TinyRefinerModel(model_base.SDXLRefiner):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.embedder = Timestep(TIME_EMBED)


_TINY_UNET = {"model_channels": 32, "channel_mult": [1, 2], "use_linear_in_transformer": True}


class TinySDXL(supported_models.SDXL):
    unet_config = {**_TINY_UNET, "context_dim": TE1_WIDTH + TE2_WIDTH, "adm_in_channels": 6 * TIME_EMBED + TE2_WIDTH}

    def get_model(self, state_dict, prefix="", device=None):
        return TinySDXLModel(self, model_type=self.model_type(state_dict, prefix), device=device)

    def clip_target(self, state_dict={}):
        return supported_models_base.ClipTarget(TinySDXLTokenizer, TinySDXLClipModel)


class TinySDXLRefiner(supported_models.SDXLRefiner):
    unet_config = {**_TINY_UNET, "context_dim": TE2_WIDTH, "adm_in_channels": 5 * TIME_EMBED + TE2_WIDTH}

    def get_model(self, state_dict, prefix="", device=None):
        return TinyRefinerModel(self, device=device)

    def clip_target(self, state_dict={}):
        return supported_models_base.ClipTarget(TinySDXLTokenizer, TinyRefinerClipModel)  # as ComfyUI's refiner


class TinySD15(supported_models.SD15):
    unet_config = {**_TINY_UNET, "context_dim": TE1_WIDTH, "adm_in_channels": None}

    def clip_target(self, state_dict={}):
        return supported_models_base.ClipTarget(TinySD1Tokenizer, TinySD1ClipModel)


def register():
    for cls in (TinySD15, TinySDXLRefiner, TinySDXL):
        if cls not in supported_models.models:
            supported_models.models.insert(0, cls)


register()
NODE_CLASS_MAPPINGS = {}
