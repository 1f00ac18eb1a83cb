"""The fourth comparison state: the LoRA on the negative (unconditional) branch only."""
import pytest
import torch

from tunelab.core import compare, lora, sampling, tiny
from tunelab.core.errors import TuneLabError
from tunelab.core.prompt import encode

KW = dict(steps=3, guidance=9.0, width=64, height=64)
PROMPT = "a fox in the snow"


@pytest.fixture(scope="module")
def wrong_pipe(tiny_sdxl):
    return lora.load(tiny_sdxl, tiny.wrong_lora(), 1.0)


def hand_written_cfg(base, lora_handle, prompt, negative, *, seed, steps, guidance, width, height):
    """Classifier-free guidance written out step by step from the pipeline's parts: the negative prediction with
    the LoRA adapter on, the positive one with every adapter off, eps = neg + g * (pos - neg)."""
    from diffusers import EulerDiscreteScheduler
    from diffusers.utils.torch_utils import randn_tensor

    pipe = base.pipe
    cond = encode(base, prompt, negative)
    adapter = lora_handle.loras[0].adapter
    scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    scheduler.set_timesteps(steps, device="cpu")
    scheduler.set_begin_index(0)
    shape = (1, 4, height // 8, width // 8)
    latents = randn_tensor(shape, generator=torch.Generator("cpu").manual_seed(seed), device=torch.device("cpu"),
                           dtype=cond.embeds.dtype) * scheduler.init_noise_sigma
    time_ids = torch.tensor([[height, width, 0, 0, height, width]], dtype=cond.embeds.dtype)
    with torch.no_grad():
        for t in scheduler.timesteps:
            x = scheduler.scale_model_input(latents, t)
            pipe.enable_lora()
            pipe.set_adapters([adapter], [1.0])
            eps_neg = pipe.unet(x, t, encoder_hidden_states=cond.negative_embeds, return_dict=False,
                                added_cond_kwargs={"text_embeds": cond.negative_pooled, "time_ids": time_ids})[0]
            pipe.disable_lora()
            eps_pos = pipe.unet(x, t, encoder_hidden_states=cond.embeds, return_dict=False,
                                added_cond_kwargs={"text_embeds": cond.pooled, "time_ids": time_ids})[0]
            eps = eps_neg + guidance * (eps_pos - eps_neg)
            latents = scheduler.step(eps, t, latents, return_dict=False)[0]
        image = pipe.vae.decode(latents / pipe.vae.config.scaling_factor, return_dict=False)[0]
        image = pipe.image_processor.postprocess(image, output_type="pt")
    return image.permute(0, 2, 3, 1)


def state_image(state, seed=11, **kw):
    return compare.generate_state(state, PROMPT, seed=seed, **{**KW, **kw})


def test_negative_only_equals_hand_written_cfg_loop(tiny_sdxl, wrong_pipe):
    (state,) = compare.named_states(["lora_negative_only"], tiny_sdxl, wrong_pipe, "wrong")
    assert state.lora_on == "negative" and state.handle is wrong_pipe
    ours = state_image(state)
    ref = hand_written_cfg(tiny_sdxl, wrong_pipe, PROMPT, "wrong", seed=11, **KW)
    assert ours.shape == (1, 64, 64, 3)
    assert torch.equal(ours, ref), float((ours - ref).abs().max())
    assert tiny_sdxl.pipe.unet.forward.__func__ is type(tiny_sdxl.pipe.unet).forward, "the UNet forward is restored"
    assert "forward" not in vars(tiny_sdxl.pipe.unet)


def test_four_states_differ_and_the_three_are_unchanged(tiny_sdxl, wrong_pipe):
    four = compare.named_states(compare.STATE_NAMES, tiny_sdxl, wrong_pipe, "wrong")
    three = compare.default_states(tiny_sdxl, wrong_pipe, "wrong")
    assert [s.label for s in four[:3]] == [s.label for s in three]
    # the ordinary states before and after a negative-only run, and as a plain diffusers call
    before = [state_image(s) for s in three]
    run4 = compare.run(four, PROMPT, seed=11, **KW)
    after = [state_image(s) for s in three]
    for s, a, b in zip(three, before, after):
        assert torch.equal(a, b), s.label
        lora.activate(s.handle)
        direct = s.handle.pipe(**encode(s.handle, PROMPT, s.negative).diffusers_kwargs(), num_inference_steps=3,
                               guidance_scale=9.0, height=64, width=64, generator=torch.Generator().manual_seed(11),
                               output_type="pt").images.permute(0, 2, 3, 1)
        assert torch.equal(a, direct), s.label
    run3 = compare.run(three, PROMPT, seed=11, **KW)
    for p3, p4 in zip(run3.panels, run4.panels[:3]):
        assert p3.tobytes() == p4.tobytes()
    neg_only = state_image(four[3])
    assert all(not torch.equal(neg_only, other) for other in before)
    assert [s["lora_on"] for s in run4.settings["states"]] == ["both", "both", "both", "negative"]


def test_negative_only_runs_two_unet_calls_per_step_only_in_that_state(tiny_sdxl, wrong_pipe, monkeypatch):
    calls = []
    unet_cls = type(tiny_sdxl.pipe.unet)
    original = unet_cls.forward

    def counting(self, sample, *a, **k):
        calls.append(int(sample.shape[0]))
        return original(self, sample, *a, **k)

    monkeypatch.setattr(unet_cls, "forward", counting)
    base_neg, lora_neg, neg_only = compare.named_states(["base_negative", "lora_negative", "lora_negative_only"],
                                                        tiny_sdxl, wrong_pipe, "wrong")
    state_image(lora_neg)
    assert calls == [2, 2, 2]  # one batched call per step
    calls.clear()
    state_image(neg_only)
    assert calls == [1, 1] * 3  # negative, then positive, each step
    calls.clear()
    state_image(neg_only, guidance=1.0)  # no CFG: only the positive prediction, LoRA off
    assert calls == [1, 1, 1]
    assert torch.equal(state_image(neg_only, guidance=1.0), state_image(base_neg, guidance=1.0))


def test_refiner_stage_choice(tiny_sdxl, tiny_refiner, wrong_pipe, tmp_path):
    from lora_factory import peft_unet_lora, write_formats

    (neg_only,) = compare.named_states(["lora_negative_only"], tiny_sdxl, wrong_pipe, "wrong")
    kw = dict(refiner=tiny_refiner, high_noise_frac=0.7)
    plain = state_image(neg_only, **kw)
    assert not torch.equal(plain, state_image(neg_only))
    # 'negative-only' needs a LoRA on the refiner
    with pytest.raises(TuneLabError) as e:
        compare.check_states([neg_only], tiny_refiner, "negative-only")
    assert e.value.input_name == "refiner_mode"
    paths = write_formats(peft_unet_lora(tiny_refiner, seed=5, std=0.3), tmp_path)
    refiner_lora = lora.load(tiny_refiner, paths["kohya"], 1.0)
    compare.check_states([neg_only], refiner_lora, "negative-only")
    split = state_image(neg_only, refiner=refiner_lora, high_noise_frac=0.7, refiner_mode="negative-only")
    full = state_image(neg_only, refiner=refiner_lora, high_noise_frac=0.7, refiner_mode="plain")
    assert not torch.equal(split, full) and not torch.equal(split, plain)


def test_bad_states_are_refused(tiny_sdxl, wrong_pipe):
    with pytest.raises(TuneLabError, match="unknown state") as e:
        compare.parse_state_names("base, lora_neg")
    assert e.value.input_name == "states"
    with pytest.raises(TuneLabError, match="twice"):
        compare.parse_state_names("base,base")
    with pytest.raises(TuneLabError, match="need a pipe with a LoRA"):
        compare.named_states("base,lora_negative_only", tiny_sdxl, None)
    with pytest.raises(TuneLabError, match="has no LoRA"):
        compare.check_states([compare.State("x", tiny_sdxl, "wrong", "negative")])


def test_comparison_state_node_and_compare_node(tiny_sdxl, wrong_pipe, tmp_path, monkeypatch):
    from tunelab.nodes.compare import Compare, ComparisonState

    monkeypatch.setenv("TUNELAB_OUTPUT", str(tmp_path))
    (states,) = ComparisonState().add("npo", wrong_pipe, "wrong", lora_on="negative branch only")
    assert states[0].lora_on == "negative"
    res = Compare().compare(pipe=tiny_sdxl, prompt=PROMPT, negative="wrong", seed=11, **KW, lora_pipe=wrong_pipe,
                            default_states="base, lora_negative_only")
    grid, panels = res["result"]
    assert panels.shape[0] == 2
    expected = state_image(compare.named_states(["lora_negative_only"], tiny_sdxl, wrong_pipe, "wrong")[0])
    assert (panels[1] - expected[0]).abs().max() <= 1 / 255 + 1e-6  # via an 8-bit PNG panel


def test_compare_cli_states(tmp_path, capsys):
    import json
    import os

    from tunelab.cli import main

    out = tmp_path / "cmp"
    assert main(["compare", "--out", str(out), "--steps", "2", "--size", "64", "64", "--seed", "3",
                 "--states", "base_negative,lora_negative_only"]) == 0
    assert sorted(os.listdir(out)) == ["01.png", "02.png", "grid.png", "settings.json"]
    settings = json.loads((out / "settings.json").read_text())
    assert [s["lora_on"] for s in settings["states"]] == ["both", "negative"]
    capsys.readouterr()
    assert main(["compare", "--out", str(tmp_path / "bad"), "--states", "base,npo"]) == 2
    assert "unknown state" in capsys.readouterr().err and not (tmp_path / "bad").exists()
    assert main(["compare", "--out", str(tmp_path / "bad"), "--refiner-mode", "negative-only"]) == 2
    assert not (tmp_path / "bad").exists()


def test_a_changed_batch_order_is_refused(tiny_sdxl, wrong_pipe):
    """If a diffusers release put the positive half first, the split would swap the branches: it must refuse."""
    cond = encode(tiny_sdxl, PROMPT, "wrong")
    kw = cond.diffusers_kwargs()
    split = sampling.NegativeBranchLora(tiny_sdxl, wrong_pipe, kw)
    latents = torch.zeros(2, 4, 8, 8)
    added = {"text_embeds": torch.cat([cond.negative_pooled, cond.pooled]),
             "time_ids": torch.tensor([[64, 64, 0, 0, 64, 64]] * 2, dtype=torch.float32)}
    with split, torch.no_grad():
        out = tiny_sdxl.pipe.unet(latents, 10, encoder_hidden_states=torch.cat([cond.negative_embeds, cond.embeds]),
                                  added_cond_kwargs=added, return_dict=False)[0]
        assert out.shape == (2, 4, 8, 8) and split.calls == 1
        with pytest.raises(TuneLabError, match="negative prompt where TuneLab expects it"):
            tiny_sdxl.pipe.unet(latents, 10, encoder_hidden_states=torch.cat([cond.embeds, cond.negative_embeds]),
                                added_cond_kwargs=added, return_dict=False)
    assert "forward" not in vars(tiny_sdxl.pipe.unet)
