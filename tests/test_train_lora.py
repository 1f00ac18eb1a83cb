"""Dreambooth LoRA trainer on tiny-sdxl (64 px, 4 hand-made images, a few steps): it learns, the file means the same
in TuneLab, in diffusers and to ComfyUI's loader, resume is exact, bad input is refused with nothing half-written,
pivotal tuning round-trips, and the shared pipe is left as it was."""
from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from tunelab.core import compare, lora, prompt, sampling, tiny
from tunelab.core.errors import Interrupted, TuneLabError
from tunelab.core.progress import Progress
from tunelab.training import common
from tunelab.training.lora_sdxl import LoraTrainConfig, prepare_examples, train

STEPS = 10
BASE = dict(resolution=64, train_batch_size=4, gradient_accumulation_steps=1, learning_rate=3e-2, rank=4, seed=0,
            cache_latents=True, checkpointing_steps=4, train_text_encoder=True, text_encoder_lr=3e-3,
            max_train_steps=STEPS)


def _write_dataset(folder, n=4, size=64, captions=True):
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):  # stripes and colour blocks: something a LoRA can pick up quickly
        a = np.zeros((size, size, 3), np.uint8)
        a[..., i % 3] = 200
        a[:: 4 + i] = 255
        Image.fromarray(a).save(folder / f"{i:02d}.png")
    if captions:
        lines = [json.dumps({"file_name": f"{i:02d}.png", "text": "wrong"}) for i in range(n)]
        (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return folder



@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return _write_dataset(tmp_path_factory.mktemp("wrong_data"))


def _state(handle):
    pipe = handle.pipe
    grads = {id(p): p.requires_grad for m in (pipe.unet, pipe.text_encoder, pipe.text_encoder_2)
             for p in m.parameters()}  # by object: peft's wrappers rename a layer's weight (to_q.base_layer.weight)
    return lora.loaded_adapters(pipe), grads, pipe.unet.training, len(pipe.tokenizer)


def _image(handle, negative=""):
    cond = prompt.encode(handle, "a photo of a cat", negative)
    return sampling.generate(handle, cond, seed=3, steps=2, width=64, height=64)


@pytest.fixture(scope="module")
def trained(tiny_sdxl, data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("trained") / "wrong.safetensors"
    # the image first: sampling the base handle disables the loaded adapters, which peft < 0.18 does by also
    # clearing their requires_grad; the state to compare is the pipe's resting state
    before_image = _image(tiny_sdxl)
    before_state = _state(tiny_sdxl)
    result = train(LoraTrainConfig(data_dir=str(data_dir), output=str(out), model=tiny_sdxl, validation_prompt="wrong",
                                   validation_inference_steps=2, **BASE))
    return {"result": result, "before_state": before_state, "before_image": before_image,
            "after_state": _state(tiny_sdxl), "after_image": _image(tiny_sdxl)}


def _fixed_noise_loss(handle, data_dir):
    """Denoising loss on the training images at fixed noise and timesteps (no sampling noise between runs)."""
    pipe = handle.pipe
    lora.activate(handle)
    g = torch.Generator().manual_seed(123)
    ex = prepare_examples([_Rec(p) for p in sorted(data_dir.glob("*.png"))], ["wrong"] * 4, resolution=64,
                          center_crop=True, random_flip=False, seed=0, allow_upscale=False)
    with torch.no_grad():
        x = torch.stack([e.pixels for e in ex]).float() / 127.5 - 1
        lat = pipe.vae.encode(x).latent_dist.mean * pipe.vae.config.scaling_factor
        lat = lat.repeat(4, 1, 1, 1)
        noise = torch.randn(lat.shape, generator=g)
        t = torch.randint(0, 1000, (lat.shape[0],), generator=g)
        from diffusers import DDPMScheduler

        sched = DDPMScheduler.from_config(pipe.scheduler.config)
        cond = prompt.encode(handle, "wrong", "")
        pred = pipe.unet(sched.add_noise(lat, noise, t), t, cond.embeds.repeat(lat.shape[0], 1, 1),
                         added_cond_kwargs={"time_ids": torch.tensor([[64, 64, 0, 0, 64, 64]] * lat.shape[0]).float(),
                                            "text_embeds": cond.pooled.repeat(lat.shape[0], 1)}).sample
    return float(torch.nn.functional.mse_loss(pred, noise))


class _Rec:
    def __init__(self, path):
        self.path, self.file_name = path, path.name
        self.image = Image.open(path).convert("RGB")
        self.size = self.image.size


# ---------------------------------------------------------------------------------------------------------------
# learning, effect, formats


def test_loss_falls_and_lora_lowers_the_fixed_noise_loss(trained, tiny_sdxl, data_dir):
    r = trained["result"]
    assert len(r.losses) == STEPS and r.steps == STEPS
    s = common.smooth(r.losses, 0.8)
    assert s[-1] < s[0] - 0.03, r.losses  # seeded run: 1.18 -> ~1.05
    assert np.mean(r.losses[-3:]) < np.mean(r.losses[:3])
    lh = lora.load(tiny_sdxl, r.lora_path)
    assert _fixed_noise_loss(lh, data_dir) < _fixed_noise_loss(tiny_sdxl, data_dir) - 0.01


def test_outputs_written(trained):
    r = trained["result"]
    assert r.lora_path.is_file() and r.loss_curve_png.is_file()
    with Image.open(r.loss_curve_png) as im:
        assert im.size == (640, 360)
        assert len(json.loads(im.text["losses"])) == STEPS
    assert len(r.validation_images) == 1 and r.validation_images[0].size == (64, 64)
    assert list((r.run_dir / "validation").glob("*.png"))
    meta = lora.read_file(r.lora_path)[1]
    assert meta["instance_prompt"] == "wrong" and meta["steps"] == str(STEPS) and meta["rank"] == "4"
    assert meta["base_model"] == "tiny-sdxl" and json.loads(meta["tunelab_settings"])["learning_rate"] == 3e-2
    # checkpoints: pruned to the newest two, each complete
    ckpts = common.list_checkpoints(r.run_dir / "checkpoints")
    assert [s for s, _ in ckpts] == [4, 8]


def test_shared_pipe_left_as_it_was(trained):
    assert trained["after_state"] == trained["before_state"]
    assert torch.equal(trained["after_image"], trained["before_image"])


def test_lora_changes_the_comparison_panel(trained, tiny_sdxl):
    lh = lora.load(tiny_sdxl, trained["result"].lora_path)
    result = compare.run(compare.default_states(tiny_sdxl, lh), "a photo of a cat", seed=5, steps=2, width=64,
                         height=64)
    base_neg, lora_neg = (np.asarray(p, dtype=np.float32) for p in result.panels[1:])
    assert np.abs(base_neg - lora_neg).mean() > 1.0  # 0..255 scale


def test_kohya_file_gives_the_same_image_in_diffusers(trained, tiny_sdxl):
    from diffusers import StableDiffusionXLPipeline

    from tunelab.core import tiny

    path = trained["result"].lora_path
    ours = _image(lora.load(tiny_sdxl, path), negative="blurry")
    pipe = StableDiffusionXLPipeline.from_pretrained(str(tiny.ensure("tiny-sdxl")), use_safetensors=True)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(str(path.parent), weight_name=path.name)  # a bare file path needs the hub
    theirs = pipe(prompt="a photo of a cat", negative_prompt="blurry", num_inference_steps=2, guidance_scale=13.0,
                  width=64, height=64, generator=torch.Generator().manual_seed(3), output_type="pt").images
    assert torch.allclose(ours, sampling.to_image_tensor(theirs), atol=1e-5)
    assert not torch.allclose(ours, _image(tiny_sdxl, negative="blurry"), atol=1e-3)


def test_kohya_keys_are_what_comfyui_maps(trained, tiny_sdxl):
    """Standard kohya names whatever transformers calls the modules: CLIP layers under `text_model` in both text
    encoders (transformers 5's CLIPTextModel has no such level; ComfyUI's key map expects it)."""
    sd, _ = lora.read_file(trained["result"].lora_path)
    pipe = tiny_sdxl.pipe

    def standard(model, te):
        names = {n for n, _ in model.named_modules() if n}
        if te:
            names = {n if n.startswith(("text_model", "text_projection")) else f"text_model.{n}" for n in names}
        return {n.replace(".", "_") for n in names}

    modules = {"lora_unet": standard(pipe.unet, False), "lora_te1": standard(pipe.text_encoder, True),
               "lora_te2": standard(pipe.text_encoder_2, True)}
    for prefix in ("lora_te1", "lora_te2"):
        te_keys = [k for k in sd if k.startswith(prefix + "_")]
        assert te_keys and all(k.startswith(f"{prefix}_text_model_encoder_layers_") for k in te_keys), te_keys[:3]
    pattern = re.compile(r"^(lora_unet|lora_te1|lora_te2)_(\w+?)\.(lora_up\.weight|lora_down\.weight|alpha)$")
    seen = set()
    for key, value in sd.items():
        m = pattern.match(key)
        assert m, key
        prefix, path, kind = m.groups()
        assert path in modules[prefix], key
        seen.add(prefix)
        if kind == "alpha":
            assert float(value) == 4.0
    assert seen == {"lora_unet", "lora_te1", "lora_te2"}
    # UNet targets: the four attention projections of every transformer block
    unet_paths = {k.split(".")[0] for k in sd if k.startswith("lora_unet_")}
    assert {p.rsplit("_", 1)[-1] for p in unet_paths} == {"q", "k", "v", "0"}


def test_diffusers_copy_gives_the_kohya_image_at_alpha_not_rank(tiny_sdxl, data_dir, tmp_path):
    """--save-diffusers-copy at alpha 8, rank 4: diffusers keys carry no alpha, so the copy folds alpha/rank into
    lora_B; in TuneLab and in diffusers' own loader it gives the kohya file's image (text encoders included)."""
    from diffusers import StableDiffusionXLPipeline

    out = tmp_path / "a8.safetensors"
    r = train(LoraTrainConfig(data_dir=str(data_dir), output=str(out), model=tiny_sdxl, save_diffusers_copy=True,
                              **dict(BASE, alpha=8, max_train_steps=2, checkpointing_steps=0)))
    assert r.diffusers_path == tmp_path / "a8_diffusers.safetensors"
    kohya_sd, meta = lora.read_file(r.lora_path)
    copy_sd, copy_meta = lora.read_file(r.diffusers_path)
    assert {float(v) for k, v in kohya_sd.items() if k.endswith(".alpha")} == {8.0} and meta["alpha"] == "8.0"
    assert copy_meta["tunelab_alpha_folded"] == "true" and not any(k.endswith(".alpha") for k in copy_sd)
    assert any(k.startswith("text_encoder.text_model.encoder.layers.") for k in copy_sd)
    assert any(k.startswith("text_encoder_2.text_model.encoder.layers.") for k in copy_sd)
    kohya = _image(lora.load(tiny_sdxl, r.lora_path), negative="blurry")
    assert not torch.allclose(kohya, _image(tiny_sdxl, negative="blurry"), atol=1e-3)
    torch.testing.assert_close(_image(lora.load(tiny_sdxl, r.diffusers_path), negative="blurry"), kohya,
                               atol=1e-5, rtol=0)
    pipe = StableDiffusionXLPipeline.from_pretrained(str(tiny.ensure("tiny-sdxl")), use_safetensors=True)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(str(r.diffusers_path.parent), weight_name=r.diffusers_path.name)
    theirs = pipe(prompt="a photo of a cat", negative_prompt="blurry", num_inference_steps=2, guidance_scale=13.0,
                  width=64, height=64, generator=torch.Generator().manual_seed(3), output_type="pt").images
    torch.testing.assert_close(sampling.to_image_tensor(theirs), kohya, atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------------------------------------------
# resume


class _StopAt(Progress):
    """A progress bar whose user presses 'interrupt' once `at` steps are done."""

    at = 0

    def interrupted(self) -> bool:
        return self.value >= self.at


def test_resume_is_exact(trained, tiny_sdxl, data_dir, tmp_path):
    out = tmp_path / "wrong.safetensors"
    cfg = dict(data_dir=str(data_dir), output=str(out), model=tiny_sdxl, **dict(BASE, checkpointing_steps=0))
    stop = type("StopAt3", (_StopAt,), {"at": 3})
    with pytest.raises(Interrupted, match="step 3"):
        train(LoraTrainConfig(**cfg), progress=stop)
    assert not out.exists()  # an interrupted run writes no LoRA, only its checkpoint
    assert [s for s, _ in common.list_checkpoints(tmp_path / "wrong_run" / "checkpoints")] == [3]
    r = train(LoraTrainConfig(**cfg, resume="latest"))
    assert r.resumed_from.name == "checkpoint-000003" and r.steps == STEPS
    # same seed, same data order, same noise: exactly the uninterrupted run's numbers (CPU, deterministic ops)
    assert r.losses == trained["result"].losses
    a, b = lora.read_file(r.lora_path)[0], lora.read_file(trained["result"].lora_path)[0]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_resume_refusals(trained, tiny_sdxl, data_dir, tmp_path):
    out = tmp_path / "x.safetensors"
    cfg = dict(data_dir=str(data_dir), output=str(out), model=tiny_sdxl, **BASE)
    with pytest.raises(TuneLabError, match="no complete checkpoint"):
        train(LoraTrainConfig(**cfg, resume="latest"))
    with pytest.raises(TuneLabError, match="not found"):
        train(LoraTrainConfig(**cfg, resume=str(tmp_path / "nope")))
    ckpt = common.list_checkpoints(trained["result"].run_dir / "checkpoints")[-1][1]
    with pytest.raises(TuneLabError, match="rank: 4 -> 8"):
        train(LoraTrainConfig(**dict(cfg, rank=8), resume=str(ckpt)))
    cut = tmp_path / "checkpoint-000008"
    shutil.copytree(ckpt, cut)
    (cut / common.MARKER).unlink()
    with pytest.raises(TuneLabError, match="incomplete"):
        train(LoraTrainConfig(**cfg, resume=str(cut)))
    assert not out.exists()


# ---------------------------------------------------------------------------------------------------------------
# refusals: clear errors, nothing half-written


@pytest.mark.parametrize("case", ["empty", "no_images", "corrupt", "small"])
def test_bad_datasets_are_refused(case, tiny_sdxl, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    expect = {"empty": "no images", "no_images": "no images", "corrupt": "02.png", "small": "smaller than"}[case]
    if case == "no_images":
        (data / "notes.txt").write_text("hello")
    elif case == "corrupt":
        _write_dataset(data)
        (data / "02.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    elif case == "small":
        _write_dataset(data, size=32)
    out = tmp_path / "out" / "lora.safetensors"
    with pytest.raises(TuneLabError, match=expect):
        train(LoraTrainConfig(data_dir=str(data), output=str(out), model=tiny_sdxl, **BASE))
    assert not out.parent.exists() or not any(out.parent.iterdir())


def test_small_images_upscale_when_allowed(tmp_path):
    recs = [_Rec(p) for p in sorted(_write_dataset(tmp_path / "d", n=1, size=32, captions=False).glob("*.png"))]
    ex = prepare_examples(recs, ["wrong"], resolution=64, center_crop=True, random_flip=False, seed=0,
                          allow_upscale=True)
    assert ex[0].pixels.shape == (3, 64, 64) and ex[0].time_ids == (32, 32, 0, 0, 64, 64)


def test_bad_settings_are_refused(tiny_sdxl, data_dir, tmp_path):
    out = tmp_path / "lora.safetensors"
    for change, name in [({"resolution": 60}, "resolution"), ({"train_batch_size": 0}, "train_batch_size"),
                         ({"max_train_steps": 10**9}, "max_train_steps"), ({"instance_prompt": " "}, "instance_prompt"),
                         ({"output": str(tmp_path / "lora.ckpt")}, "output"),
                         ({"use_8bit_adam": True}, "use_8bit_adam")]:
        cfg = dict(dict(data_dir=str(data_dir), output=str(out), model=tiny_sdxl, **BASE), **change)
        try:
            import bitsandbytes  # noqa: F401
            if name == "use_8bit_adam":
                continue
        except ImportError:
            pass
        with pytest.raises(TuneLabError, match=name):
            train(LoraTrainConfig(**cfg))
    assert not out.exists()


def test_nan_loss_stops_saves_and_writes_no_lora(tiny_sdxl, data_dir, tmp_path, monkeypatch):
    real = torch.nn.functional.mse_loss
    monkeypatch.setattr(torch.nn.functional, "mse_loss", lambda *a, **k: real(*a, **k) * float("nan"))
    out = tmp_path / "lora.safetensors"
    cfg = dict(BASE, max_nonfinite=2, checkpointing_steps=0, train_text_encoder=False)
    with pytest.raises(TuneLabError, match="NaN or infinite 2 times in a row"):
        train(LoraTrainConfig(data_dir=str(data_dir), output=str(out), model=tiny_sdxl, **cfg))
    assert not out.exists()
    assert [s for s, _ in common.list_checkpoints(tmp_path / "lora_run" / "checkpoints")] == [0]


# ---------------------------------------------------------------------------------------------------------------
# pivotal tuning


def test_pivotal_tuning_round_trip(tiny_sdxl, data_dir, tmp_path):
    import copy

    from tunelab.core.models import PipeHandle

    out = tmp_path / "tok.safetensors"
    r = train(LoraTrainConfig(data_dir=str(data_dir), output=str(out), model=tiny_sdxl, pivotal_tuning=True,
                              instance_prompt="a TOK image", embedding_lr=1e-2, validation_prompt="a TOK photo",
                              validation_inference_steps=1,
                              **dict(BASE, max_train_steps=2, train_text_encoder=False, checkpointing_steps=0)))
    assert len(r.validation_images) == 1  # sampled through the private tokenizers that know <s0><s1>
    assert r.tokens == ("<s0>", "<s1>") and r.embeddings_path == tmp_path / "tok_emb.safetensors"
    assert "<s0>" not in tiny_sdxl.pipe.tokenizer.get_vocab()  # training used private copies
    from safetensors.torch import load_file

    emb = load_file(str(r.embeddings_path))
    assert emb["clip_l"].shape == (2, 32) and emb["clip_g"].shape == (2, 64)
    # load into a separate pipe so the shared test pipe's vocabulary stays as it is
    own = PipeHandle(pipe=copy.deepcopy(tiny_sdxl.pipe), family="sdxl", source="tiny-sdxl", dtype=tiny_sdxl.dtype,
                     device=tiny_sdxl.device)
    text = "a <s0><s1> image"
    before = prompt.encode(own, text).embeds
    lh = lora.load(own, r.lora_path)
    assert lh.loras[-1].embeddings == ("<s0>", "<s1>")
    ids = own.pipe.tokenizer.convert_tokens_to_ids(["<s0>", "<s1>"])
    assert torch.allclose(own.pipe.text_encoder.get_input_embeddings().weight[ids], emb["clip_l"])
    after = prompt.encode(lh, text).embeds
    assert not torch.allclose(before, after)
    assert torch.equal(prompt.encode(own, "a plain image").embeds,
                       prompt.encode(PipeHandle(pipe=tiny_sdxl.pipe, family="sdxl", source="tiny-sdxl",
                                                dtype=tiny_sdxl.dtype, device=tiny_sdxl.device),
                                     "a plain image").embeds)
    lora.load(own, r.lora_path)  # the same embeddings again: a no-op, not an error


# ---------------------------------------------------------------------------------------------------------------
# other paths: prior preservation (class images generated by the synthesis core), Min-SNR, accumulation,
# gradient checkpointing; stop signals; the node; the CLI


def test_prior_preservation_generates_class_images(tiny_sdxl, data_dir, tmp_path):
    out = tmp_path / "prior.safetensors"
    cfg = dict(BASE, max_train_steps=2, gradient_accumulation_steps=2, train_batch_size=2, checkpointing_steps=0,
               train_text_encoder=False, snr_gamma=5.0, gradient_checkpointing=True, cache_latents=False)
    r = train(LoraTrainConfig(data_dir=str(data_dir), output=str(out), model=tiny_sdxl, with_prior_preservation=True,
                              class_prompt="a photo", num_class_images=2, class_generation_steps=1, **cfg))
    classes = tmp_path / "prior_run" / "class_images"
    assert sorted(p.name for p in classes.glob("*.png")) == ["00000.png", "00001.png"]
    lines = [json.loads(x) for x in (classes / "metadata.jsonl").read_text().splitlines()]
    assert [x["text"] for x in lines] == ["a photo", "a photo"] and all(x["prompt"] == "a photo" for x in lines)
    assert r.steps == 2 and all(np.isfinite(r.losses)) and out.is_file()
    assert not tiny_sdxl.pipe.unet.is_gradient_checkpointing and not tiny_sdxl.pipe.unet.training


def test_sigterm_requests_a_stop_at_the_step_boundary():
    import os
    import signal

    before = signal.getsignal(signal.SIGTERM)
    with common.Control(None, 10) as ctl:
        assert not ctl.stop_requested()
        os.kill(os.getpid(), signal.SIGTERM)
        assert ctl.stop_requested()
        with pytest.raises(Interrupted, match="step 4.*resume"):
            ctl.interrupted(4, "ckpt-4")
    assert signal.getsignal(signal.SIGTERM) is before


def test_node_trains_into_loras_folder(tiny_sdxl, tmp_path, monkeypatch):
    from tunelab.nodes import registry
    from tunelab.nodes.train import TrainLora

    classes, _ = registry.build()
    assert classes["TuneLabTrainLora"] is TrainLora
    monkeypatch.setenv("TUNELAB_OUTPUT", str(tmp_path / "output"))
    monkeypatch.setenv("TUNELAB_MODELS", str(tmp_path / "models"))
    _write_dataset(tmp_path / "output" / "tunelab" / "ds")
    node = TrainLora()
    for bad, match in [("/etc", "outside"), ("../x", r"\.\."), ("tunelab/missing", "no folder")]:
        with pytest.raises(TuneLabError, match=match):
            node.train(tiny_sdxl, bad, "mine", "wrong", 1, 1e-3, 4, 64, 4, 1, 0)
    with pytest.raises(TuneLabError, match="lora_name"):
        node.train(tiny_sdxl, "tunelab/ds", "../escape", "wrong", 1, 1e-3, 4, 64, 4, 1, 0)
    out = node.train(tiny_sdxl, str(tmp_path / "output" / "tunelab" / "ds"), "tunelab/mine", "wrong", 2, 1e-3, 4,
                     64, 4, 1, 0, validation_inference_steps=1)
    lora_pipe, name, curve, validation, grid = out["result"]
    assert name == "tunelab/mine.safetensors"
    assert (tmp_path / "models" / "loras" / "tunelab" / "mine.safetensors").is_file()
    assert lora_pipe.loras[-1].name == name and not tiny_sdxl.loras
    assert curve.shape == (1, 360, 640, 3) and validation.shape == (1, 64, 64, 3)
    assert grid.shape[0] == 1 and grid.shape[2] == 64 and grid.shape[1] > 64  # the seed's prompt, final step
    spec = TrainLora.INPUT_TYPES()
    for section in spec.values():
        for input_name, entry in section.items():
            assert entry[1].get("tooltip"), f"{input_name} has no tooltip"
    assert "the seed's; the script's is 4" in spec["required"]["train_batch_size"][1]["tooltip"]
    assert "the script's" in spec["required"]["learning_rate"][1]["tooltip"]
    assert out["ui"]["images"][0]["subfolder"] == "tunelab/train/tunelab/mine"


def test_cli_trains_and_resumes(data_dir, tmp_path, capsys):
    from tunelab import cli

    out = tmp_path / "cli.safetensors"
    args = ["train-lora", "--data", str(data_dir), "--out", str(out), "--resolution", "64", "--max-train-steps", "2",
            "--train-batch-size", "4", "--gradient-accumulation-steps", "1", "--cache-latents", "--dtype", "fp32",
            "--device", "cpu", "--checkpointing-steps", "1"]
    assert cli.main(args) == 0
    assert out.is_file() and "wrote" in capsys.readouterr().out
    assert cli.main(args + ["--resume", "latest", "--rank", "8"]) == 2
    assert "rank: 4 -> 8" in capsys.readouterr().err
    from tunelab.training.__main__ import main as training_main

    assert training_main(["lora"] + args[1:] + ["--max-train-steps", "3", "--resume", "latest"]) == 0
    assert lora.read_file(out)[1]["steps"] == "3"


# ---------------------------------------------------------------------------------------------------------------
# training.common on its own (what the InstructPix2Pix trainer reuses)


def test_checkpoints_are_atomic_verified_pruned_and_restorable(tmp_path):
    from diffusers.optimization import get_scheduler

    w = {"layer.weight": torch.nn.Parameter(torch.randn(3, 2))}
    opt = torch.optim.AdamW(w.values(), lr=0.1)
    sched = get_scheduler("linear", optimizer=opt, num_warmup_steps=1, num_training_steps=10)
    g = torch.Generator().manual_seed(1)
    folder = tmp_path / "ck"
    folder.mkdir()
    (folder / "checkpoint-100.safetensors").write_bytes(b"junk")  # a stray name that crashes diffusers' resume
    (folder / "checkpoint-0").mkdir()  # an older save that was cut short (no marker)
    for step in (1, 2, 3):
        w["layer.weight"].sum().backward()
        opt.step()
        sched.step()
        opt.zero_grad()
        torch.randn(2, generator=g)
        common.save_checkpoint(folder, step, weights=w, optimizer=opt, lr_scheduler=sched, generators={"g": g},
                               config={"x": 1}, base={}, state={"losses": [0.5] * step}, keep=2)
    assert [s for s, _ in common.list_checkpoints(folder)] == [2, 3]
    assert (folder / "checkpoint-100.safetensors").exists() and not (folder / "checkpoint-0").exists()
    assert not list(folder.glob(".checkpoint-*"))  # no temporary folders left
    expected_next = torch.randn(2, generator=g)
    latest = common.find_checkpoint(folder, "latest")
    assert latest.name == "checkpoint-000003" and common.find_checkpoint(folder, str(folder)) == latest

    w2 = {"layer.weight": torch.nn.Parameter(torch.zeros(3, 2))}
    opt2 = torch.optim.AdamW(w2.values(), lr=0.1)
    sched2 = get_scheduler("linear", optimizer=opt2, num_warmup_steps=1, num_training_steps=10)
    g2 = torch.Generator().manual_seed(99)
    ck = common.load_checkpoint(latest, config={"x": 1}, base={})
    ck.load_weights(w2)
    ck.restore(optimizer=opt2, lr_scheduler=sched2, generators={"g": g2})
    assert ck.step == 3 and ck.state["losses"] == [0.5] * 3
    assert torch.equal(w2["layer.weight"], w["layer.weight"])
    assert torch.equal(opt2.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])
    assert sched2.get_last_lr() == sched.get_last_lr()
    assert torch.equal(torch.randn(2, generator=g2), expected_next)

    with pytest.raises(TuneLabError, match="x: 1 -> 2"):
        common.load_checkpoint(latest, config={"x": 2}, base={})
    data = (latest / common.STATE_TENSORS).read_bytes()
    (latest / common.STATE_TENSORS).write_bytes(data[:-10])
    with pytest.raises(TuneLabError, match="truncated"):
        common.load_checkpoint(latest, config={"x": 1}, base={})


def test_base_identity_survives_lora_wrappers_and_tells_models_apart(trained, tiny_sdxl, tiny_sd15):
    ckpt = common.list_checkpoints(trained["result"].run_dir / "checkpoints")[-1][1]
    saved = json.loads((ckpt / common.STATE_JSON).read_text())["base"]
    lora.load(tiny_sdxl, trained["result"].lora_path)  # wraps the layers (to_k.base_layer.weight)
    common.check_base(saved, common.base_identity(tiny_sdxl), ckpt)
    with pytest.raises(TuneLabError, match="sd15"):
        common.check_base(saved, common.base_identity(tiny_sd15), ckpt)
    other = json.loads(json.dumps(saved))
    name = next(iter(other["probe"]))
    other["probe"][name][0] += 1.0
    with pytest.raises(TuneLabError, match="different weights"):
        common.check_base(other, common.base_identity(tiny_sdxl), ckpt)


def test_loss_curve_image():
    img = common.loss_curve_image([1.2, 1.1, float("nan"), 1.0, 0.9])
    assert img.size == (640, 360)
    arr = np.asarray(img)
    assert (arr != 255).any(axis=2).sum() > 500  # axes, labels and two lines were drawn
    assert common.smooth([1.0, float("nan"), 3.0], 0.5)[1] == 1.0


def test_trains_under_comfyui_inference_mode(tmp_path):
    """ComfyUI runs every node under torch.inference_mode(); loading and training must still work there."""
    from tunelab.core import models

    saved = dict(models._CACHE)
    models.clear_cache()  # load afresh inside inference mode, as a ComfyUI graph would
    try:
        with torch.inference_mode():
            handle = models.load("tiny-sdxl", device="cpu", dtype="fp32")
            # an earlier node of the same server loaded a LoRA into the shared pipe
            lora.load(handle, tiny.wrong_lora(), 1.0)
            data = _write_dataset(tmp_path / "data", n=2)
            result = train(LoraTrainConfig(data_dir=str(data), output=str(tmp_path / "im.safetensors"), model=handle,
                                           resolution=64, max_train_steps=2, train_batch_size=1, seed=0,
                                           checkpointing_steps=0))
        assert result.lora_path.is_file() and len(result.losses) == 2
    finally:
        models.clear_cache()
        models._CACHE.update(saved)
