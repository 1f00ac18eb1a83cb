import pytest
import torch

from tunelab.core import lora, sampling
from tunelab.core.errors import Interrupted, TuneLabError
from tunelab.core.progress import Progress
from tunelab.core.prompt import encode

from lora_factory import peft_unet_lora, write_formats

KW = dict(steps=6, guidance=13.0, width=64, height=64)


def direct(handle, cond, seed, **extra):
    """A plain diffusers pipeline call with the same embeddings and parameters."""
    lora.activate(handle)
    out = handle.pipe(**cond.diffusers_kwargs(), num_inference_steps=KW["steps"], guidance_scale=KW["guidance"],
                      height=KW["height"], width=KW["width"], generator=torch.Generator().manual_seed(seed),
                      output_type="pt", **extra).images
    return out.permute(0, 2, 3, 1)


def test_generate_equals_diffusers(tiny_sdxl):
    cond = encode(tiny_sdxl, "a (red)++ fox", "wrong")
    ours = sampling.generate(tiny_sdxl, cond, seed=7, **KW)
    assert ours.shape == (1, 64, 64, 3) and ours.dtype == torch.float32
    assert torch.equal(ours, direct(tiny_sdxl, cond, 7))
    assert torch.equal(ours, sampling.generate(tiny_sdxl, cond, seed=7, **KW)), "same inputs must give same pixels"
    assert not torch.equal(ours, sampling.generate(tiny_sdxl, cond, seed=8, **KW))


def test_refiner_handoff_equals_diffusers(tiny_sdxl, tiny_refiner):
    cond = encode(tiny_sdxl, "a fox", "wrong")
    rcond = encode(tiny_refiner, "a fox", "wrong")
    ours = sampling.generate(tiny_sdxl, cond, seed=3, refiner=tiny_refiner, high_noise_frac=0.8, **KW)
    latents = tiny_sdxl.pipe(**cond.diffusers_kwargs(), num_inference_steps=6, guidance_scale=13.0, height=64,
                             width=64, generator=torch.Generator().manual_seed(3), denoising_end=0.8,
                             output_type="latent").images
    ref = tiny_refiner.pipe(**rcond.diffusers_kwargs(), image=latents, num_inference_steps=6, guidance_scale=13.0,
                            denoising_start=0.8, generator=torch.Generator().manual_seed(3), output_type="pt").images
    assert torch.equal(ours, ref.permute(0, 2, 3, 1))
    assert not torch.equal(ours, sampling.generate(tiny_sdxl, cond, seed=3, **KW))


@pytest.mark.parametrize("strength", [1.0, 0.5])
def test_lora_parity_with_diffusers(tiny_sdxl, tmp_path, strength):
    paths = write_formats(peft_unet_lora(tiny_sdxl, seed=11), tmp_path)
    handle = lora.load(tiny_sdxl, paths["kohya"], strength)
    cond = encode(handle, "a fox", "wrong")
    ours = sampling.generate(handle, cond, seed=5, **KW)
    assert torch.equal(ours, direct(handle, cond, 5))
    assert not torch.equal(ours, sampling.generate(tiny_sdxl, encode(tiny_sdxl, "a fox", "wrong"), seed=5, **KW))


def test_batch_and_schedulers(tiny_sdxl):
    cond = encode(tiny_sdxl, "a fox", "", batch=2)
    images = sampling.generate(tiny_sdxl, cond, seed=1, **KW)
    assert images.shape == (2, 64, 64, 3)
    other = sampling.generate(tiny_sdxl, encode(tiny_sdxl, "a fox", ""), seed=1, scheduler="dpmpp_2m", **KW)
    assert not torch.equal(images[:1], other)
    assert type(tiny_sdxl.pipe.scheduler).__name__ == "EulerDiscreteScheduler", "the shared pipe's scheduler is restored"


@pytest.mark.parametrize("kwargs,input_name", [
    (dict(width=60), "width"), (dict(height=100), "height"), (dict(steps=0), "steps"),
    (dict(steps=10_000), "steps"), (dict(scheduler="nope"), "scheduler"),
])
def test_bad_inputs_are_refused(tiny_sdxl, kwargs, input_name):
    cond = encode(tiny_sdxl, "a fox", "")
    with pytest.raises(TuneLabError) as e:
        sampling.generate(tiny_sdxl, cond, seed=1, **{**KW, **kwargs})
    assert e.value.input_name == input_name


def test_mismatched_models_are_refused(tiny_sdxl, tiny_sd15, tiny_ip2p):
    cond = encode(tiny_sdxl, "a fox", "")
    with pytest.raises(TuneLabError, match="conditioning"):
        sampling.generate(tiny_sd15, cond, seed=1, **KW)
    with pytest.raises(TuneLabError, match="refiner"):
        sampling.generate(tiny_sdxl, cond, seed=1, refiner=tiny_sdxl, **KW)
    with pytest.raises(TuneLabError, match="text-to-image"):
        sampling.generate(tiny_ip2p, encode(tiny_ip2p, "a fox", ""), seed=1, **KW)


def test_interrupt_stops_at_a_step_boundary(tiny_sdxl):
    seen = []

    class StopAfterTwo(Progress):
        def update(self, n=1, info=None):
            super().update(n, info)
            seen.append(self.value)

        def interrupted(self):
            return self.value >= 2

    with pytest.raises(Interrupted):
        sampling.generate(tiny_sdxl, encode(tiny_sdxl, "a fox", ""), seed=1, progress=StopAfterTwo, **KW)
    assert seen == [1, 2]
