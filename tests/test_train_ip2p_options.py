"""InstructPix2Pix trainer options from train_instruct_pix2pix.py that TuneLab lacked (Adam betas / weight decay /
epsilon, epochs, max_train_samples, 8-bit Adam, scale_lr), validation edits during the run, the recipes, and the
imagefolder layout the instruct-data command writes (tiny-ip2p, 64 px, a few steps)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))
from test_train_ip2p import StopAt2, _cfg, _dataset, _picture  # noqa: E402

from tunelab.core.errors import Interrupted, TuneLabError  # noqa: E402
from tunelab.core.progress import Progress  # noqa: E402
from tunelab.training import common  # noqa: E402


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return _dataset(tmp_path_factory.mktemp("ip2p_opts"))


class _Previews(Progress):
    shown: list = []

    def preview(self, image):
        _Previews.shown.append((self.value, image.size))


def test_validation_edits_at_the_configured_steps(dataset, tmp_path):
    from tunelab.training.ip2p import train

    _picture(99).save(tmp_path / "val.png")
    _Previews.shown = []
    r = train(_cfg(dataset, tmp_path / "out", max_train_steps=4, validation_image=str(tmp_path / "val.png"),
                   validation_prompt="derain the image", validation_steps=2, num_validation_images=2),
              progress=_Previews)
    files = sorted(p.name for p in (r.run_dir / "validation").glob("*.png"))
    assert files == [f"step-00000{s}-0{i}.png" for s in (2, 4) for i in (0, 1)]
    with Image.open(r.run_dir / "validation" / "step-000002-01.png") as im:
        assert im.size == (64, 64) and im.text["instruction"] == "derain the image" and im.text["seed"] == "4"
    assert _Previews.shown == [(2, (128, 64))]  # during the run; the last one comes back as the result
    assert len(r.validation_images) == 2 and r.validation_grid.size[0] == 128
    with Image.open(r.validation_grid_png) as im:
        assert json.loads(im.text["steps"]) == [2, 4]
    with pytest.raises(TuneLabError, match="validation_image"):
        train(_cfg(dataset, tmp_path / "x", validation_prompt="derain the image"))
    with pytest.raises(TuneLabError, match="validation image"):
        train(_cfg(dataset, tmp_path / "x", validation_prompt="derain", validation_image=str(tmp_path / "no.png")))


def test_epochs_max_train_samples_scale_lr_and_adam_settings(dataset, tmp_path):
    from tunelab.training.ip2p import train

    r = train(_cfg(dataset, tmp_path / "e", max_train_steps=None, num_train_epochs=2, max_train_samples=4,
                   train_batch_size=2, gradient_accumulation_steps=1, scale_lr=True, adam_beta1=0.8,
                   adam_beta2=0.99, adam_weight_decay=0.0, adam_epsilon=1e-6, checkpointing_steps=3))
    assert r.steps == 4  # 2 epochs x 4 samples / batch 2
    ckpt = common.load_checkpoint(common.list_checkpoints(r.run_dir / "checkpoints")[-1][1])
    doc = ckpt.doc
    group = common.unpack(doc["optimizer"], ckpt.tensors)["param_groups"][0]
    assert group["lr"] == pytest.approx(1e-3 * 2) and tuple(group["betas"]) == (0.8, 0.99)
    assert group["eps"] == 1e-6 and group["weight_decay"] == 0.0
    assert doc["config"]["max_train_samples"] == 4


def test_eight_bit_adam_trains_and_resumes_exactly(dataset, tmp_path, monkeypatch):
    pytest.importorskip("bitsandbytes")
    from test_train_options import bnb_runs_here

    if not bnb_runs_here():
        pytest.skip("this bitsandbytes cannot run 8-bit AdamW on a CPU")
    import functools

    import bitsandbytes.optim as bnb_optim

    from tunelab.training.ip2p import train

    monkeypatch.setattr(bnb_optim, "AdamW8bit", functools.partial(bnb_optim.AdamW8bit, min_8bit_size=1))
    kw = dict(mode="lora", max_train_steps=4, use_8bit_adam=True, learning_rate=1e-2)
    full = train(_cfg(dataset, tmp_path / "a.safetensors", **kw))
    with pytest.raises(Interrupted):
        train(_cfg(dataset, tmp_path / "b.safetensors", **kw), progress=StopAt2)
    resumed = train(_cfg(dataset, tmp_path / "b.safetensors", resume="latest", **kw))
    assert resumed.losses == full.losses and all(np.isfinite(full.losses))
    from safetensors.torch import load_file

    a, b = load_file(str(full.output)), load_file(str(resumed.output))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_command_line_flags_and_recipe(capsys):
    from tunelab import cli
    from tunelab.cli import train_ip2p

    with pytest.raises(SystemExit):
        cli.main(["train-ip2p", "--help"])
    text = capsys.readouterr().out
    for flag in ("--adam-beta1", "--adam-beta2", "--adam-weight-decay", "--adam-epsilon", "--num-train-epochs",
                 "--max-train-samples", "--use-8bit-adam", "--scale-lr", "--validation-image", "--recipe",
                 "--report-to"):
        assert flag in text, flag
    assert "the seed's; the script's is 16" in " ".join(text.split())
    parser = cli.build_parser()
    seed = train_ip2p.config_from_args(parser.parse_args(["train-ip2p", "--data", "d", "--out", "o"]))
    script = train_ip2p.config_from_args(parser.parse_args(["train-ip2p", "--data", "d", "--out", "o",
                                                            "--recipe", "script", "--learning-rate", "3e-4"]))
    assert (seed.train_batch_size, seed.learning_rate, seed.random_flip) == (2, 5e-5, True)
    assert (script.train_batch_size, script.gradient_accumulation_steps, script.lr_warmup_steps) == (16, 1, 500)
    assert script.learning_rate == 3e-4 and script.random_flip is False and script.max_train_steps is None
    assert script.conditioning_dropout_prob is None and script.num_train_epochs == 100


# ---------------------------------------------------------------------------------------------------------------
# datasets that interchange with diffusers


def test_instruct_data_folder_loads_with_datasets_imagefolder(dataset):
    datasets = pytest.importorskip("datasets")
    ds = datasets.load_dataset("imagefolder", data_dir=str(dataset))["train"]
    # train_instruct_pix2pix.py's default columns, images decoded by datasets itself
    assert {"input_image", "edit_prompt", "edited_image"} <= set(ds.column_names)
    assert isinstance(ds.features["input_image"], datasets.Image) and isinstance(ds.features["edited_image"],
                                                                                 datasets.Image)
    from tunelab.core import instruct_data

    pairs = instruct_data.read(dataset)  # and TuneLab reads the same folder without a mapping
    assert len(ds) == len(pairs) == 6
    for row, pair in zip(ds, pairs):
        assert row["edit_prompt"] == pair.instruction
        assert np.array_equal(np.asarray(row["input_image"].convert("RGB")), np.asarray(pair.images()[0]))


def test_other_columns_are_refused_with_a_suggested_mapping(tmp_path):
    from tunelab.core import instruct_data

    folder = tmp_path / "hub_style"
    folder.mkdir()
    lines = []
    for i in range(2):
        _picture(i).save(folder / f"o{i}.png")
        _picture(i + 5).save(folder / f"c{i}.png")
        lines.append(json.dumps({"original_image_file_name": f"o{i}.png", "prompt": "Cartoonize it.",
                                 "cartoon_file_name": f"c{i}.png"}))
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(TuneLabError, match=r"--columns input=original_image,instruction=prompt,edited=cartoon"):
        instruct_data.read(folder)
    pairs = instruct_data.read(folder, columns="input=original_image,instruction=prompt,edited=cartoon")
    assert [p.input_path.name for p in pairs] == ["o0.png", "o1.png"]
    (folder / "metadata.jsonl").write_text("".join(json.dumps({"original_image_file_name": f"o{i}.png",
                                                               "edit_prompt": "Cartoonize it.",
                                                               "cartoonized_image_file_name": f"c{i}.png"}) + "\n"
                                                   for i in range(2)))
    with pytest.raises(TuneLabError, match="preset 'cartoonization'"):
        instruct_data.read(folder)
    assert len(instruct_data.read(folder, columns="cartoonization")) == 2
