"""The LoRA trainer's options beyond the script's loop, on tiny-sdxl (64 px, a few steps): aspect-ratio buckets,
Prodigy / 8-bit AdamW / DoRA (each learns and resumes exactly after a SIGKILL), caption dropout and tag shuffle,
validation during the run (images per step, previews, a grid), TensorBoard logs, and the refusals."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))
from test_train_lora import _StopAt, _fixed_noise_loss, _write_dataset  # noqa: E402

from tunelab.core import lora  # noqa: E402
from tunelab.core.errors import Interrupted, TuneLabError  # noqa: E402
from tunelab.core.progress import Progress  # noqa: E402
from tunelab.training import common  # noqa: E402
from tunelab.training.lora_sdxl import (LoraTrainConfig, assign_bucket, bucket_sizes, epoch_batches,  # noqa: E402
                                        prepare_examples, process_caption, train)

BASE = dict(resolution=64, train_batch_size=2, gradient_accumulation_steps=1, learning_rate=3e-2, rank=4, seed=0,
            checkpointing_steps=0, max_train_steps=4)


def _same_lora(a, b):
    sa, sb = lora.read_file(a)[0], lora.read_file(b)[0]
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return _write_dataset(tmp_path_factory.mktemp("options_data"))


# ---------------------------------------------------------------------------------------------------------------
# aspect-ratio buckets

SIZES = [(128, 64), (64, 128), (96, 96), (192, 64), (80, 112), (64, 64)]  # (w, h): 2:1, 1:2, 1:1, 3:1, 5:7, 1:1


@pytest.fixture(scope="module")
def mixed_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("mixed")
    rng = np.random.default_rng(0)
    lines = []
    for i, (w, h) in enumerate(SIZES):
        a = (rng.random((h, w, 3)) * 60).astype(np.uint8)
        a[:, :, i % 3] += 150
        a[:: 3 + i] = 255
        Image.fromarray(a).save(folder / f"{i:02d}.png")
        lines.append(json.dumps({"file_name": f"{i:02d}.png", "text": "wrong"}))
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return folder


class _Rec:
    def __init__(self, path):
        self.path, self.file_name = path, path.name
        self.image = Image.open(path).convert("RGB")
        self.size = self.image.size


def test_bucket_sizes_keep_the_budget_and_the_step():
    buckets = bucket_sizes(1024, 64)
    assert (1024, 1024) in buckets and (2048, 512) in buckets and (512, 2048) in buckets
    assert all(w % 64 == 0 and h % 64 == 0 and w * h <= 1024 * 1024 and 256 <= min(w, h) for w, h in buckets)
    assert assign_bucket(1920, 1080, buckets, 64, False) == (1344, 768)  # 16:9 -> the nearest aspect, 1.75
    assert assign_bucket(300, 600, buckets, 64, False) == (256, 576)  # smaller than its bucket: its own, no upscale
    assert assign_bucket(300, 600, buckets, 64, True) == (704, 1408)


def test_buckets_neither_distort_nor_crop_beyond_the_bucket(mixed_dir):
    recs = [_Rec(p) for p in sorted(mixed_dir.glob("*.png"))]
    buckets = bucket_sizes(64, 32)
    ex = prepare_examples(recs, ["wrong"] * len(recs), resolution=64, center_crop=False, random_flip=False, seed=0,
                          allow_upscale=False, buckets=buckets, bucket_step=32)
    seen = set()
    for rec, e in zip(recs, ex):
        w, h = rec.size
        oh, ow, top, left, th, tw = e.time_ids
        assert (oh, ow) == (h, w) and tuple(e.pixels.shape) == (3, th, tw)
        assert (tw, th) == assign_bucket(w, h, buckets, 32, False) and tw <= w and th <= h  # never upscaled
        # one scale for both sides, just covering the bucket: the crop is what the bucket's aspect needs
        scale = max(tw / w, th / h)
        rw, rh = max(tw, round(w * scale)), max(th, round(h * scale))
        assert abs(rw / rh - w / h) <= 1.0 / min(rh, rw) + 1e-9  # the aspect ratio survives (to the pixel)
        assert min(rw - tw, rh - th) == 0 and 0 <= top <= rh - th and 0 <= left <= rw - tw
        # no other bucket would have needed less cropping
        lost = 1 - tw * th / (rw * rh)
        for bw, bh in buckets:
            s2 = max(bw / w, bh / h)
            assert lost <= 1 - bw * bh / (max(bw, round(w * s2)) * max(bh, round(h * s2))) + 1e-9
        # the pixels are the resized image's, cropped at (top, left)
        resized = np.asarray(rec.image.resize((rw, rh), Image.Resampling.LANCZOS))
        assert np.array_equal(e.pixels.permute(1, 2, 0).numpy(), resized[top:top + th, left:left + tw])
        seen.add(e.time_ids)
    assert len(seen) == len(recs)  # the conditioning is each image's own


def test_batches_stay_within_a_bucket_and_follow_the_seed():
    ids = [(64, 64), (128, 32), (64, 64), (32, 128), (64, 64), (128, 32), (64, 64)] * 2
    a = epoch_batches(ids, 2, seed=3, epoch=1)
    assert a == epoch_batches(ids, 2, seed=3, epoch=1) and a != epoch_batches(ids, 2, seed=3, epoch=2)
    assert sorted(i for b in a for i in b) == list(range(len(ids)))
    assert all(len({ids[i] for i in b}) == 1 for b in a)
    assert len(a) == 4 + 2 + 1  # ceil(8/2) + ceil(4/2) + ceil(2/2)
    flat = [(64, 64)] * 5
    order = torch.randperm(5, generator=torch.Generator().manual_seed(3 * 1_000_003)).tolist()
    assert epoch_batches(flat, 2, 3, 0) == [order[0:2], order[2:4], order[4:]]  # one bucket: the plain loop


def test_bucketed_run_conditions_per_image_and_resumes_exactly(tiny_sdxl, mixed_dir, tmp_path):
    seen = []

    def spy(module, args, kwargs):
        seen.append((tuple(args[0].shape[2:]), kwargs["added_cond_kwargs"]["time_ids"].tolist()))

    out = tmp_path / "b.safetensors"
    cfg = dict(data_dir=str(mixed_dir), output=str(out), model=tiny_sdxl, aspect_buckets=True, bucket_step=32,
               **dict(BASE, max_train_steps=6))
    hook = tiny_sdxl.pipe.unet.register_forward_pre_hook(spy, with_kwargs=True)
    try:
        full = train(LoraTrainConfig(**cfg))
    finally:
        hook.remove()
    recs = [_Rec(p) for p in sorted(mixed_dir.glob("*.png"))]
    ex = prepare_examples(recs, ["wrong"] * len(recs), resolution=64, center_crop=False, random_flip=False, seed=0,
                          allow_upscale=False, buckets=bucket_sizes(64, 32), bucket_step=32)
    own = {e.time_ids: tuple(e.pixels.shape[1:]) for e in ex}
    assert len(seen) == 6 and len({shape for shape, _ in seen}) > 1  # batches of several buckets
    for shape, rows in seen:
        for row in rows:  # every row is one image's own conditioning, and the batch is that bucket's size
            assert tuple(own[tuple(int(v) for v in row)]) == (shape[0] * 8, shape[1] * 8)
    stop = type("StopAt3", (_StopAt,), {"at": 3})
    out2 = tmp_path / "b2.safetensors"
    cfg2 = dict(cfg, output=str(out2))
    with pytest.raises(Interrupted, match="step 3"):
        train(LoraTrainConfig(**cfg2), progress=stop)
    resumed = train(LoraTrainConfig(**cfg2, resume="latest"))
    assert resumed.losses == full.losses and _same_lora(out, out2)


# ---------------------------------------------------------------------------------------------------------------
# Prodigy, 8-bit AdamW, DoRA: each learns and resumes exactly after a SIGKILL

OPTIONS = {
    # Prodigy grows its step size from d0=1e-6; on a toy model d_coef speeds that up so a few steps show learning
    "prodigy": ["--optimizer", "prodigy", "--learning-rate", "1.0", "--prodigy-d-coef", "1000"],
    "adamw8bit": ["--optimizer", "adamw8bit", "--learning-rate", "3e-2"],
    "dora": ["--use-dora", "--learning-rate", "3e-2"],
}
_PATCH_8BIT = ("import functools, bitsandbytes.optim as o; "
               "o.AdamW8bit = functools.partial(o.AdamW8bit, min_8bit_size=1)")  # 8-bit state for tiny tensors too


def bnb_runs_here() -> bool:
    """bitsandbytes installed and able to step 8-bit AdamW on the CPU (its CPU backend came with 0.45+)."""
    try:
        common.make_optimizer("adamw8bit", [{"params": [torch.nn.Parameter(torch.zeros(8))], "lr": 1e-3}],
                              betas=(0.9, 0.999), eps=1e-8, device="cpu")
    except (ImportError, TuneLabError):
        return False
    return True


def _needs(kind):
    pkg = {"prodigy": "prodigyopt", "adamw8bit": "bitsandbytes"}.get(kind)
    if pkg:
        pytest.importorskip(pkg)
    if kind == "adamw8bit" and not bnb_runs_here():
        pytest.skip("this bitsandbytes cannot run 8-bit AdamW on a CPU (test_8bit_refusal covers the message)")


def test_8bit_refusal_names_the_device_when_bitsandbytes_cannot_run(monkeypatch):
    bnb = pytest.importorskip("bitsandbytes")

    def broken(*a, **k):
        raise RuntimeError("no kernel for this device")

    monkeypatch.setattr(bnb.optim, "AdamW8bit", broken)
    with pytest.raises(TuneLabError, match="cannot run 8-bit AdamW on cpu.*no kernel"):
        common.make_optimizer("adamw8bit", [{"params": [torch.nn.Parameter(torch.zeros(8))], "lr": 1e-3}],
                              betas=(0.9, 0.999), eps=1e-8, device="cpu")


def _cli_args(data, out, kind, steps):
    return ["train-lora", "--data", str(data), "--out", str(out), "--resolution", "64", "--train-batch-size", "2",
            "--gradient-accumulation-steps", "1", "--rank", "4", "--dtype", "fp32", "--device", "cpu",
            "--max-train-steps", str(steps), "--checkpointing-steps", "2", *OPTIONS[kind]]


@pytest.mark.parametrize("kind", list(OPTIONS))
def test_option_learns_and_resumes_exactly_after_sigkill(kind, tiny_sdxl, data_dir, tmp_path, monkeypatch):
    _needs(kind)
    from tunelab import cli

    if kind == "adamw8bit":
        import functools

        import bitsandbytes.optim as bnb_optim

        monkeypatch.setattr(bnb_optim, "AdamW8bit", functools.partial(bnb_optim.AdamW8bit, min_8bit_size=1))
    # a long run, killed with SIGKILL as soon as it has written a complete checkpoint
    killed = tmp_path / "killed.safetensors"
    script = (_PATCH_8BIT + "; " if kind == "adamw8bit" else "") + \
        f"from tunelab import cli; cli.main({_cli_args(data_dir, killed, kind, 100_000)!r})"
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    ckpts = tmp_path / "killed_run" / "checkpoints"
    deadline = time.monotonic() + 300
    try:
        while not common.list_checkpoints(ckpts):
            assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
            assert time.monotonic() < deadline, "no checkpoint within 300 s"
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL and not killed.exists()
    at = common.list_checkpoints(ckpts)[-1][0]
    steps = at + (10 if kind == "prodigy" else 2)
    # resume from the newest complete checkpoint; the uninterrupted run for comparison
    assert cli.main(_cli_args(data_dir, killed, kind, steps) + ["--resume", "latest"]) == 0
    straight = tmp_path / "straight.safetensors"
    assert cli.main(_cli_args(data_dir, straight, kind, steps)) == 0
    assert _same_lora(killed, straight)
    losses = [json.loads(Image.open(p.with_name(p.stem + "_run") / "loss_curve.png").text["losses"])
              for p in (killed, straight)]
    assert losses[0] == losses[1] and len(losses[0]) == steps
    # it learned: the LoRA lowers the denoising loss at fixed noise
    assert _fixed_noise_loss(lora.load(tiny_sdxl, straight), data_dir) < _fixed_noise_loss(tiny_sdxl, data_dir) - 0.005
    state = lora.read_file(straight)
    settings = json.loads(state[1]["tunelab_settings"])
    if kind == "dora":
        scales = [k for k in state[0] if k.endswith(".dora_scale")]
        assert settings["use_dora"] and len(scales) == 64
        assert all(state[0][k].ndim == 2 and state[0][k].shape[1] == 1 for k in scales)
    else:
        assert settings["optimizer"] == kind
    if kind == "adamw8bit":  # the optimizer state really was 8-bit, and the checkpoint kept it without pickle
        from safetensors.torch import load_file

        tensors = load_file(str(common.list_checkpoints(ckpts)[-1][1] / common.STATE_TENSORS))
        assert any(k.startswith("optimizer.") and v.dtype == torch.uint8 for k, v in tensors.items())


def test_missing_optimizer_package_is_refused_before_loading(data_dir, tmp_path, monkeypatch):
    import builtins

    real = builtins.__import__

    def no_prodigy(name, *a, **k):
        if name.split(".")[0] in ("prodigyopt", "bitsandbytes"):
            raise ImportError(name)
        return real(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_prodigy)
    monkeypatch.setattr("importlib.import_module", lambda name, *a: no_prodigy(name))
    out = tmp_path / "x.safetensors"
    for change, match in [({"optimizer": "prodigy"}, "prodigyopt"), ({"use_8bit_adam": True}, "bitsandbytes"),
                          ({"optimizer": "lion"}, "unknown optimizer")]:
        # model="not-a-model": refused before anything would load it
        with pytest.raises(TuneLabError, match=match):
            train(LoraTrainConfig(data_dir=str(data_dir), output=str(out), model="no/such/model", **BASE, **change))
    with pytest.raises(TuneLabError, match="bucket_step"):
        train(LoraTrainConfig(data_dir=str(data_dir), output=str(out), model="no/such/model", aspect_buckets=True,
                              bucket_step=16, **BASE))
    assert not out.exists()


# ---------------------------------------------------------------------------------------------------------------
# captions


def test_caption_dropout_and_tag_shuffle():
    g = torch.Generator().manual_seed(0)
    cap = "wrong, blurry, bad hands, watermark, jpeg artifacts"
    outs = [process_caption(cap, g, shuffle=True, keep=1) for _ in range(20)]
    assert all(o.split(", ")[0] == "wrong" and sorted(o.split(", ")) == sorted(cap.split(", ")) for o in outs)
    assert len(set(outs)) > 5
    g2 = torch.Generator().manual_seed(0)
    assert [process_caption(cap, g2, shuffle=True, keep=1) for _ in range(20)] == outs  # from the seed
    drops = [process_caption(cap, g, dropout=0.5) for _ in range(200)]
    assert 60 < drops.count("") < 140 and set(drops) == {"", cap}


@pytest.mark.parametrize("text_encoder", [False, True])
def test_varying_captions_train_and_resume_exactly(text_encoder, tiny_sdxl, tmp_path):
    data = _write_dataset(tmp_path / "d", captions=False)
    (data / "metadata.jsonl").write_text("".join(
        json.dumps({"file_name": f"{i:02d}.png", "text": f"wrong, tag{i}, stripes, colour {i % 3}"}) + "\n"
        for i in range(4)))
    cfg = dict(data_dir=str(data), use_captions=True, caption_dropout=0.3, shuffle_tags=True, keep_tags=1,
               model=tiny_sdxl, train_text_encoder=text_encoder, text_encoder_lr=1e-3, **BASE)
    a = train(LoraTrainConfig(output=str(tmp_path / "a.safetensors"), **cfg))
    stop = type("StopAt2", (_StopAt,), {"at": 2})
    with pytest.raises(Interrupted):
        train(LoraTrainConfig(output=str(tmp_path / "b.safetensors"), **cfg), progress=stop)
    b = train(LoraTrainConfig(output=str(tmp_path / "b.safetensors"), resume="latest", **cfg))
    assert a.losses == b.losses and _same_lora(a.lora_path, b.lora_path)
    assert all(np.isfinite(a.losses))


def test_each_distinct_caption_is_encoded_once_per_step(tiny_sdxl, data_dir, tmp_path, monkeypatch):
    from tunelab.training import lora_sdxl

    batches = []
    real = lora_sdxl.encode_plain

    def counting(tokenizers, encoders, prompts, device):
        batches.append(list(prompts))
        return real(tokenizers, encoders, prompts, device)

    monkeypatch.setattr(lora_sdxl, "encode_plain", counting)
    train(LoraTrainConfig(data_dir=str(data_dir), output=str(tmp_path / "t.safetensors"), model=tiny_sdxl,
                          train_text_encoder=True, **dict(BASE, train_batch_size=4, max_train_steps=2)))
    assert batches == [["wrong"], ["wrong"]]  # a batch of four identical captions: one encode per step


# ---------------------------------------------------------------------------------------------------------------
# validation during the run, previews, the grid, TensorBoard


class _Previews(Progress):
    shown: list = []

    def preview(self, image):
        _Previews.shown.append((self.value, image.size))


def test_validation_at_the_configured_steps_with_previews_and_a_grid(tiny_sdxl, data_dir, tmp_path):
    _Previews.shown = []
    r = train(LoraTrainConfig(data_dir=str(data_dir), output=str(tmp_path / "v.safetensors"), model=tiny_sdxl,
                              validation_prompt="a photo of a cat\na TOK dog", validation_steps=2,
                              validation_inference_steps=1, validation_seed=7, **BASE), progress=_Previews)
    files = sorted(p.name for p in (r.run_dir / "validation").glob("*.png"))
    assert files == ["step-000002-00.png", "step-000002-01.png", "step-000004-00.png", "step-000004-01.png"]
    with Image.open(r.run_dir / "validation" / "step-000002-01.png") as im:
        assert im.text["prompt"] == "a TOK dog" and im.text["negative"] == "wrong" and im.text["seed"] == "7"
    assert _Previews.shown == [(2, (128, 64)), (4, (128, 64))]  # both prompts side by side, at steps 2 and 4
    assert len(r.validation_images) == 2 and r.validation_grid_png.is_file()
    assert r.validation_grid.size[0] == 128 and r.validation_grid.size[1] > 2 * 64  # two rows (steps 2 and 4)
    with Image.open(r.validation_grid_png) as im:
        assert json.loads(im.text["steps"]) == [2, 4]


def test_tensorboard_logs_loss_lr_grad_norm_and_images(tiny_sdxl, data_dir, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    r = train(LoraTrainConfig(data_dir=str(data_dir), output=str(tmp_path / "tb.safetensors"), model=tiny_sdxl,
                              report_to="tensorboard", validation_prompt="a cat", validation_inference_steps=1,
                              **dict(BASE, max_train_steps=3)))
    events = list((r.run_dir / "logs").rglob("events.out.tfevents.*"))
    assert events
    acc = EventAccumulator(str(events[0].parent), size_guidance={"images": 0, "scalars": 0}).Reload()
    tags = acc.Tags()
    assert {"loss", "lr", "grad_norm"} <= set(tags["scalars"]) and "validation" in tags["images"]
    assert [e.step for e in acc.Scalars("loss")] == [1, 2, 3]
    assert [round(e.value, 5) for e in acc.Scalars("loss")] == [round(v, 5) for v in r.losses]


def test_dora_files_load_back_exactly(tiny_sdxl, data_dir, tmp_path):
    """The kohya file (ComfyUI's dora_scale convention) and the diffusers copy (peft's magnitudes) give TuneLab the
    same weights, which differ from the base model's."""
    from tunelab.core import prompt, sampling

    r = train(LoraTrainConfig(data_dir=str(data_dir), output=str(tmp_path / "d.safetensors"), model=tiny_sdxl,
                              use_dora=True, train_text_encoder=True, text_encoder_lr=1e-2, save_diffusers_copy=True,
                              **dict(BASE, max_train_steps=3)))
    assert lora.read_file(r.lora_path)[1]["tunelab_dora_scale"] == "base_norm"

    def image(handle):
        return sampling.generate(handle, prompt.encode(handle, "wrong", ""), seed=1, steps=2, width=64, height=64)

    kohya, diffusers_copy = image(lora.load(tiny_sdxl, r.lora_path)), image(lora.load(tiny_sdxl, r.diffusers_path))
    assert torch.allclose(kohya, diffusers_copy, atol=1e-5)
    assert not torch.allclose(kohya, image(tiny_sdxl), atol=1e-3)


def test_lora_command_line_recipe_and_default_origins(capsys):
    from tunelab import cli
    from tunelab.cli import train_lora

    with pytest.raises(SystemExit):
        cli.main(["train-lora", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "the seed's; the script's is 4" in text and "--recipe {seed,script}" in text
    for flag in ("--optimizer {adamw,adamw8bit,prodigy}", "--prodigy-safeguard-warmup", "--scale-lr", "--use-dora",
                 "--aspect-buckets", "--caption-dropout", "--shuffle-tags", "--keep-tags", "--report-to"):
        assert flag in text, flag
    parser = cli.build_parser()
    seed = train_lora.config_from_args(parser.parse_args(["train-lora", "--data", "d", "--out", "o.safetensors"]))
    script = train_lora.config_from_args(parser.parse_args(
        ["train-lora", "--data", "d", "--out", "o.safetensors", "--recipe", "script", "--train-batch-size", "2",
         "--validation-prompt", "a cat", "--validation-prompt", "a dog", "--no-prodigy-safeguard-warmup"]))
    assert (seed.train_batch_size, seed.gradient_accumulation_steps, seed.lr_warmup_steps, seed.max_train_steps,
            seed.validation_negative) == (1, 4, 0, 500, "wrong")
    assert (script.train_batch_size, script.gradient_accumulation_steps, script.lr_warmup_steps,
            script.max_train_steps, script.validation_negative) == (2, 1, 500, None, "")
    assert script.validation_prompt == "a cat\na dog" and script.prodigy_safeguard_warmup is False
    assert seed.cache_latents is None  # auto: cached
