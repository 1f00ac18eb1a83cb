"""A newcomer's path from the command line on the tiny presets, with no size flags: what one command writes, the
next one reads (synth -> train-lora -> compare --lora; instruct-data synth -> train-ip2p --mode lora ->
eval-ip2p with the LoRA). Few images, 1-2 steps, so the suite stays fast."""
import json

import numpy as np
import pytest
from PIL import Image

from tunelab import cli
from tunelab.core.files import safetensors_metadata
from tunelab.core.errors import TuneLabError


def run(capsys, *argv):
    rc = cli.main([str(a) for a in argv])
    out = capsys.readouterr()
    assert rc == 0, out
    return out.out


def test_wrong_lora_chain(tmp_path, capsys):
    data, lora, compared = tmp_path / "data", tmp_path / "wrong.safetensors", tmp_path / "compare"
    run(capsys, "synth", "--out", data, "--keywords", "blurry", "ugly", "--guidance", "8", "--device", "cpu")
    assert Image.open(data / "00000.png").size == (64, 64)  # the tiny default
    out = run(capsys, "train-lora", "--data", data, "--out", lora, "--max-train-steps", "2",
              "--gradient-accumulation-steps", "1", "--device", "cpu")
    assert "2 steps" in out
    meta = safetensors_metadata(lora)
    assert meta["resolution"] == "64"  # followed the dataset: 1024 would have refused the 64x64 images
    out = run(capsys, "compare", "--lora", lora, "--steps", "2", "--out", compared, "--device", "cpu")
    settings = json.loads((compared / "settings.json").read_text())
    assert len(settings["states"]) == 3 and lora.name in json.dumps(settings["states"][2])
    assert Image.open(compared / "01.png").size == (128, 128)


def test_lora_trainer_refusal_names_the_flags(tmp_path, capsys):
    data = tmp_path / "data"
    run(capsys, "synth", "--out", data, "--keywords", "blurry", "--guidance", "8", "--device", "cpu")
    rc = cli.main(["train-lora", "--data", str(data), "--out", str(tmp_path / "l.safetensors"), "--resolution", "128",
                   "--max-train-steps", "1", "--device", "cpu"])
    err = capsys.readouterr().err
    assert rc == 2
    assert "smaller than the training resolution 128" in err
    assert "--resolution 64" in err and "--allow-upscale" in err


def test_instruct_pix2pix_lora_chain(tmp_path, capsys):
    clean = tmp_path / "clean"
    clean.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(clean / f"c{i}.png")
    data, lora, report = tmp_path / "pairs", tmp_path / "derain.safetensors", tmp_path / "eval"
    run(capsys, "instruct-data", "synth", "--clean", clean, "--out", data, "--degradations", "rain,blur",
        "--val-fraction", "0.3")
    info = json.loads((data / "dataset_info.json").read_text())
    assert info["splits"] == {"train": 4, "validation": 2}
    out = run(capsys, "train-ip2p", "--data", data, "--out", lora, "--mode", "lora", "--max-train-steps", "2",
              "--train-batch-size", "1", "--gradient-accumulation-steps", "1", "--learning-rate", "0.05",
              "--device", "cpu")
    assert "trained 2 step(s)" in out
    assert safetensors_metadata(lora)["resolution"] == "64"  # the dataset's size, not 256 upscaled
    run(capsys, "eval-ip2p", "--dataset", data, "--model", "base=tiny-ip2p", "--lora", f"tuned={lora}",
        "--model", f"half=tiny-ip2p+{lora}:0.5", "--steps", "2", "--out", report, "--device", "cpu")
    result = json.loads((report / "report.json").read_text())
    assert set(result["summary"]) == {"base", "tuned", "half"}
    models = {m["label"]: m for m in result["settings"]["models"]}
    assert models["base"]["loras"] == [] and len(models["tuned"]["loras"]) == 1
    assert [r["weight"] for r in models["half"]["loras"]] == [0.5]
    # the held-out pairs are the validation split, and the LoRA changes the edits
    images = {label: sorted((report / label).rglob("*.png")) for label in ("base", "tuned")}
    assert len(images["base"]) == 2 == len(images["tuned"])
    assert any(not np.array_equal(np.asarray(Image.open(a)), np.asarray(Image.open(b)))
               for a, b in zip(images["base"], images["tuned"]))


def test_model_specs():
    from tunelab.cli.eval_ip2p import ModelSpec, model_specs

    specs = model_specs(["tiny-ip2p", "tuned=tiny-ip2p+a.safetensors:0.7+b.safetensors", "x=C:/m/ip2p"],
                        ["mine=/loras/c.safetensors"])
    assert specs == [ModelSpec("", "tiny-ip2p"),
                     ModelSpec("tuned", "tiny-ip2p", (("a.safetensors", 0.7), ("b.safetensors", 1.0))),
                     ModelSpec("x", "C:/m/ip2p"),
                     ModelSpec("mine", "tiny-ip2p", (("/loras/c.safetensors", 1.0),))]
    assert model_specs(None, ["l.safetensors:2"]) == [ModelSpec("", "tiny-ip2p"),
                                                      ModelSpec("", "tiny-ip2p", (("l.safetensors", 2.0),))]
    with pytest.raises(TuneLabError, match="names no model") as e:
        model_specs(["t=+a.safetensors"], [])
    assert e.value.input_name == "model"
