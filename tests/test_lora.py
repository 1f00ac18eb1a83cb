import pytest
import torch
from safetensors.torch import load_file, save_file

from tunelab.core import lora, sampling
from tunelab.core.errors import TuneLabError
from tunelab.core.files import safetensors_metadata
from tunelab.core.prompt import encode

from lora_factory import (merged_pipe, peft_state_dicts, peft_unet_lora, sdxl_lora, write_formats, write_kohya,
                          write_peft_style)

KW = dict(steps=5, guidance=13.0, width=64, height=64)


def image(handle, seed=4):
    return sampling.generate(handle, encode(handle, "a fox", "wrong"), seed=seed, **KW)


@pytest.fixture(scope="module")
def formats(tiny_sdxl, tmp_path_factory):
    return write_formats(peft_unet_lora(tiny_sdxl, seed=21), tmp_path_factory.mktemp("lora"))


def test_every_format_loads_changes_output_and_agrees(tiny_sdxl, formats):
    base = image(tiny_sdxl)
    results = {}
    for fmt, path in formats.items():
        handle = lora.load(tiny_sdxl, path, 1.0)
        results[fmt] = image(handle)
        assert not torch.allclose(results[fmt], base, atol=1e-3), f"{fmt} LoRA had no effect"
    ref = results["peft"]
    for fmt, img in results.items():
        torch.testing.assert_close(img, ref, atol=1e-5, rtol=0, msg=f"{fmt} differs from the same weights as PEFT")


def test_strength_zero_equals_no_lora(tiny_sdxl, formats):
    assert torch.equal(image(lora.load(tiny_sdxl, formats["kohya"], 0.0)), image(tiny_sdxl))


def test_handles_are_immutable_and_branches_isolated(tiny_sdxl, formats):
    before = image(tiny_sdxl)
    lora_handle = lora.load(tiny_sdxl, formats["kohya"], 1.0)
    assert tiny_sdxl.loras == () and len(lora_handle.loras) == 1
    assert lora_handle.pipe is tiny_sdxl.pipe, "branches share one copy of the weights"
    lora_image = image(lora_handle)
    assert torch.equal(image(tiny_sdxl), before), "the base branch must not see the LoRA branch's adapter"
    stacked = lora.load(lora_handle, formats["diffusers"], -0.5)
    assert [r.weight for r in stacked.loras] == [1.0, -0.5]
    image(stacked)
    assert torch.equal(image(lora_handle), lora_image)
    again = lora.load(tiny_sdxl, formats["kohya"], 1.0)
    assert again.loras[0].adapter == lora_handle.loras[0].adapter


def test_same_file_is_loaded_once(tiny_sdxl, formats):
    lora.load(tiny_sdxl, formats["kohya"], 1.0)
    n = len(lora.loaded_adapters(tiny_sdxl.pipe))
    lora.load(tiny_sdxl, formats["kohya"], 0.3)
    assert len(lora.loaded_adapters(tiny_sdxl.pipe)) == n


def test_kohya_alpha_is_the_trained_alpha(tiny_sdxl, tmp_path):
    peft_sd = peft_unet_lora(tiny_sdxl, rank=4, alpha=8, seed=5)
    path = lora.save(tmp_path / "a.safetensors", unet=peft_sd, rank=4, alpha=8, metadata={"base_model": "tiny-sdxl"})
    sd = load_file(str(path))
    alphas = [v for k, v in sd.items() if k.endswith(".alpha")]
    assert alphas and all(float(a) == 8.0 for a in alphas)
    assert all(k.startswith("lora_unet_") for k in sd)
    meta = safetensors_metadata(path)
    assert meta["rank"] == "4" and meta["alpha"] == "8" and meta["base_model"] == "tiny-sdxl"
    # alpha/rank = 2 must act like the same file with B doubled and alpha = rank
    doubled = {k: (v * 2 if "lora_B" in k else v) for k, v in peft_sd.items()}
    ref = lora.save(tmp_path / "b.safetensors", unet=doubled, rank=4, alpha=4)
    torch.testing.assert_close(image(lora.load(tiny_sdxl, path)), image(lora.load(tiny_sdxl, ref)), atol=1e-5, rtol=0)


def test_lora_for_another_architecture_is_refused_before_sampling(tiny_sdxl, tiny_sd15, tmp_path):
    sd15_lora = write_formats(peft_unet_lora(tiny_sd15, seed=1), tmp_path)["kohya"]
    adapters = lora.loaded_adapters(tiny_sdxl.pipe)
    with pytest.raises(TuneLabError) as e:
        lora.load(tiny_sdxl, sd15_lora, 1.0)
    msg = str(e.value)
    assert "tiny SD1.x" in msg and "tiny SDXL base" in msg, msg
    assert lora.loaded_adapters(tiny_sdxl.pipe) == adapters, "nothing may be applied"


def test_unmapped_keys_are_reported_and_too_many_refused(tiny_sdxl, formats, tmp_path, caplog):
    sd = load_file(str(formats["peft"]))
    modules = sorted({k.split(".lora_")[0] for k in sd})
    one = dict(sd)
    one["unet.down_blocks.9.nothing.to_q.lora_A.weight"] = torch.zeros(4, 8)
    one["unet.down_blocks.9.nothing.to_q.lora_B.weight"] = torch.zeros(8, 4)
    save_file(one, str(tmp_path / "one.safetensors"))
    total, missing = lora.unmapped_modules(tiny_sdxl, one)
    assert missing == ["unet.down_blocks.9.nothing.to_q"] and total == len(modules) + 1
    many = dict(sd)
    for i in range(len(modules)):
        many[f"unet.up_blocks.7.x{i}.to_q.lora_A.weight"] = torch.zeros(4, 8)
        many[f"unet.up_blocks.7.x{i}.to_q.lora_B.weight"] = torch.zeros(8, 4)
    save_file(many, str(tmp_path / "many.safetensors"))
    with pytest.raises(TuneLabError, match="do not exist in the model"):
        lora.load(tiny_sdxl, tmp_path / "many.safetensors")


@pytest.mark.parametrize("name,content", [("x.bin", b"\x80\x02"), ("x.ckpt", b"PK"), ("x.safetensors", b"garbage!")])
def test_unsafe_or_corrupt_files_are_refused(tiny_sdxl, tmp_path, name, content):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(TuneLabError) as e:
        lora.load(tiny_sdxl, tmp_path / name)
    assert e.value.input_name == "lora"


def test_not_a_lora_is_refused(tiny_sdxl, tmp_path):
    save_file({"some.weight": torch.zeros(2, 2)}, str(tmp_path / "w.safetensors"))
    with pytest.raises(TuneLabError):
        lora.load(tiny_sdxl, tmp_path / "w.safetensors")


# ---------------------------------------------------------------------------------------------------------------
# SDXL LoRAs with both text encoders: standard files, every format, every supported transformers

RANK, ALPHA = 4, 2.0  # alpha != rank: a scale of 0.5 that every format must keep
SCALE = ALPHA / RANK
DIFFUSERS_KW = dict(prompt="a fox", negative_prompt="wrong", num_inference_steps=KW["steps"],
                    guidance_scale=KW["guidance"], width=KW["width"], height=KW["height"])


def _handle(pipe):
    from tunelab.core import models

    return models.PipeHandle(pipe=pipe, family="sdxl", source="tiny-sdxl", dtype=torch.float32,
                             device=torch.device("cpu"))


def _diffusers_image(path):
    """diffusers' own loader and pipeline on a fresh pipe; None where diffusers cannot load text-encoder LoRAs under
    the installed versions because transformers' PEFT integration refuses the installed peft (its version gate)."""
    from diffusers import StableDiffusionXLPipeline

    from tunelab.core import tiny

    pipe = StableDiffusionXLPipeline.from_pretrained(str(tiny.ensure("tiny-sdxl")), local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    try:
        pipe.load_lora_weights(str(path.parent), weight_name=path.name)
    except ValueError as e:
        if "version of PEFT" in str(e):
            return None
        raise
    assert set(pipe.get_list_adapters()) == {"unet", "text_encoder", "text_encoder_2"}
    out = pipe(**DIFFUSERS_KW, generator=torch.Generator().manual_seed(4), output_type="pt").images
    return sampling.to_image_tensor(out)


@pytest.fixture(scope="module")
def te_lora(tiny_sdxl, tmp_path_factory):
    """The same LoRA (UNet + TE1 + TE2 attention, rank 4, alpha 2) in every format TuneLab reads or writes."""
    folder = tmp_path_factory.mktemp("te_lora")
    weights = sdxl_lora(tiny_sdxl.pipe, rank=RANK, seed=7)
    peft = peft_state_dicts(weights)
    saved = dict(unet=peft["unet"], text_encoder=peft["text_encoder"], text_encoder_2=peft["text_encoder_2"],
                 rank=RANK, alpha=ALPHA)
    files = {
        "standard_kohya": write_kohya(weights, folder / "standard_kohya.safetensors", alpha=ALPHA),
        "tunelab_kohya": lora.save(folder / "tunelab_kohya.safetensors", **saved),
        "tunelab_diffusers_copy": lora.save(folder / "tunelab_diffusers.safetensors", fmt="diffusers", **saved),
        "peft": write_peft_style(weights, folder / "peft.safetensors", scale=SCALE),
        "peft_without_text_model": write_peft_style(weights, folder / "peft_flat.safetensors", scale=SCALE,
                                                    text_model=False),
        "diffusers": write_peft_style(weights, folder / "diffusers.safetensors", scale=SCALE, diffusers_names=True),
        "diffusers_without_text_model": write_peft_style(weights, folder / "diffusers_flat.safetensors",
                                                         scale=SCALE, text_model=False, diffusers_names=True),
    }
    return {"weights": weights, "files": files}


def test_standard_kohya_sdxl_file_equals_merged_weights_and_diffusers(tiny_sdxl, te_lora):
    """A standard kohya SDXL file (lora_unet_* + lora_te1_text_model_* + lora_te2_text_model_*) loads under the
    installed transformers (4.x names CLIP modules text_model.*, 5.x drops that level in CLIPTextModel) and gives
    the image of an independent reference, the LoRA merged into the weights by hand (W + alpha/rank * B @ A), and
    of diffusers' own load_lora_weights. Where diffusers' loader is refused by transformers' PEFT version gate, the
    merged reference alone is the comparison."""
    path = te_lora["files"]["standard_kohya"]
    sd, _ = lora.read_file(path)
    total, missing = lora.unmapped_modules(tiny_sdxl, sd)
    assert missing == [] and total == sum(len(m) for m in te_lora["weights"].values())
    handle = lora.load(tiny_sdxl, path)
    assert {"text_encoder", "text_encoder_2", "unet"} <= {
        comp for comp, names in tiny_sdxl.pipe.get_list_adapters().items() if handle.loras[0].adapter in names}
    reference = _handle(merged_pipe("tiny-sdxl", te_lora["weights"], scale=SCALE))
    ours_cond, ref_cond = encode(handle, "a fox", "wrong"), encode(reference, "a fox", "wrong")
    torch.testing.assert_close(ours_cond.embeds, ref_cond.embeds, atol=1e-5, rtol=0)
    torch.testing.assert_close(ours_cond.pooled, ref_cond.pooled, atol=1e-5, rtol=0)
    assert not torch.allclose(ours_cond.embeds, encode(tiny_sdxl, "a fox", "wrong").embeds, atol=1e-3)
    ours = image(handle)
    torch.testing.assert_close(ours, image(reference), atol=1e-4, rtol=0)
    assert not torch.allclose(ours, image(tiny_sdxl), atol=1e-3)
    theirs = _diffusers_image(path)
    if theirs is not None:
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)


def test_every_format_with_text_encoders_gives_the_same_image(tiny_sdxl, te_lora):
    """kohya (standard and TuneLab's), diffusers and PEFT keys, with and without the text_model level."""
    files = te_lora["files"]
    ref = image(lora.load(tiny_sdxl, files["standard_kohya"]))
    for fmt, path in files.items():
        sd, _ = lora.read_file(path)
        assert lora.unmapped_modules(tiny_sdxl, sd)[1] == [], fmt
        torch.testing.assert_close(image(lora.load(tiny_sdxl, path)), ref, atol=1e-5, rtol=0,
                                   msg=f"{fmt} differs from the standard kohya file")


def test_tunelab_kohya_keys_are_standard_whatever_transformers_names_the_modules(te_lora):
    sd, _ = lora.read_file(te_lora["files"]["tunelab_kohya"])
    standard, _ = lora.read_file(te_lora["files"]["standard_kohya"])
    assert sd.keys() == standard.keys()
    assert all(torch.equal(sd[k], standard[k]) for k in sd)
    assert any(k.startswith("lora_te1_text_model_encoder_layers_0_self_attn_q_proj.") for k in sd)
    assert any(k.startswith("lora_te2_text_model_encoder_layers_0_self_attn_q_proj.") for k in sd)


def test_diffusers_copy_carries_alpha(tiny_sdxl, te_lora):
    """The diffusers copy has no alpha keys (diffusers reads none for SDXL), so alpha/rank is folded into lora_B:
    it gives the kohya file's image at alpha != rank, in TuneLab and in diffusers' own loader."""
    files = te_lora["files"]
    copy_sd, meta = lora.read_file(files["tunelab_diffusers_copy"])
    assert meta["tunelab_alpha_folded"] == "true" and meta["alpha"] == "2.0" and meta["rank"] == "4"
    assert not any(k.endswith(".alpha") for k in copy_sd)
    te1 = te_lora["weights"]["text_encoder"]  # module names as the installed transformers has them
    a, b = next(v for m, v in te1.items() if m.endswith("encoder.layers.0.self_attn.q_proj"))
    key = "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_linear_layer"
    assert torch.equal(copy_sd[f"{key}.down.weight"], a) and torch.allclose(copy_sd[f"{key}.up.weight"], b * SCALE)
    kohya = image(lora.load(tiny_sdxl, files["tunelab_kohya"]))
    torch.testing.assert_close(image(lora.load(tiny_sdxl, files["tunelab_diffusers_copy"])), kohya, atol=1e-5, rtol=0)
    theirs = _diffusers_image(files["tunelab_diffusers_copy"])
    if theirs is not None:
        torch.testing.assert_close(theirs, kohya, atol=1e-5, rtol=0)


def test_text_encoder_adapters_follow_the_stack_and_are_removed(te_lora):
    """activate() sets each handle's strengths on the text encoders too, a handle without the LoRA sees none of
    it, and removing the adapter restores the base model exactly (a private pipe: the shared one keeps its LoRAs)."""
    from diffusers import StableDiffusionXLPipeline

    from tunelab.core import tiny

    pipe = StableDiffusionXLPipeline.from_pretrained(str(tiny.ensure("tiny-sdxl")), local_files_only=True)
    base = _handle(pipe)
    before = encode(base, "a fox", "wrong").embeds
    half = lora.load(base, te_lora["files"]["standard_kohya"], 0.5)
    adapter = half.loras[0].adapter
    reference = _handle(merged_pipe("tiny-sdxl", te_lora["weights"], scale=SCALE * 0.5))
    torch.testing.assert_close(encode(half, "a fox", "wrong").embeds, encode(reference, "a fox", "wrong").embeds,
                               atol=1e-5, rtol=0)
    assert torch.equal(encode(base, "a fox", "wrong").embeds, before), "the base handle saw the LoRA"
    lora.remove(pipe, adapter)
    assert lora.loaded_adapters(pipe) == set()
    assert not any(hasattr(m, "peft_config") for m in (pipe.unet, pipe.text_encoder, pipe.text_encoder_2))
    assert torch.equal(encode(base, "a fox", "wrong").embeds, before)
    again = lora.load(base, te_lora["files"]["standard_kohya"], 0.5)  # and it loads again after removal
    assert again.loras[0].adapter == adapter and adapter in lora.loaded_adapters(pipe)


def test_several_loras_load_and_go_without_peft_notes(te_lora, tmp_path):
    """A second file on the same pipe, and removing the active one, are how TuneLab works: peft's notes about both
    ("Already found a `peft_config`", "was active which is now deleted") are not shown; the stacks still apply."""
    import warnings

    from diffusers import StableDiffusionXLPipeline

    from tunelab.core import tiny

    pipe = StableDiffusionXLPipeline.from_pretrained(str(tiny.ensure("tiny-sdxl")), local_files_only=True)
    base = _handle(pipe)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        first = lora.load(base, te_lora["files"]["standard_kohya"], 1.0)
        second = lora.load(base, te_lora["files"]["tunelab_diffusers_copy"], 1.0)
        lora.activate(first)
        lora.remove(pipe, first.loras[0].adapter)
    notes = [str(w.message) for w in seen if "peft_config" in str(w.message) or "now deleted" in str(w.message)]
    assert notes == [] and lora.loaded_adapters(pipe) == {second.loras[0].adapter}
