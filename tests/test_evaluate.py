"""Scored comparisons: the report, resuming after SIGKILL, shards, accelerate, the node."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
from PIL import Image

from tunelab.core import compare, evaluation, lora, scoring, statistics, tiny
from tunelab.core.errors import TuneLabError

PROMPTS = ["a red fox in the snow", "a (bowl of ramen)++, overhead photo"]
SEEDS = [0, 1]
SMALL = dict(steps=2, guidance=9.0, width=64, height=64)
CLI_ARGS = ["--seeds", "0", "1", "--steps", "2", "--guidance", "9", "--size", "64", "64", "--resamples", "500"]


@pytest.fixture(scope="module")
def wrong_pipe(tiny_sdxl):
    return lora.load(tiny_sdxl, tiny.wrong_lora(), 1.0)


@pytest.fixture(scope="module")
def scorers():
    return {"clip_score": scoring.load("tiny-clip", "clip", device="cpu"),
            "pickscore": scoring.load("tiny-pickscore", "pickscore", device="cpu")}


@pytest.fixture(scope="module")
def prompt_file(tmp_path_factory):
    p = tmp_path_factory.mktemp("prompts") / "prompts.txt"
    p.write_text("# two prompts\n" + "\n".join(PROMPTS) + "\n\n")
    return p


@pytest.fixture(scope="module")
def reference(tmp_path_factory, prompt_file):
    """One uninterrupted, unsharded CLI run, the report every other way of running must reproduce."""
    from tunelab.cli import main

    out = tmp_path_factory.mktemp("reference") / "eval"
    assert main(["evaluate", "--out", str(out), "--prompts", str(prompt_file), *CLI_ARGS]) == 0
    return out


def _run(folder, states, scorers, **kw):
    return evaluation.run(folder, states, PROMPTS, SEEDS, scorers=scorers, **{"resamples": 500, **SMALL, **kw})


def test_report_contents(tiny_sdxl, wrong_pipe, scorers, tmp_path):
    states = compare.named_states(compare.STATE_NAMES, tiny_sdxl, wrong_pipe, "wrong")
    rep = _run(tmp_path / "ev", states, scorers)
    assert rep.complete and len(rep.generated) == 16 and rep.result is not None
    folder = tmp_path / "ev"
    for name in evaluation.REPORT_FILES:
        assert (folder / name).is_file(), name
    assert sorted(p.name for p in (folder / "grids").iterdir()) == ["prompt_000.png", "prompt_001.png"]
    doc = json.loads((folder / "report.json").read_text())
    rows = doc["rows"]
    assert len(rows) == 16 and [r["index"] for r in rows] == list(range(16))
    assert [(r["prompt_index"], r["seed"], r["state"]) for r in rows[:5]] == [
        (0, 0, states[0].label), (0, 0, states[1].label), (0, 0, states[2].label), (0, 0, states[3].label),
        (0, 1, states[0].label)]
    # every score is the scorer's score of the saved PNG, and each cell is the state's own image
    for r in rows[::5]:
        with Image.open(folder / r["file"]) as im:
            image = im.convert("RGB")
        assert r["clip_score"] == scorers["clip_score"].score(image, r["prompt"])
        assert r["pickscore"] == scorers["pickscore"].score(image, r["prompt"])
        state = states[[s.label for s in states].index(r["state"])]
        from tunelab.core.images import tensor_to_pil
        made = tensor_to_pil(compare.generate_state(state, r["prompt"], seed=r["seed"], **SMALL))[0]
        assert made.tobytes() == image.tobytes()
    # the statistics are statistics.summarize over (prompt, seed) units in plan order
    for m in ("clip_score", "pickscore"):
        per_state = {s.label: [r[m] for r in rows if r["state"] == s.label] for s in states}
        assert doc["summary"][m] == statistics.summarize(per_state, resamples=500, seed=0)
    md = (folder / "report.md").read_text()
    assert md.count("\n| ") >= 4 + 6 and "CLIP score [95% CI]" in md and "PickScore" in md
    csv_lines = (folder / "report.csv").read_text().splitlines()
    assert len(csv_lines) == 17 and csv_lines[0].startswith("index,prompt_index,seed,state,clip_score,pickscore")
    with Image.open(folder / "scores.png") as im:
        assert im.size[0] >= 800
    # a rerun makes nothing and writes the same report
    before = (folder / "report.json").read_bytes()
    again = _run(folder, states, scorers)
    assert again.generated == [] and len(again.skipped) == 16
    assert (folder / "report.json").read_bytes() == before


def test_resume_rescoring_and_refusals(tiny_sdxl, wrong_pipe, scorers, tmp_path):
    states = compare.named_states(["base", "lora_negative_only"], tiny_sdxl, wrong_pipe, "wrong")
    folder = tmp_path / "ev"
    _run(folder, states, scorers)
    full = (folder / "report.json").read_bytes()
    # killed between a PNG and its record; another killed before its rename (a temporary left behind)
    (folder / "cells" / "00003.json").unlink()
    (folder / "cells" / "00005.png").rename(folder / "cells" / ".00005.png.0123abcd.tmp")
    (folder / "report.json").unlink()
    rep = _run(folder, states, scorers)
    assert rep.rescored == [3] and rep.generated == [5] and len(rep.removed) == 1
    assert (folder / "report.json").read_bytes() == full
    # another job in the same folder, or a foreign folder, is refused with nothing written
    with pytest.raises(TuneLabError, match="other settings") as e:
        _run(folder, states, scorers, steps=3)
    assert e.value.input_name == "out"
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("x")
    with pytest.raises(TuneLabError, match="not empty"):
        _run(foreign, states, scorers)
    assert sorted(os.listdir(foreign)) == ["notes.txt"]
    for bad, name in ((dict(width=60), "width"), (dict(steps=0), "steps"), (dict(resamples=10), "resamples"),
                      (dict(shard="3/2"), "shard")):
        with pytest.raises(TuneLabError) as e:
            _run(tmp_path / "never", states, scorers, **bad)
        assert e.value.input_name == name
    with pytest.raises(TuneLabError) as e:
        evaluation.run(tmp_path / "never", states, ["a (fox"], SEEDS, scorers=scorers, **SMALL)
    assert e.value.input_name == "prompts"
    with pytest.raises(TuneLabError, match="twice"):
        evaluation.parse_seeds("1, 1")
    with pytest.raises(TuneLabError, match="scorer"):
        evaluation.check_scorers({"clip_score": scorers["pickscore"]})
    assert not (tmp_path / "never").exists()
    with pytest.raises(TuneLabError, match="incomplete"):
        (folder / "cells" / "00000.png").unlink()
        evaluation.merge(folder)


def test_shards_in_one_folder_give_the_same_report(tiny_sdxl, wrong_pipe, scorers, tmp_path):
    states = compare.named_states(["base_negative", "lora_negative"], tiny_sdxl, wrong_pipe, "wrong")
    _run(tmp_path / "one", states, scorers)
    first = _run(tmp_path / "two", states, scorers, shard="1/2")
    assert not first.complete and first.generated == [1, 3, 5, 7] and not (tmp_path / "two" / "report.json").exists()
    assert len(evaluation.shard_images(tmp_path / "two", "1/2")) == 4
    second = _run(tmp_path / "two", states, scorers, shard=(0, 2))
    assert second.complete and second.generated == [0, 2, 4, 6]
    assert (tmp_path / "two" / "report.json").read_bytes() == (tmp_path / "one" / "report.json").read_bytes()


def test_prompt_sets():
    assert evaluation.parse_prompts("woolf")[0] == compare.DEFAULT_PROMPT
    assert len(evaluation.parse_prompts("woolf-20")) == 20
    assert evaluation.parse_prompts("a\n# note\n\nb") == ["a", "b"]
    with pytest.raises(TuneLabError, match="twice"):
        evaluation.parse_prompts(["a", "a"])
    with pytest.raises(TuneLabError, match="cannot read"):
        evaluation.parse_prompts("missing.txt")


def _kill_when(proc, folder, records: int, deadline_s: float = 300):
    deadline = time.monotonic() + deadline_s
    try:
        while len(list((folder / "cells").glob("*.json"))) < records if (folder / "cells").is_dir() else True:
            assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
            assert time.monotonic() < deadline, "the evaluate subprocess made no cells"
            time.sleep(0.01)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        proc.stderr.close()


def test_sigkill_then_rerun_gives_the_same_report(reference, prompt_file, tmp_path):
    from tunelab.cli import main

    out = tmp_path / "killed"
    args = ["evaluate", "--out", str(out), "--prompts", str(prompt_file), *CLI_ARGS]
    proc = subprocess.Popen([sys.executable, "-m", "tunelab", *args], cwd=tmp_path, env=dict(os.environ),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _kill_when(proc, out, 3)
    done = len(list((out / "cells").glob("*.json")))
    assert 3 <= done < 16 and not (out / "report.json").exists()  # killed part-way
    assert main(args) == 0
    _same_report(out, reference)
    assert (out / "report.md").read_bytes() == (reference / "report.md").read_bytes()


def test_accelerate_launch_two_processes_gives_the_same_report(reference, prompt_file, tmp_path):
    accelerate = shutil.which("accelerate", path=os.path.dirname(sys.executable))
    if accelerate is None:
        pytest.skip("the accelerate launcher is not installed beside this python")
    out = tmp_path / "dist"
    # two gloo ranks on the CPU: accelerate refuses --cpu with --multi_gpu, and --cpu alone starts one process;
    # the CLI asks PartialState for the CPU itself when there is no GPU
    cmd = [accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--num_cpu_threads_per_process", "1",
           "--main_process_port", str(_free_port()), "-m", "tunelab",
           "evaluate", "--out", str(out), "--prompts", str(prompt_file), *CLI_ARGS]
    res = subprocess.run(cmd, cwd=tmp_path, env={**os.environ, "ACCELERATE_CONFIG_FILE": str(tmp_path / "none.yaml")},
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    text = res.stdout + res.stderr
    # two ranks of one gloo group: world size 2
    import re

    ranks = sorted(re.findall(r"process (\d) of (\d) on cpu \(gloo\)", text))
    assert ranks == [("0", "2"), ("1", "2")], text[-3000:]
    made_by = {json.loads(p.read_text())["made_by"] for p in (out / "cells").glob("*.json")}
    assert made_by == {"0/2", "1/2"}
    _same_report(out, reference)


def _same_report(a, b):
    ra, rb = json.loads((a / "report.json").read_text()), json.loads((b / "report.json").read_text())
    for key in ra:
        assert ra[key] == rb[key], key
    for x, y in zip(ra["rows"], rb["rows"]):
        assert x == y, (x, y)
    assert (a / "report.json").read_bytes() == (b / "report.json").read_bytes()


def _free_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_score_comparison_node(tiny_sdxl, wrong_pipe, tmp_path, monkeypatch):
    from tunelab.nodes.evaluate import CUSTOM, FILE, ScoreComparison

    out, inp = tmp_path / "output", tmp_path / "input"
    out.mkdir(), inp.mkdir()
    monkeypatch.setenv("TUNELAB_OUTPUT", str(out))
    monkeypatch.setenv("TUNELAB_INPUT", str(inp))
    (inp / "prompts.txt").write_text("\n".join(PROMPTS))
    kw = dict(pipe=tiny_sdxl, prompt_set=FILE, prompts="", prompt_file="prompts.txt", seeds="0, 1",
              default_states="base, lora_negative_only", negative="wrong", steps=2, guidance=9.0, width=64,
              height=64, scheduler="default", high_noise_frac=0.8, refiner_mode="plain", clip_model="tiny-clip",
              pickscore_model="tiny-pickscore", output_name="scored/run", resamples=500, stats_seed=0,
              lora_pipe=wrong_pipe)
    node = ScoreComparison()
    half = node.evaluate(shard="0/2", **kw)
    plot, grids, text = half["result"]
    assert "shard 0/2" in text and "still to make" in text and grids.shape == (4, 64, 64, 3)
    full = node.evaluate(shard="1/2", **kw)
    plot, grids, table = full["result"]
    assert plot.shape[0] == 1 and plot.shape[-1] == 3 and grids.shape[0] == 2  # one grid per prompt
    assert table == (out / "scored" / "run" / "report.md").read_text() and "| base |" in table
    assert full["ui"]["images"][0]["filename"] == "scores.png"
    # the same job as the core function called directly
    states = compare.named_states(["base", "lora_negative_only"], tiny_sdxl, wrong_pipe, "wrong")
    scorers = {"clip_score": scoring.load("tiny-clip", "clip", device="cpu"),
               "pickscore": scoring.load("tiny-pickscore", "pickscore", device="cpu")}
    _run(tmp_path / "direct", states, scorers)
    assert _rows(out / "scored" / "run") == _rows(tmp_path / "direct")
    # bad inputs name the input, before anything is written
    for bad, name in ((dict(output_name="../x"), "output_name"), (dict(prompt_file="../p.txt"), "prompt_file"),
                      (dict(seeds="a"), "seeds"), (dict(default_states="base, nope"), "default_states"),
                      (dict(prompt_set=CUSTOM, prompts=" "), "prompts"), (dict(shard="2/2"), "shard"),
                      (dict(clip_model="none", pickscore_model="none"), "scorers")):
        with pytest.raises(TuneLabError) as e:
            node.evaluate(**{**kw, "output_name": "never", "shard": "0/1", **bad})
        assert e.value.input_name == name, bad
    assert not (out / "never").exists()


def _rows(folder):
    return json.loads((folder / "report.json").read_text())["rows"]


def test_evaluate_cli_refuses_before_loading(tmp_path, capsys, monkeypatch):
    from tunelab.cli import main
    from tunelab.core import models

    def no_load(*a, **k):
        raise AssertionError("a model was loaded before the arguments were checked")

    monkeypatch.setattr(models, "load", no_load)
    monkeypatch.setenv("TUNELAB_MODELS", str(tmp_path / "models"))
    for extra, text in ((["--states", "base,nope"], "unknown state"), (["--seeds", "1", "1"], "twice"),
                        (["--size", "60", "64"], "multiple of 8"), (["--prompts", "missing.txt"], "cannot read"),
                        (["--resamples", "3"], "resamples"),
                        (["--model", "real.safetensors", "--lora", "x.safetensors"], "--model")):
        out = tmp_path / "never"
        assert main(["evaluate", "--out", str(out), *extra]) == 2, extra
        assert text in capsys.readouterr().err, extra
        assert not out.exists()
