"""Real ComfyUI: start a server on loopback with the pack installed and drive it over its HTTP API.

Runs only when COMFYUI_PATH points at a ComfyUI checkout (see README, Tests); skipped otherwise. The server uses
COMFYUI_PATH/.venv/bin/python when present (the pack must be pip-installed there), a free port on 127.0.0.1 and
temporary output/temp/user folders, and is stopped when the session ends. LoRA files the shipped workflows name
are written for the tiny SDXL preset into a temporary models folder it is given. Runs swap models for tiny presets
and shrink steps/width/height so each workflow takes seconds on a CPU.

    COMFYUI_PATH=~/comfyui python -m pytest -m comfyui tests/test_comfyui.py -q

Environment: TUNELAB_COMFY_START_TIMEOUT (s, default 300), TUNELAB_INTERRUPT_WORKFLOW (an API workflow to use
for the interrupt test besides the shipped ones).
"""
import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from pathlib import Path

import pytest

import tunelab
from tunelab import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS, cli
from tunelab.core import queue_client as qc
from tunelab.core import workflow as wf

pytestmark = pytest.mark.comfyui

PACK = Path(tunelab.__file__).resolve().parent
API_DIR = PACK / "workflows" / "api"
API_FILES = sorted(API_DIR.glob("*.json"))
RUN_TIMEOUT = 600


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, url, log_path, output_dir, proc):
        self.url, self.log_path, self.output_dir, self.proc = url, log_path, output_dir, proc
        self._object_info = None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def object_info(self) -> dict:
        if self._object_info is None:
            self._object_info = qc.ComfyClient(self.url).object_info()
        return self._object_info

    def client(self):
        return qc.ComfyClient(self.url, http_timeout=60)


def _lora_names_in_workflows():
    """LoRA file names the shipped API workflows pick (inputs whose choices are the loras folder)."""
    specs = wf.node_specs(NODE_CLASS_MAPPINGS)
    names = set()
    for path in API_FILES:
        for node in json.loads(path.read_text(encoding="utf-8")).values():
            spec = specs.get(node.get("class_type"))
            for name, value in (node.get("inputs") or {}).items():
                inp = spec.inputs.get(name) if spec else None
                if inp is not None and "loras" in inp.file_kinds and isinstance(value, str):
                    names.add(value)
    return sorted(names)


def _write_tiny_loras(folder: Path, names):
    """A LoRA for the tiny SDXL preset under each name, so workflows that pick a LoRA file can run."""
    if not names:
        return
    from lora_factory import peft_unet_lora

    from tunelab.core import lora, models

    handle = models.load("tiny-sdxl", device="cpu", dtype="fp32")
    weights = peft_unet_lora(handle, rank=4, alpha=4, seed=1, std=0.05)
    for name in names:
        lora.save(folder / name, unet=weights, rank=4, alpha=4, metadata={"base_model": "tiny-sdxl"})


@pytest.fixture(scope="session")
def comfy(tmp_path_factory):
    root = Path(os.environ["COMFYUI_PATH"]).expanduser().resolve()
    if not (root / "main.py").is_file():
        pytest.fail(f"COMFYUI_PATH={root} has no main.py; point it at a ComfyUI checkout")
    stray = root / "custom_nodes" / "tunelab"
    if (stray.is_symlink() or stray.exists()) and stray.resolve() != PACK:
        pytest.fail(f"{stray} is another copy of the pack and would shadow this one ({PACK}); remove it")
    venv_python = root / ".venv" / "bin" / "python"
    python = str(venv_python) if venv_python.is_file() else sys.executable

    # the pack is linked into a custom_nodes folder of this session (not into the checkout), so several
    # checkouts of the pack can test against one ComfyUI at the same time
    work = tmp_path_factory.mktemp("comfyui")
    for sub in ("output", "temp", "user", "models/loras", "custom_nodes"):
        (work / sub).mkdir(parents=True)
    if not stray.exists():
        (work / "custom_nodes" / "tunelab").symlink_to(PACK, target_is_directory=True)
    _write_tiny_loras(work / "models" / "loras", _lora_names_in_workflows())
    (work / "extra_model_paths.yaml").write_text(f"tunelab_test:\n    base_path: {work / 'models'}\n"
                                                 f"    loras: loras\n    custom_nodes: {work / 'custom_nodes'}\n")
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    log_path = work / "comfyui.log"
    log = open(log_path, "wb")
    proc = subprocess.Popen(
        [python, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port), "--disable-auto-launch",
         "--output-directory", str(work / "output"), "--temp-directory", str(work / "temp"),
         "--user-directory", str(work / "user"), "--database-url", "sqlite:///:memory:",
         "--extra-model-paths-config", str(work / "extra_model_paths.yaml")],
        cwd=root, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    server = Server(url, log_path, work / "output", proc)
    deadline = time.monotonic() + float(os.environ.get("TUNELAB_COMFY_START_TIMEOUT", "300"))
    try:
        while True:
            if proc.poll() is not None:
                pytest.fail(f"ComfyUI exited with {proc.returncode} while starting:\n{server.log()[-4000:]}")
            if time.monotonic() > deadline:
                pytest.fail(f"ComfyUI did not answer on {url} in time:\n{server.log()[-4000:]}")
            try:
                with urllib.request.urlopen(url + "/system_stats", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                time.sleep(1)
        yield server
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
        log.close()


def _png_size(path):
    from PIL import Image

    with Image.open(path) as im:
        im.load()
        return im.size


# ---------------------------------------------------------------------------------------------------------------
# Loading and registration
# ---------------------------------------------------------------------------------------------------------------

def test_pack_imports_without_errors(comfy):
    log = comfy.log()
    ours = [line for line in log.splitlines() if "custom_nodes/tunelab" in line or "custom_nodes\\tunelab" in line]
    assert any("seconds" in line for line in ours), f"the pack is not in the import table:\n{log[-3000:]}"
    bad = [line for line in ours if "IMPORT FAILED" in line or "Cannot import" in line]
    assert not bad, "\n".join(bad)
    assert "TuneLab: nodes in" not in log, [l for l in log.splitlines() if "TuneLab: nodes in" in l]


def test_object_info_lists_every_tunelab_node(comfy):
    info = comfy.object_info()
    missing = [name for name in NODE_CLASS_MAPPINGS if name not in info]
    assert not missing, f"registered by the pack but not served by ComfyUI: {missing}"
    for name, cls in NODE_CLASS_MAPPINGS.items():
        entry = info[name]
        declared = cls.INPUT_TYPES()
        assert list(entry["input"].get("required", {})) == list(declared.get("required", {})), name
        assert list(entry["input"].get("optional", {})) == list(declared.get("optional", {})), name
        served = wf.spec_from_object_info(name, entry)
        mine = wf.spec_from_class(name, cls)
        for inp in mine.inputs.values():  # types match; combo contents may list this server's files
            assert served.inputs[inp.name].type == inp.type, (name, inp.name)
        assert served.outputs == mine.outputs, name
        assert entry["display_name"] == NODE_DISPLAY_NAME_MAPPINGS[name]
        assert entry["category"].startswith("TuneLab/"), name
        assert bool(entry["output_node"]) == bool(getattr(cls, "OUTPUT_NODE", False)), name


def test_core_node_table_matches_server(comfy):
    """workflow.CORE_NODES (used offline by the validator and converter) says what this ComfyUI says."""
    info = comfy.object_info()
    problems = []
    for name, table in wf.CORE_NODES.items():
        if name not in info:
            problems.append(f"{name}: not served")
            continue
        mine, served = wf.spec_from_object_info(name, table), wf.spec_from_object_info(name, info[name])
        if (mine.outputs, mine.output_node, mine.display_name) != (served.outputs, served.output_node,
                                                                  served.display_name):
            problems.append(f"{name}: outputs/output_node/display name differ")
        if list(mine.inputs) != list(served.inputs):
            problems.append(f"{name}: inputs {list(mine.inputs)} != {list(served.inputs)}")
            continue
        for k, a in mine.inputs.items():
            b = served.inputs[k]
            strip = lambda o: {x: y for x, y in o.items() if x not in ("tooltip", "options")}
            if (a.type, a.required, strip(a.opts)) != (b.type, b.required, strip(b.opts)):
                problems.append(f"{name}.{k}: {a.type} {dict(a.opts)} != {b.type} {dict(b.opts)}")
            if not a.file_kinds and a.choices != b.choices:
                problems.append(f"{name}.{k}: choices differ")
    assert not problems, "\n".join(problems)


# ---------------------------------------------------------------------------------------------------------------
# Running graphs
# ---------------------------------------------------------------------------------------------------------------

BLANK = {
    "1": {"inputs": {"width": 64, "height": 48, "batch_size": 2, "color": 0x3366CC}, "class_type": "EmptyImage",
          "_meta": {"title": "Blank"}},
    "2": {"inputs": {"images": ["1", 0], "filename_prefix": "tunelab_test"}, "class_type": "SaveImage",
          "_meta": {"title": "Save"}},
}


def test_queue_command_against_real_server(comfy, tmp_path, capsys):
    path = tmp_path / "blank.json"
    path.write_text(json.dumps(BLANK))
    assert wf.validate(BLANK) == []
    out = tmp_path / "out"
    rc = cli.main(["queue", str(path), "--server", comfy.url, "--out", str(out), "--set", "Blank.width=32"])
    captured = capsys.readouterr()
    assert rc == 0, captured
    assert "success" in captured.out
    files = sorted(out.iterdir())
    assert len(files) == 2 and all(_png_size(f) == (32, 48) for f in files)

    rc = cli.main(["queue", str(path), "--server", comfy.url, "--set", "Blank.width=0"])
    err = capsys.readouterr().err
    assert rc == qc.EXIT_FAILED
    assert "ComfyUI refused the workflow" in err and "node 1 (EmptyImage" in err and "width" in err


def _unavailable_files(graph, info):
    """(node, input, value) for combo values this server does not offer (e.g. a LoRA file it lacks)."""
    missing = []
    for node_id, node in graph.items():
        spec_info = info.get(node.get("class_type"))
        if not spec_info:
            continue
        spec = wf.spec_from_object_info(node["class_type"], spec_info)
        for name, value in (node.get("inputs") or {}).items():
            inp = spec.inputs.get(name)
            if inp is not None and inp.type == "COMBO" and not wf.is_link(value) and value not in inp.choices:
                missing.append((node_id, name, value))
    return missing


def _small(name):
    """The small value an INT input is shrunk to, by its name: step counts to 2, pixel sizes to 64."""
    if name.endswith("steps"):
        return 2
    if name in ("width", "height", "resolution"):
        return 64
    return None


def _shrink(graph):
    """Keep runs short on a CPU: INT inputs of TuneLab and core nodes named like a step count or a pixel size go
    down to small legal values (never up)."""
    specs = wf.node_specs(NODE_CLASS_MAPPINGS)
    for node in graph.values():
        spec = specs.get(node.get("class_type"))
        for inp in spec.widget_inputs if spec else ():
            small, value = _small(inp.name), node["inputs"].get(inp.name)
            if small is None or inp.type != "INT" or not isinstance(value, int) or isinstance(value, bool):
                continue
            lo, step = inp.opts.get("min", 0), inp.opts.get("step", 1) or 1
            target = max(small, lo)
            target = lo + -(-(target - lo) // step) * step  # round up onto the widget's step grid
            node["inputs"][inp.name] = min(target, value)
    return graph


LONG_STEP_INPUTS = ("steps", "max_train_steps", "num_inference_steps")


def _fresh_output_names(graph):
    """Give output-name inputs (STRING inputs named *name / *prefix) a unique suffix: every run in the session
    shares one output folder, and a dataset folder refuses a second plan by design."""
    specs = wf.node_specs(NODE_CLASS_MAPPINGS)
    tag = uuid.uuid4().hex[:8]
    for node in graph.values():
        spec = specs.get(node.get("class_type"))
        for inp in spec.widget_inputs if spec else ():
            value = node["inputs"].get(inp.name)
            if inp.type == "STRING" and isinstance(value, str) and value and inp.name.endswith(("name", "prefix")):
                node["inputs"][inp.name] = f"{value}_{tag}"
    return graph


def _prepare(path, comfy, shrink=True):
    graph = qc.load_api_graph(path)
    info = comfy.object_info()
    graph = _fresh_output_names(qc.tiny_model_overrides(graph, info))
    if shrink:
        graph = _shrink(graph)
    missing = _unavailable_files(graph, info)
    if missing:
        pytest.skip(f"{path.name} needs files this server lacks: {missing}")
    return graph


@pytest.mark.parametrize("path", [pytest.param(p, id=p.name) for p in API_FILES] or [
    pytest.param(None, marks=pytest.mark.skip(reason="workflows/api/ holds no workflow yet"))])
def test_api_workflow_runs_to_completion(path, comfy, tmp_path):
    graph = _prepare(path, comfy)
    events = []
    result = comfy.client().run(graph, out_dir=tmp_path, timeout=RUN_TIMEOUT, on_event=lambda k, d: events.append(k))
    assert result.status == "success"
    assert result.images, f"{path.name} produced no images (outputs: {result.outputs})"
    for image in result.images:
        w, h = _png_size(image)
        assert w > 0 and h > 0
    assert "execution_success" in events


# ---------------------------------------------------------------------------------------------------------------
# Interrupts
# ---------------------------------------------------------------------------------------------------------------

def _long_version(graph):
    """The graph with every TuneLab INT input named like a step count raised towards its maximum, or None if it
    has no such input. Reuses whatever long-running TuneLab node the shipped workflows contain."""
    long = json.loads(json.dumps(graph))
    found = False
    for node in long.values():
        cls = NODE_CLASS_MAPPINGS.get(node.get("class_type"))
        if cls is None:
            continue
        spec = wf.spec_from_class(node["class_type"], cls)
        for inp in spec.widget_inputs:
            if inp.type == "INT" and inp.name in LONG_STEP_INPUTS and inp.name in node["inputs"] \
                    and not wf.is_link(node["inputs"][inp.name]):
                node["inputs"][inp.name] = int(min(inp.opts.get("max", 10000), 10000))
                found = True
    return long if found else None


def _interrupt_candidates():
    paths = ([Path(os.environ["TUNELAB_INTERRUPT_WORKFLOW"])] if os.environ.get("TUNELAB_INTERRUPT_WORKFLOW")
             else []) + API_FILES
    return [pytest.param(p, id=p.name) for p in paths] or [
        pytest.param(None, marks=pytest.mark.skip(reason="no API workflow with a long-running TuneLab node yet"))]


@pytest.mark.parametrize("path", _interrupt_candidates())
def test_interrupt_stops_a_long_tunelab_node(path, comfy):
    graph = _long_version(_prepare(path, comfy))
    if graph is None:
        pytest.skip(f"{path.name} has no TuneLab node with a step count to make long")
    client = comfy.client()
    pid = []
    progressed = threading.Event()

    def on_event(kind, data):
        node = graph.get(str(data.get("node")), {})
        if kind == "progress" and node.get("class_type", "").startswith("TuneLab"):
            if not progressed.is_set():
                progressed.set()
                client.interrupt(pid[0])

    start = time.monotonic()
    with pytest.raises(qc.ExecutionInterrupted):
        client.run(graph, timeout=RUN_TIMEOUT, on_event=on_event, on_submit=pid.append)
    assert progressed.is_set(), "interrupted before any TuneLab progress was reported"
    assert time.monotonic() - start < RUN_TIMEOUT
    end = time.monotonic() + 30  # ComfyUI records the history just after it sends the message
    entry = client.history(pid[0])
    while not entry.get("status") and time.monotonic() < end:
        time.sleep(0.2)
        entry = client.history(pid[0])
    kinds = [m[0] for m in (entry.get("status") or {}).get("messages") or []]
    assert "execution_interrupted" in kinds and "execution_success" not in kinds
