import pytest
import torch
from safetensors.torch import load_file, save_file

from tunelab.core import lora, sampling
from tunelab.core.errors import TuneLabError
from tunelab.core.files import safetensors_metadata
from tunelab.core.prompt import encode

from lora_factory import peft_unet_lora, write_formats

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
