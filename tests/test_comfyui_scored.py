"""Real ComfyUI: the scored-comparison workflow split over a queue-client sweep of its `shard` input.

Runs only with COMFYUI_PATH (see tests/test_comfyui.py, which provides the server fixture).
"""
import json

import pytest

from tunelab import cli

from test_comfyui import API_DIR, _prepare, comfy, comfy_work  # noqa: F401 (the server fixtures)

pytestmark = pytest.mark.comfyui


def test_scored_workflow_cells_split_by_a_sweep(comfy, tmp_path, capsys):  # noqa: F811
    graph = _prepare(API_DIR / "wrong_lora_scored.json", comfy)
    node = next(n for n in graph.values() if n["class_type"] == "TuneLabScoreComparison")
    node["inputs"].update(prompt_set="custom (prompts below)", prompts="a red fox\na bowl of ramen", seeds="0, 1",
                          resamples=200)
    path = tmp_path / "scored.json"
    path.write_text(json.dumps(graph))
    out = tmp_path / "downloads"
    rc = cli.main(["queue", str(path), "--server", comfy.url, "--sweep", "Score comparison.shard=0/2,1/2",
                   "--out", str(out), "--quiet"])
    text = capsys.readouterr()
    assert rc == 0, text
    assert "2/2 job(s) succeeded" in text.out
    folder = comfy.output_dir / node["inputs"]["output_name"]
    report = json.loads((folder / "report.json").read_text())
    assert len(report["rows"]) == 2 * 2 * 4  # prompts x seeds x the four states
    made_by = {json.loads(p.read_text())["made_by"] for p in (folder / "cells").glob("*.json")}
    assert made_by == {"0/2", "1/2"}  # each queued job made its own half of the cells
    assert any(p.name.endswith("scores.png") for p in out.iterdir()), sorted(p.name for p in out.iterdir())
    assert "| base |" in (folder / "report.md").read_text()
