"""Progress in logs: when stderr is not a terminal, long work writes a line every few percent with the count, the
rate and the ETA (only the outermost bar), instead of nothing until the end."""
import io
import os
import re
import subprocess
import sys
import time

import pytest

from tunelab.core import progress

LINE = re.compile(r"^(?P<desc>[\w ]+): (?P<value>\d+)/(?P<total>\d+) \((?P<pct>\d+)%\)")


def test_rate_log_lines_every_few_percent_with_rate_and_eta():
    now = [100.0]
    lines = []
    log = progress.RateLog(200, "synthesis", write=lines.append, clock=lambda: now[0])
    for i in range(1, 201):
        now[0] += 0.5
        log.update_to(i, f"{i:05d}.png")
    assert len(lines) == 21  # the first update, every 5 %, and the end
    assert lines[0] == "synthesis: 1/200 (0%), elapsed 0s, 00001.png"
    assert lines[1] == "synthesis: 10/200 (5%), 2.0/s, elapsed 5s, ETA 1:35, 00010.png"
    assert lines[-1] == "synthesis: 200/200 (100%), 2.0/s, elapsed 1:40, 00200.png"
    log.update_to(200)
    assert len(lines) == 21  # the end is written once


def test_resumed_runs_measure_the_rate_from_where_they_start():
    now = [0.0]
    lines = []
    log = progress.RateLog(500, "train", write=lines.append, clock=lambda: now[0])
    log.update_to(200)  # resumed from a checkpoint at step 200
    for step in range(201, 226):
        now[0] += 4.0
        log.update_to(step, "loss 0.1000")
    assert lines[0] == "train: 200/500 (40%), elapsed 0s"
    assert lines[-1] == "train: 225/500 (45%), 4.0s each, elapsed 1:40, ETA 18:20, loss 0.1000"


def test_only_the_outermost_bar_writes_lines(monkeypatch):
    err = io.StringIO()
    monkeypatch.setattr(sys, "stderr", err)
    with progress.Progress(4, "outer") as outer:
        with progress.Progress(10, "inner") as inner:
            for _ in range(10):
                inner.update(1)
        outer.update(4)
    with progress.Progress(2, "next") as bar:  # a later bar writes again
        bar.update(2)
    descs = [LINE.match(line).group("desc") for line in err.getvalue().splitlines()]
    assert descs == ["outer", "next"]


def test_comfyui_bar_writes_no_lines(monkeypatch):
    from tunelab import host

    err = io.StringIO()
    monkeypatch.setattr(sys, "stderr", err)
    with host.ComfyProgress(3, "node") as bar:
        bar.update(3)
    assert err.getvalue() == ""


def test_synth_writes_progress_lines_to_a_log_while_it_runs(tmp_path):
    log_path = tmp_path / "synth.log"
    cmd = [sys.executable, "-m", "tunelab", "synth", "--out", str(tmp_path / "ds"), "--keywords", "a", "b", "c",
           "--guidance", "8", "9", "10", "--steps", "60", "--device", "cpu"]  # ~5 s of work
    seen_while_running = []
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log, env={**os.environ})
        try:
            while proc.poll() is None:
                text = log_path.read_text(errors="replace")
                seen_while_running = [ln for ln in text.splitlines() if ln.startswith("synthesis: ")]
                if seen_while_running:
                    break
                time.sleep(0.02)
            assert proc.wait(timeout=300) == 0, log_path.read_text()
        finally:
            if proc.poll() is None:
                proc.kill()
    assert seen_while_running, "no progress line was written before synth finished"
    lines = [ln for ln in log_path.read_text().splitlines() if ln.startswith("synthesis: ")]
    values = [int(LINE.match(ln).group("value")) for ln in lines]
    assert values == sorted(values) and values[-1] == 9 * 60 == int(LINE.match(lines[-1]).group("total"))
    assert 4 <= len(lines) <= 22  # 9 images x 60 steps; every 5 %, at most one line a second
    assert any("/s" in ln and "ETA" in ln for ln in lines)


def test_quick_work_writes_the_first_and_the_last_line_only():
    now = [0.0]
    lines = []
    log = progress.RateLog(20, "generate", write=lines.append, clock=lambda: now[0])
    for i in range(1, 21):
        now[0] += 0.015  # a 0.3 s job: every 5 % is due, none a second after the last line
        log.update_to(i)
    assert [LINE.match(line).group("value") for line in lines] == ["1", "20"]
