"""Every input is checked before any model loads or any step runs: one line naming the input (on the command line,
its flag), the value and the fix, and nothing written."""
import json
import math
import os

import pytest
import torch
from PIL import Image

from tunelab.core import checks, compare, files, instruct_data, lora, models, sampling, tiny
from tunelab.core.errors import TuneLabError


@pytest.fixture
def no_model_loads(monkeypatch):
    """Any model load fails the test: a refusal must come before it."""
    def refuse(*a, **k):
        raise AssertionError("a model was loaded before the bad input was refused")

    monkeypatch.setattr(models, "load", refuse)
    monkeypatch.setattr(lora, "load", refuse)


def snapshot(folder):
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def refused(capsys, argv, flag, folder):
    """Run the CLI; it must exit 2 with one line naming `flag`, and write nothing under `folder`."""
    from tunelab.cli import main

    before = snapshot(folder)
    assert main(argv) == 2, argv
    err = capsys.readouterr().err.strip()
    lines = [line for line in err.splitlines() if not line.startswith("[transformers]")]  # first-import notes
    assert len(lines) == 1 and lines[0].startswith(f"error: {flag}"), err
    assert snapshot(folder) == before, "something was written"
    return lines[0]


# ---------------------------------------------------------------------------------------------------------------
# the examples of issue 11, each refused before any model loads


def test_bad_negative_refused_before_the_first_panel(tmp_path, capsys, no_model_loads):
    line = refused(capsys, ["compare", "--out", str(tmp_path / "o"), "--negative", "(blurry"], "--negative", tmp_path)
    assert "never closed" in line and "position 1" in line


def test_bad_negative_state_refused_before_any_panel_runs(tiny_sdxl, monkeypatch):
    ran = []
    monkeypatch.setattr(sampling, "generate", lambda *a, **k: ran.append(1))
    states = [compare.State("base", tiny_sdxl, ""), compare.State("bad", tiny_sdxl, "(blurry")]
    with pytest.raises(TuneLabError) as e:
        compare.run(states, "a fox", seed=1, steps=2, width=64, height=64)
    assert e.value.input_name == "negative" and not ran


def test_steps_zero_is_refused_not_replaced(tmp_path, capsys, no_model_loads):
    for cmd in (["compare", "--out", str(tmp_path / "o")], ["synth", "--out", str(tmp_path / "d")]):
        line = refused(capsys, cmd + ["--steps", "0"], "--steps", tmp_path)
        assert "0 is out of range" in line and "1 to 1000" in line


@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_non_finite_guidance_refused(tmp_path, capsys, no_model_loads, value):
    refused(capsys, ["compare", "--out", str(tmp_path / "o"), f"--guidance={value}"], "--guidance", tmp_path)
    img = tmp_path / "in.png"
    Image.new("RGB", (16, 16)).save(img)
    refused(capsys, ["edit", "--image", str(img), "--out", str(tmp_path / "e.png"), f"--image-guidance={value}"],
            "--image-guidance", tmp_path)
    refused(capsys, ["compare", "--out", str(tmp_path / "o"), f"--strength={value}"], "--strength", tmp_path)


def test_settings_json_never_holds_nan(tiny_sdxl, tmp_path):
    with pytest.raises(TuneLabError) as e:
        compare.run(compare.default_states(tiny_sdxl, None), "a fox", seed=1, steps=2, guidance=math.nan,
                    width=64, height=64)
    assert e.value.input_name == "guidance"
    # and the writer itself refuses NaN rather than write a file that is not JSON
    result = compare.run(compare.default_states(tiny_sdxl, None)[:1], "a fox", seed=1, steps=1, width=64, height=64)
    result.settings["guidance"] = math.nan
    with pytest.raises(ValueError):
        compare.save(result, tmp_path / "o")
    assert not (tmp_path / "o" / "settings.json").exists()


def test_seed_range_is_the_generators(tmp_path, capsys, no_model_loads):
    assert sampling.generator(checks.SEED_MAX).initial_seed() == checks.SEED_MAX
    for bad in (1 << 64, -5, 2.5, True):
        with pytest.raises(TuneLabError) as e:
            sampling.generator(bad)
        assert e.value.input_name == "seed"
    for cmd in (["compare", "--out", str(tmp_path / "o")], ["synth", "--out", str(tmp_path / "d")],
                ["eval-ip2p", "--dataset", str(tmp_path), "--out", str(tmp_path / "e")]):
        line = refused(capsys, cmd + ["--seed", str(1 << 64)], "--seed", tmp_path)
        assert "2^64-1" in line
    refused(capsys, ["compare", "--out", str(tmp_path / "o"), "--seed", "-2"], "--seed", tmp_path)


def test_trainer_seed_range(tmp_path, capsys, no_model_loads):
    (tmp_path / "data").mkdir()
    line = refused(capsys, ["train-lora", "--data", str(tmp_path / "data"), "--out", str(tmp_path / "l.safetensors"),
                            "--seed", str(1 << 63)], "--seed", tmp_path)
    assert "2^63-1" in line


def test_out_of_the_wrong_kind_refused_before_the_work(tmp_path, capsys, no_model_loads):
    existing_file = tmp_path / "taken"
    existing_file.write_text("x")
    line = refused(capsys, ["compare", "--out", str(existing_file)], "--out", tmp_path)
    assert "existing file" in line
    img = tmp_path / "in.png"
    Image.new("RGB", (16, 16)).save(img)
    (tmp_path / "folder").mkdir()
    line = refused(capsys, ["edit", "--image", str(img), "--out", str(tmp_path / "folder")], "--out", tmp_path)
    assert "existing folder" in line
    line = refused(capsys, ["edit", "--image", str(img), "--out", str(tmp_path / "x.gif")], "--out", tmp_path)
    assert ".png" in line and ".jpg" in line
    refused(capsys, ["synth", "--out", str(existing_file)], "--out", tmp_path)
    refused(capsys, ["eval-ip2p", "--dataset", str(tmp_path), "--out", str(existing_file)], "--dataset", tmp_path)
    refused(capsys, ["train-lora", "--data", str(tmp_path / "folder"), "--out", str(tmp_path / "folder")], "--out",
            tmp_path)
    refused(capsys, ["edit", "--image", str(tmp_path / "missing.png"), "--out", str(tmp_path / "o.png")], "--image",
            tmp_path)


def test_lora_with_the_right_names_and_wrong_shapes(tiny_sdxl, tmp_path):
    from safetensors.torch import save_file

    from lora_factory import peft_unet_lora

    sd = peft_unet_lora(tiny_sdxl)
    bad = sorted(k for k in sd if "lora_A" in k)[0]
    sd[bad] = torch.zeros(sd[bad].shape[0], sd[bad].shape[1] + 8)
    path = tmp_path / "wrong_shapes.safetensors"
    save_file({f"unet.{k}": v.contiguous() for k, v in sd.items()}, str(path))
    adapters = lora.loaded_adapters(tiny_sdxl.pipe)
    with pytest.raises(TuneLabError) as e:
        lora.load(tiny_sdxl, path)
    msg = str(e.value)
    assert e.value.input_name == "lora" and "\n" not in msg and len(msg) < 600, msg
    assert bad in msg and "inputs" in msg
    assert lora.loaded_adapters(tiny_sdxl.pipe) == adapters  # nothing reached diffusers


def test_nul_byte_in_an_output_name_names_the_input(tiny_sdxl, tmp_path, monkeypatch):
    from tunelab.nodes.compare import Compare
    from tunelab.nodes.instruct import InstructionDataset

    monkeypatch.setenv("TUNELAB_OUTPUT", str(tmp_path / "output"))
    with pytest.raises(TuneLabError) as e:
        Compare().compare(pipe=tiny_sdxl, prompt="a fox", negative="wrong", seed=1, steps=1, guidance=5.0,
                          width=64, height=64, output_name="runs/a\x00b")
    assert e.value.input_name == "output_name" and "NUL" in str(e.value)
    with pytest.raises(TuneLabError) as e:
        InstructionDataset().build("synthesize", "clean\x00", "", "x", "", "tunelab", "", "blur", 0, 0, 0, 0.0, "ds")
    assert e.value.input_name == "source" and "NUL" in str(e.value)
    assert not (tmp_path / "output").exists()


def test_escape_messages_name_the_root_and_the_row(tmp_path, monkeypatch):
    root = tmp_path / "tables"
    root.mkdir()
    Image.new("RGB", (16, 16)).save(root / "ok.png")
    table = root / "t.jsonl"
    rows = [{"input_image": "ok.png", "edit_prompt": "x", "edited_image": "ok.png"},
            {"input_image": "../outside.png", "edit_prompt": "x", "edited_image": "ok.png"}]
    table.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(TuneLabError) as e:
        instruct_data.from_table(table, tmp_path / "out")
    msg = str(e.value)
    assert "row 2" in msg and "the table's folder" in msg and "output folder" not in msg, msg
    with pytest.raises(TuneLabError) as e:
        instruct_data.from_table(table, tmp_path / "out", image_root=root)
    assert "the image root" in str(e.value)
    ds = tmp_path / "ds"
    ds.mkdir()
    (ds / "metadata.jsonl").write_text(json.dumps(rows[1]) + "\n")
    with pytest.raises(TuneLabError) as e:
        instruct_data.read(ds)
    assert "the dataset folder" in str(e.value) and "row 1" in str(e.value)
    from tunelab.nodes.instruct import InstructionDataset

    monkeypatch.setenv("TUNELAB_INPUT", str(tmp_path / "input"))
    monkeypatch.setenv("TUNELAB_OUTPUT", str(tmp_path / "output"))
    with pytest.raises(TuneLabError) as e:
        InstructionDataset().build("synthesize", "../x", "", "x", "", "tunelab", "", "blur", 0, 0, 0, 0.0, "ds")
    assert "ComfyUI's input folder" in str(e.value)
    assert not (tmp_path / "out").exists() and not (tmp_path / "output").exists()


# ---------------------------------------------------------------------------------------------------------------
# the whole class: numbers, paths, names


def test_number_checks():
    assert checks.check_number(0.5, "x", 0, 1) == 0.5
    for bad in (math.nan, math.inf, -math.inf, "1", None, True):
        with pytest.raises(TuneLabError, match="^x: "):
            checks.check_number(bad, "x")
    with pytest.raises(TuneLabError, match="above 0 and below 1"):
        checks.check_number(1.0, "x", 0, 1, lo_open=True, hi_open=True)
    assert checks.check_int(4.0, "n", 1, 10) == 4  # a JSON client's 4.0 is 4
    for bad in (0, 11, 2.5, True, "3"):
        with pytest.raises(TuneLabError, match="^n: .*whole number from 1 to 10"):
            checks.check_int(bad, "n", 1, 10)


def test_core_entry_points_check_their_numbers(tiny_sdxl, tiny_ip2p):
    from tunelab.core import instruct, prompt, synthesis

    cond = prompt.encode(tiny_sdxl, "a fox")
    for kwargs, name in ((dict(guidance=math.nan), "guidance"), (dict(steps=0), "steps"),
                         (dict(scheduler="eulr"), "scheduler"), (dict(seed=-1), "seed")):
        with pytest.raises(TuneLabError) as e:
            sampling.generate(tiny_sdxl, cond, **{"seed": 1, "steps": 1, "width": 64, "height": 64, **kwargs})
        assert e.value.input_name == name
    with pytest.raises(TuneLabError, match="did you mean 'euler'"):
        sampling.check_scheduler("eulr")
    image = torch.zeros(1, 16, 16, 3)
    for kwargs, name in ((dict(image_guidance=math.inf), "image_guidance"), (dict(seed=1 << 64), "seed"),
                         (dict(negative="(x"), "negative")):
        with pytest.raises(TuneLabError) as e:
            instruct.edit(tiny_ip2p, image, "derain the image", **{"seed": 0, "steps": 1, **kwargs})
        assert e.value.input_name == name
    with pytest.raises(TuneLabError) as e:
        synthesis.run("/nonexistent-never-made", tiny_sdxl, synthesis.build_plan(["a"], guidance=[5]), steps=1,
                      width=64, height=64, scheduler="nope")
    assert e.value.input_name == "scheduler" and not os.path.exists("/nonexistent-never-made")
    with pytest.raises(TuneLabError) as e:
        lora.load(tiny_sdxl, tiny.wrong_lora(), math.nan)
    assert e.value.input_name == "strength"
    with pytest.raises(TuneLabError) as e:
        instruct_data.synthesize("/nowhere", "/nowhere-out", seed=1 << 64)
    assert e.value.input_name == "seed"
    with pytest.raises(TuneLabError) as e:
        instruct_data.synthesize("/nowhere", "/nowhere-out", val_fraction=math.nan)
    assert e.value.input_name == "val_fraction"


def test_path_checks(tmp_path):
    f = tmp_path / "f.txt"
    f.write_text("x")
    with pytest.raises(TuneLabError, match="NUL"):
        files.check_path_text("a\x00b", "out")
    with pytest.raises(TuneLabError, match="is a folder"):
        files.check_input_file(tmp_path, "image")
    with pytest.raises(TuneLabError, match="is a file"):
        files.check_input_dir(f, "data")
    with pytest.raises(TuneLabError, match="has no metadata.jsonl"):
        files.check_input_dir(tmp_path, "data", marker="metadata.jsonl")
    with pytest.raises(TuneLabError, match="'.*f.txt' is a file, not a folder"):
        files.check_output_dir(f / "sub", "out")
    with pytest.raises(TuneLabError, match="exists; choose a new file name"):
        files.check_output_file(f, "out", new=True)
    with pytest.raises(TuneLabError, match="not empty"):
        files.check_output_dir(tmp_path, "out", new=True)
    if os.geteuid() != 0:  # root may write anywhere
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o500)
        try:
            with pytest.raises(TuneLabError, match="permissions"):
                files.check_output_dir(ro / "new", "out")
        finally:
            ro.chmod(0o700)
    with pytest.raises(TuneLabError, match="^name: 'a\\\\x00b' contains a NUL byte"):
        files.confined_path(tmp_path, "a\x00b", "name")
    for bad in ("../x", "/abs"):
        with pytest.raises(TuneLabError, match="^name: .*the input folder"):
            files.confined_path(tmp_path, bad, "name", root_label="the input folder")


def test_unknown_model_lists_the_closest_names(tmp_path, capsys, monkeypatch, no_model_loads):
    from tunelab import host

    models_dir = tmp_path / "models"
    (models_dir / "diffusers" / "ip2p-lowlevel").mkdir(parents=True)
    (models_dir / "diffusers" / "ip2p-lowlevel" / "model_index.json").write_text("{}")
    monkeypatch.setenv("TUNELAB_MODELS", str(models_dir))
    with pytest.raises(TuneLabError, match="did you mean 'diffusers/ip2p-lowlevel'"):
        host.check_model("ip2p-lowlevel")
    assert host.check_model("diffusers/ip2p-lowlevel") == str(models_dir / "diffusers" / "ip2p-lowlevel")
    img = tmp_path / "in.png"
    Image.new("RGB", (16, 16)).save(img)
    line = refused(capsys, ["edit", "--image", str(img), "--out", str(tmp_path / "o.png"), "--model", "tiny-ipp2p"],
                   "--model", tmp_path)
    assert "did you mean 'tiny-ip2p'" in line
    refused(capsys, ["compare", "--out", str(tmp_path / "o"), "--lora", "wrongg.safetensors"], "--lora", tmp_path)
    refused(capsys, ["compare", "--out", str(tmp_path / "o"), "--device", "cuda:7"], "--device", tmp_path)
    from tunelab.cli import main

    assert main(["info"]) == 0
    text = capsys.readouterr().out
    assert "models (--model, --refiner): 1 found: diffusers/ip2p-lowlevel" in text


def test_scheduler_choices_refused_by_the_parser(tmp_path, capsys, no_model_loads):
    from tunelab.cli import main

    with pytest.raises(SystemExit) as e:
        main(["compare", "--out", str(tmp_path / "o"), "--scheduler", "eulr"])
    assert e.value.code == 2 and "invalid choice: 'eulr'" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_resume_latest_refused_before_loading_in_cli_form(tmp_path, capsys, no_model_loads):
    from tunelab.cli import main

    data = tmp_path / "data"
    data.mkdir()
    Image.new("RGB", (64, 64)).save(data / "a.png")
    line = refused(capsys, ["train-lora", "--data", str(data), "--out", str(tmp_path / "l.safetensors"), "--resume",
                            "latest", "--resolution", "64"], "--resume latest", tmp_path)
    assert "resume=" not in line and "without --resume," in line and line.count("--resume") == 2, line
    # the same refusal in a node (and in core) keeps the input's own name
    from tunelab.training.common import find_checkpoint

    with pytest.raises(TuneLabError) as e:
        find_checkpoint(tmp_path / "none", "latest")
    assert str(e.value).startswith("resume latest: ") and "without resume," in str(e.value)
    assert main(["train-ip2p", "--data", str(data), "--out", str(tmp_path / "o"), "--resume", "latest"]) == 2


def test_reused_dataset_says_reused(tmp_path, capsys):
    from tunelab.cli import main

    clean = tmp_path / "clean"
    clean.mkdir()
    Image.new("RGB", (16, 16), "red").save(clean / "a.png")
    argv = ["instruct-data", "synth", "--clean", str(clean), "--degradations", "blur", "--out", str(tmp_path / "ds")]
    assert main(argv) == 0
    assert capsys.readouterr().out.startswith("wrote 1 example(s)")
    assert main(argv) == 0
    assert capsys.readouterr().out.startswith("reused the finished dataset")


def test_edit_writes_the_format_its_ending_names(tmp_path):
    from tunelab.cli import main

    Image.new("RGB", (24, 16), "white").save(tmp_path / "in.png")
    for name, fmt in (("o.jpg", "JPEG"), ("o.JPEG", "JPEG"), ("o.png", "PNG")):
        assert main(["edit", "--image", str(tmp_path / "in.png"), "--out", str(tmp_path / name), "--steps", "1"]) == 0
        with Image.open(tmp_path / name) as im:
            assert im.format == fmt and im.size == (24, 16)


def test_foreign_dataset_folder_refused_before_loading(tmp_path, capsys, no_model_loads):
    (tmp_path / "ds").mkdir()
    (tmp_path / "ds" / "notes.txt").write_text("mine")
    line = refused(capsys, ["synth", "--out", str(tmp_path / "ds")], "--out", tmp_path)
    assert "not a TuneLab dataset" in line
