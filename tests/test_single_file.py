"""Single-file checkpoints (original LDM/SGM layout) load offline to the same weights and images as the diffusers
folders they were written from; everything else is refused with a TuneLabError that names the file."""
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from tunelab.core import models, single_file, tiny
from tunelab.core.errors import TuneLabError

import ldm_layout

PROMPT = "a photo of an astronaut riding a horse"


def _write(state: dict, path):
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path))
    return path


def _gen():
    return torch.Generator().manual_seed(0)


def _assert_same_weights(a, b):
    for comp in ("unet", "vae", "text_encoder", "text_encoder_2"):
        ma, mb = getattr(a, comp, None), getattr(b, comp, None)
        assert (ma is None) == (mb is None), comp
        if ma is None:
            continue
        pa, pb = dict(ma.named_parameters()), dict(mb.named_parameters())
        assert pa.keys() == pb.keys(), comp
        differ = [k for k in pa if not torch.equal(pa[k], pb[k])]
        assert not differ, f"{comp}: {differ[:5]}"


def _assert_same_tokenizers(a, b):
    for name in ("tokenizer", "tokenizer_2"):
        ta, tb = getattr(a, name, None), getattr(b, name, None)
        assert (ta is None) == (tb is None), name
        if ta is not None:
            assert ta.pad_token == tb.pad_token, name
            ids = lambda t: t(PROMPT, padding="max_length", max_length=77).input_ids  # noqa: E731
            assert ids(ta) == ids(tb), name


@pytest.fixture(scope="module")
def ckpt_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("checkpoints")


@pytest.fixture(scope="module")
def reference():
    """Private copies of the tiny presets, loaded from their diffusers folders. Not the shared session fixtures:
    other tests load LoRA adapters into those, which changes their state dicts and images."""
    from diffusers import DiffusionPipeline

    cache = {}

    def get(name):
        if name not in cache:
            pipe = DiffusionPipeline.from_pretrained(str(tiny.ensure(name)), torch_dtype=torch.float32,
                                                     use_safetensors=True, local_files_only=True)
            pipe.set_progress_bar_config(disable=True)
            cache[name] = pipe
        return cache[name]

    return get


@pytest.fixture(scope="module")
def sdxl_ldm(reference):
    return ldm_layout.pipeline_to_ldm(reference("tiny-sdxl"))


@pytest.fixture(scope="module")
def sdxl_file(sdxl_ldm, ckpt_dir):
    return _write(sdxl_ldm, ckpt_dir / "tiny-sdxl-ldm.safetensors")


@pytest.fixture(scope="module")
def ip2p_file(reference, ckpt_dir):
    return _write(ldm_layout.pipeline_to_ldm(reference("tiny-ip2p")), ckpt_dir / "tiny-ip2p-ldm.safetensors")


def test_test_helper_inverts_diffusers_conversion_exactly(reference):
    for name in ("tiny-sdxl", "tiny-ip2p", "tiny-sdxl-refiner"):
        ldm_layout.check_inverse(reference(name))


def test_sdxl_layout_keys(sdxl_ldm):
    # The file really is in the original layout, not diffusers keys under a prefix.
    assert {k.split(".")[0] for k in sdxl_ldm} == {"model", "first_stage_model", "conditioner"}
    assert "model.diffusion_model.input_blocks.0.0.weight" in sdxl_ldm
    assert "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight" in sdxl_ldm
    assert "conditioner.embedders.1.model.text_projection" in sdxl_ldm
    assert "conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight" in sdxl_ldm
    assert "first_stage_model.encoder.mid.attn_1.q.weight" in sdxl_ldm


def test_sdxl_single_file_same_weights_and_image(reference, sdxl_file):
    want_pipe = reference("tiny-sdxl")
    handle = models.load(str(sdxl_file), device="cpu", dtype="fp32")
    assert handle.family == "sdxl" and type(handle.pipe).__name__ == "StableDiffusionXLPipeline"
    assert handle.sha256 and handle.cross_attention_dim == want_pipe.unet.config.cross_attention_dim
    _assert_same_weights(handle.pipe, want_pipe)
    _assert_same_tokenizers(handle.pipe, want_pipe)
    assert handle.pipe.tokenizer_2.pad_token == "!"
    assert dict(handle.pipe.scheduler.config) == dict(want_pipe.scheduler.config)
    kw = dict(num_inference_steps=4, height=64, width=64, output_type="np")
    got = handle.pipe(PROMPT, generator=_gen(), **kw).images
    want = want_pipe(PROMPT, generator=_gen(), **kw).images
    assert got.shape == (1, 64, 64, 3)
    np.testing.assert_array_equal(got, want)


def test_ip2p_single_file_same_weights_and_image(reference, ip2p_file):
    want_pipe = reference("tiny-ip2p")
    handle = models.load(str(ip2p_file), device="cpu", dtype="fp32")
    assert handle.family == "ip2p" and handle.pipe.unet.config.in_channels == 8
    assert type(handle.pipe).__name__ == "StableDiffusionInstructPix2PixPipeline"
    _assert_same_weights(handle.pipe, want_pipe)
    _assert_same_tokenizers(handle.pipe, want_pipe)
    from PIL import Image

    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    kw = dict(image=image, num_inference_steps=4, image_guidance_scale=1.5, guidance_scale=7.0, output_type="np")
    got = handle.pipe("cartoonize the image", generator=_gen(), **kw).images
    want = want_pipe("cartoonize the image", generator=_gen(), **kw).images
    np.testing.assert_array_equal(got, want)


def test_refiner_single_file(reference, ckpt_dir):
    want_pipe = reference("tiny-sdxl-refiner")
    path = _write(ldm_layout.pipeline_to_ldm(want_pipe), ckpt_dir / "tiny-refiner-ldm.safetensors")
    assert "conditioner.embedders.0.model.text_projection" in single_file.read_shapes(path)
    handle = models.load(str(path), device="cpu", dtype="fp32")
    assert handle.family == "sdxl-refiner" and handle.pipe.text_encoder is None and handle.pipe.tokenizer is None
    assert handle.pipe.config.requires_aesthetics_score is True
    _assert_same_weights(handle.pipe, want_pipe)


def test_weights_come_from_the_file_not_the_config_folder(sdxl_ldm, ckpt_dir):
    # The tiny preset's folder serves as config; its weights must not leak in.
    state = dict(sdxl_ldm)
    key = "model.diffusion_model.input_blocks.0.0.weight"
    state[key] = state[key] + 1.0
    te_key = "conditioner.embedders.1.model.ln_final.bias"
    state[te_key] = state[te_key] - 2.0
    path = _write(state, ckpt_dir / "tiny-sdxl-edited.safetensors")
    pipe = single_file.load_single_file(path, dtype=torch.float32)
    assert torch.equal(pipe.unet.conv_in.weight, state[key])
    assert torch.equal(pipe.text_encoder_2.text_model.final_layer_norm.bias, state[te_key])


def test_real_size_checkpoints_pick_shipped_configs():
    for family, shipped in single_file._SHIPPED.items():
        exp = single_file.expected_shapes(single_file.CONFIG_ROOT / shipped, family)
        cfg, is_tiny = single_file.choose_config(exp, family, single_file.CONFIG_ROOT / "x.safetensors")
        assert (cfg.name, is_tiny) == (shipped, False)
    exp = single_file.expected_shapes(single_file.CONFIG_ROOT / "sdxl-base", "sdxl")
    assert exp["model.diffusion_model.label_emb.0.0.weight"] == (1280, 2816)
    assert exp["conditioner.embedders.1.model.text_projection"] == (1280, 1280)


# ---------------------------------------------------------------------------------------------------------------
# VAE override


@pytest.mark.parametrize("layout", ["ldm-file", "diffusers-file", "diffusers-folder"])
def test_vae_override(reference, tmp_path, layout):
    base_vae = reference("tiny-sdxl").vae
    state = {k: v.detach().clone() for k, v in base_vae.state_dict().items()}
    state["decoder.conv_out.bias"] += 0.25  # so the override is visible
    if layout == "ldm-file":
        path = _write(ldm_layout.vae_to_ldm(state, base_vae.config, prefix=""), tmp_path / "vae.safetensors")
    elif layout == "diffusers-file":
        path = _write(state, tmp_path / "vae.safetensors")
    else:
        from diffusers import AutoencoderKL

        vae = AutoencoderKL.from_config(base_vae.config)
        vae.load_state_dict(state)
        path = tmp_path / "vae-folder"
        vae.save_pretrained(str(path), safe_serialization=True)
    handle = models.load("tiny-sdxl", vae=str(path), device="cpu", dtype="fp32")
    assert handle is not models.load("tiny-sdxl", device="cpu", dtype="fp32")
    got = dict(handle.pipe.vae.named_parameters())
    for k, v in state.items():
        assert torch.equal(got[k], v), k
    assert handle.pipe.vae.config.scaling_factor == base_vae.config.scaling_factor


def test_vae_override_refusals(tmp_path):
    (tmp_path / "vae.pt").write_bytes(b"\x80\x02}q\x00.")
    with pytest.raises(TuneLabError, match=r"vae: 'vae\.pt' is a pickle file"):
        single_file.load_vae(tmp_path / "vae.pt", family="sdxl", dtype=torch.float32)
    _write({"foo.weight": torch.zeros(2)}, tmp_path / "notvae.safetensors")
    with pytest.raises(TuneLabError, match=r"'notvae\.safetensors' is not a VAE"):
        single_file.load_vae(tmp_path / "notvae.safetensors", family="sdxl", dtype=torch.float32)
    folder = tmp_path / "binvae"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "diffusion_pytorch_model.bin").write_bytes(b"x")
    with pytest.raises(TuneLabError, match="only pickle weights"):
        single_file.load_vae(folder, family="sdxl", dtype=torch.float32)


# ---------------------------------------------------------------------------------------------------------------
# refusals


def test_unknown_model_name():
    with pytest.raises(TuneLabError) as e:
        models.load("no-such-model", device="cpu", dtype="fp32")
    assert e.value.input_name == "model"
    assert "unknown model 'no-such-model'" in str(e.value) and "tiny-sdxl" in str(e.value)
    with pytest.raises(TuneLabError, match="model file not found"):
        models.load("/nonexistent/dir/model.safetensors", device="cpu", dtype="fp32")


@pytest.mark.parametrize("name", ["model.ckpt", "model.bin"])
def test_pickle_checkpoints_refused(tmp_path, name):
    (tmp_path / name).write_bytes(b"\x80\x02}q\x00.")  # a pickle; must never be unpickled
    with pytest.raises(TuneLabError) as e:
        models.load(str(tmp_path / name), device="cpu", dtype="fp32")
    msg = str(e.value)
    assert e.value.input_name == "model" and f"'{name}' is a pickle file" in msg and ".safetensors only" in msg


def test_truncated_safetensors_refused(sdxl_file, tmp_path):
    data = sdxl_file.read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(TuneLabError, match=r"model: 'cut\.safetensors' is truncated or corrupt.*Download it again"):
        models.load(str(tmp_path / "cut.safetensors"), device="cpu", dtype="fp32")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file at all")
    with pytest.raises(TuneLabError, match=r"'junk\.safetensors' is not a valid safetensors file"):
        models.load(str(tmp_path / "junk.safetensors"), device="cpu", dtype="fp32")


def _flux_like():
    p = "model.diffusion_model."
    return {p + "double_blocks.0.img_attn.norm.key_norm.scale": torch.zeros(128),
            p + "guidance_in.in_layer.bias": torch.zeros(8), p + "img_in.weight": torch.zeros(8, 64)}


def _with(sdxl_ldm, **changes):
    state = dict(sdxl_ldm)
    state.update(changes)
    return state


@pytest.mark.parametrize("case, why", [
    ("random", "is not a Stable Diffusion UNet checkpoint"),
    ("flux", "is not a Stable Diffusion UNet checkpoint (it looks like flux-dev)"),
    ("sd2", "is an SD2.x checkpoint"),
    ("inpaint", "is an inpainting SDXL base variant"),
    ("unet-only", "holds no text encoder weights"),
    ("playground", "is a Playground v2.5 (EDM) checkpoint"),
    ("odd-shape", "has SDXL base keys but not the standard SDXL base shapes"),
])
def test_unsupported_architecture_refused(sdxl_ldm, tmp_path, case, why):
    conv_in = "model.diffusion_model.input_blocks.0.0.weight"
    state = {
        "random": {"foo.weight": torch.zeros(4, 4), "bar.bias": torch.zeros(4)},
        "flux": _flux_like(),
        "sd2": {conv_in: torch.zeros(320, 4, 3, 3), "cond_stage_model.model.token_embedding.weight": torch.zeros(8, 4)},
        "inpaint": _with(sdxl_ldm, **{conv_in: torch.zeros(32, 9, 3, 3)}),
        "unet-only": {k: v for k, v in sdxl_ldm.items() if k.startswith("model.")},
        "playground": _with(sdxl_ldm, edm_mean=torch.zeros(1, 4, 1, 1), edm_std=torch.ones(1, 4, 1, 1)),
        "odd-shape": _with(sdxl_ldm, **{conv_in: torch.zeros(48, 4, 3, 3)}),
    }[case]
    path = _write(state, tmp_path / f"{case}.safetensors")
    with pytest.raises(TuneLabError) as e:
        models.load(str(path), device="cpu", dtype="fp32")
    msg = str(e.value)
    assert e.value.input_name == "model"
    assert f"'{case}.safetensors' {why}" in msg
    assert "SDXL base, SDXL refiner, SD1.x" in msg and "InstructPix2Pix" in msg


def _real_sd15_skeleton():
    """The keys that identify a standard-size SD1.5 checkpoint, at real shapes but nothing else (about 1 MB)."""
    h = torch.float16
    return {
        "model.diffusion_model.input_blocks.0.0.weight": torch.zeros(320, 4, 3, 3, dtype=h),
        "model.diffusion_model.out.2.weight": torch.zeros(4, 320, 3, 3, dtype=h),
        "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": torch.zeros(320, 768, dtype=h),
        "first_stage_model.encoder.conv_in.weight": torch.zeros(128, 3, 3, 3, dtype=h),
        "cond_stage_model.transformer.text_model.embeddings.position_embedding.weight": torch.zeros(77, 768, dtype=h),
    }


def test_missing_tokenizer_refused_and_named(tmp_path):
    path = _write(_real_sd15_skeleton(), tmp_path / "sd15-real.safetensors")
    shapes = single_file.read_shapes(path)
    assert single_file.detect_family(shapes, path) == "sd15"
    assert single_file.choose_config(shapes, "sd15", path) == (single_file.CONFIG_ROOT / "sd15", False)
    with pytest.raises(TuneLabError) as e:
        models.load(str(path), device="cpu", dtype="fp32")
    msg = str(e.value)
    assert e.value.input_name == "model" and "no CLIP tokenizer found for 'sd15-real.safetensors'" in msg
    assert "vocab.json and merges.txt" in msg and str(tmp_path / "tokenizer") in msg


def test_tokenizer_found_beside_checkpoint_or_via_fallback(tmp_path):
    # With a tokenizer the load goes on, and this skeleton then fails cleanly for its missing weights.
    path = _write(_real_sd15_skeleton(), tmp_path / "ckpts" / "sd15-real.safetensors")
    vocab = tmp_path / "comfy_tokenizer"
    tiny.write_tokenizer_files(vocab)
    shapes = single_file.read_shapes(path)
    toks = single_file.resolve_tokenizers("sd15", path, shapes, is_tiny=False, tokenizer_dir=vocab)
    assert toks["tokenizer"].pad_token == "<|endoftext|>"
    with pytest.raises(TuneLabError, match=r"could not load 'sd15-real\.safetensors' as SD1\.x: weights the model "
                                           "needs are missing"):
        single_file.load_single_file(path, dtype=torch.float32, tokenizer_dir=vocab)
    tiny.write_tokenizer_files(path.parent / "tokenizer")  # beside the checkpoint wins over the fallback
    sdxl = single_file.resolve_tokenizers("sdxl", path, {}, is_tiny=False)
    assert sdxl["tokenizer"].pad_token == "<|endoftext|>" and sdxl["tokenizer_2"].pad_token == "!"


def test_tokenizer_vocab_must_match_text_encoder(tmp_path):
    path = tmp_path / "x.safetensors"
    tiny.write_tokenizer_files(tmp_path / "tokenizer")
    shapes = {"cond_stage_model.transformer.text_model.embeddings.token_embedding.weight": (49408, 768)}
    with pytest.raises(TuneLabError, match=r"has 514 tokens but the text_encoder of 'x\.safetensors' has 49408"):
        single_file.resolve_tokenizers("sd15", path, shapes, is_tiny=False)


@pytest.mark.parametrize("case, why", [
    ("incomplete", "weights the model needs are missing from the file"),
    ("no-label-emb", "the file lacks the weight 'label_emb.0.0.weight'"),
    ("wrong-shape", "its weight up_blocks.0.resnets.0.conv1.weight has shape torch.Size([3, 3, 3, 3]) where the "
                    "config expects torch.Size([64, 128, 3, 3])"),
])
def test_damaged_checkpoint_refused_in_plain_words(sdxl_ldm, tmp_path, case, why):
    state = {
        "incomplete": {k: v for k, v in sdxl_ldm.items() if ".output_blocks.1." not in k},
        "no-label-emb": {k: v for k, v in sdxl_ldm.items() if ".label_emb.0.0." not in k},
        "wrong-shape": _with(sdxl_ldm, **{"model.diffusion_model.output_blocks.0.0.in_layers.2.weight":
                                          torch.zeros(3, 3, 3, 3)}),
    }[case]
    path = _write(state, tmp_path / f"{case}.safetensors")
    with pytest.raises(TuneLabError) as e:
        models.load(str(path), device="cpu", dtype="fp32")
    assert f"could not load '{case}.safetensors' as SDXL base: {why}" in str(e.value)
    assert "ignore_mismatched_sizes" not in str(e.value) and "to_empty" not in str(e.value)
