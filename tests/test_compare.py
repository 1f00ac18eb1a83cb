import json
import os

import pytest
import torch
from PIL import Image

from tunelab.core import compare, lora, tiny
from tunelab.core.errors import TuneLabError
from tunelab.core.prompt import encode
from tunelab.core.sampling import generate

KW = dict(steps=4, guidance=13.0, width=64, height=64)


@pytest.fixture(scope="module")
def wrong_pipe(tiny_sdxl):
    return lora.load(tiny_sdxl, tiny.wrong_lora(), 1.0)


def test_three_way_comparison(tiny_sdxl, wrong_pipe, tmp_path):
    states = compare.default_states(tiny_sdxl, wrong_pipe)
    assert [s.negative for s in states] == ["", "wrong", "wrong"]
    result = compare.run(states, "a fox", seed=42, **KW)
    grid, panels = result.tensors()
    assert panels.shape == (3, 64, 64, 3) and grid.shape[0] == 1 and grid.shape[2] == 3 * 64
    # each panel is exactly what Generate makes for that state at the same seed
    for state, panel in zip(states, panels):
        one = generate(state.handle, encode(state.handle, "a fox", state.negative), seed=42, **KW)[0]
        assert torch.allclose(panel, one, atol=1 / 255)  # panels pass through 8-bit PNG pixels
    assert not torch.equal(panels[0], panels[1]) and not torch.equal(panels[1], panels[2])
    paths = compare.save(result, tmp_path / "out")
    assert sorted(os.listdir(tmp_path / "out")) == ["01.png", "02.png", "03.png", "grid.png", "settings.json"]
    settings = json.loads((tmp_path / "out" / "settings.json").read_text())
    assert settings["seed"] == 42 and settings["prompt"] == "a fox" and settings["guidance"] == 13.0
    assert [s["negative"] for s in settings["states"]] == ["", "wrong", "wrong"]
    assert settings["states"][2]["loras"][0]["sha256"] and settings["versions"]["diffusers"]
    assert Image.open(paths["grid"]).size == (3 * 64, grid.shape[1])


def test_compare_node_confines_output(tiny_sdxl, wrong_pipe, tmp_path, monkeypatch):
    from tunelab.nodes.compare import Compare

    out = tmp_path / "output"
    out.mkdir()
    monkeypatch.setenv("TUNELAB_OUTPUT", str(out))
    node = Compare()
    args = dict(pipe=tiny_sdxl, prompt="a fox", negative="wrong", seed=1, **KW, lora_pipe=wrong_pipe)
    res = node.compare(output_name="runs/cmp", **args)
    grid, panels = res["result"]
    assert panels.shape[0] == 3
    written = [p for p in out.rglob("*") if p.is_file()]
    assert len(written) == 5 and all(p.is_relative_to(out / "runs" / "cmp") for p in written)
    assert res["ui"]["images"][0]["filename"] == "grid.png"
    (tmp_path / "elsewhere").mkdir()
    os.symlink(tmp_path / "elsewhere", out / "link")
    for bad in ("../x", str(tmp_path / "abs"), "link/x", "a/../../x"):
        with pytest.raises(TuneLabError) as e:
            node.compare(output_name=bad, **args)
        assert e.value.input_name == "output_name"
    assert not any((tmp_path / "elsewhere").iterdir()) and not (tmp_path / "x").exists()


def test_custom_states_chain(tiny_sdxl, wrong_pipe):
    from tunelab.nodes.compare import ComparisonState

    (states,) = ComparisonState().add("plain", tiny_sdxl, "")
    (states,) = ComparisonState().add("lora", wrong_pipe, "wrong", states)
    result = compare.run(states, "a fox", seed=3, **KW)
    assert len(result.panels) == 2 and [s["label"] for s in result.settings["states"]] == ["plain", "lora"]


def test_bad_comparisons_are_refused(tiny_sdxl):
    with pytest.raises(TuneLabError, match="prompt"):
        compare.run(compare.default_states(tiny_sdxl, None), "  ", seed=1, **KW)
    with pytest.raises(TuneLabError) as e:
        compare.run(compare.default_states(tiny_sdxl, None), "a fox", seed=1, **{**KW, "width": 65})
    assert e.value.input_name == "width"


def test_cli_main_job(tmp_path, capsys):
    from tunelab.cli import main

    out = tmp_path / "cmp"
    assert main(["compare", "--out", str(out), "--steps", "3", "--size", "64", "64", "--seed", "5"]) == 0
    text = capsys.readouterr().out
    assert "tiny" in text and "built-in" in text
    assert sorted(os.listdir(out)) == ["01.png", "02.png", "03.png", "grid.png", "settings.json"]
    assert json.loads((out / "settings.json").read_text())["seed"] == 5
    assert main(["compare", "--out", str(tmp_path / "bad"), "--size", "63", "64"]) == 2
    assert not (tmp_path / "bad").exists()
