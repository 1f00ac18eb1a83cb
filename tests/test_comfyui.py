"""Real ComfyUI: start a server on loopback with the pack installed and drive it over its HTTP API.

Runs only when COMFYUI_PATH points at a ComfyUI checkout (see README, Tests); skipped otherwise. The server uses
COMFYUI_PATH/.venv/bin/python when present (the pack must be pip-installed there), a free port on 127.0.0.1 and
temporary output/temp/user folders, and is stopped when the session ends. LoRA files the shipped workflows name
are written for the tiny SDXL preset into a temporary models folder it is given. Runs swap models for tiny presets
and shrink steps/width/height so each workflow takes seconds on a CPU. The queue client is also tried as a real
deployment meets it: `queue --tiny` as a timed smoke test, headers through a recording proxy, a websocket dropped
by that proxy mid-run, and a second server killed and restarted on the same port mid-run.

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


def _comfy_root():
    root = Path(os.environ["COMFYUI_PATH"]).expanduser().resolve()
    if not (root / "main.py").is_file():
        pytest.fail(f"COMFYUI_PATH={root} has no main.py; point it at a ComfyUI checkout")
    return root


def _workspace(tmp_path_factory):
    """A session folder with output/temp/user, the tiny LoRAs the workflows name and this checkout linked as a
    custom node (not into the ComfyUI checkout, so several checkouts can test against one ComfyUI)."""
    root = _comfy_root()
    stray = root / "custom_nodes" / "tunelab"
    if (stray.is_symlink() or stray.exists()) and stray.resolve() != PACK:
        pytest.fail(f"{stray} is another copy of the pack and would shadow this one ({PACK}); remove it")
    work = tmp_path_factory.mktemp("comfyui")
    for sub in ("output", "temp", "user", "models/loras", "custom_nodes"):
        (work / sub).mkdir(parents=True)
    if not stray.exists():
        (work / "custom_nodes" / "tunelab").symlink_to(PACK, target_is_directory=True)
    _write_tiny_loras(work / "models" / "loras", _lora_names_in_workflows())
    (work / "extra_model_paths.yaml").write_text(f"tunelab_test:\n    base_path: {work / 'models'}\n"
                                                 f"    loras: loras\n    custom_nodes: {work / 'custom_nodes'}\n")
    return work


def start_server(work: Path, port: int = 0, log_name: str = "comfyui.log") -> Server:
    """Start ComfyUI on 127.0.0.1:`port` (a free one for 0) over `work`, and wait until it answers."""
    root = _comfy_root()
    venv_python = root / ".venv" / "bin" / "python"
    python = str(venv_python) if venv_python.is_file() else sys.executable
    port = port or _free_port()
    url = f"http://127.0.0.1:{port}"
    log_path = work / log_name
    log = open(log_path, "ab")
    proc = subprocess.Popen(
        [python, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port), "--disable-auto-launch",
         "--output-directory", str(work / "output"), "--temp-directory", str(work / "temp"),
         "--user-directory", str(work / "user"), "--database-url", "sqlite:///:memory:",
         "--extra-model-paths-config", str(work / "extra_model_paths.yaml")],
        cwd=root, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    log.close()
    server = Server(url, log_path, work / "output", proc)
    deadline = time.monotonic() + float(os.environ.get("TUNELAB_COMFY_START_TIMEOUT", "300"))
    while True:
        if proc.poll() is not None:
            pytest.fail(f"ComfyUI exited with {proc.returncode} while starting:\n{server.log()[-4000:]}")
        if time.monotonic() > deadline:
            stop_server(server)
            pytest.fail(f"ComfyUI did not answer on {url} in time:\n{server.log()[-4000:]}")
        try:
            with urllib.request.urlopen(url + "/system_stats", timeout=2) as r:
                if r.status == 200:
                    return server
        except OSError:
            time.sleep(0.5)


def stop_server(server: Server) -> None:
    server.proc.terminate()
    try:
        server.proc.wait(30)
    except subprocess.TimeoutExpired:
        server.proc.kill()
        server.proc.wait(10)


@pytest.fixture(scope="session")
def comfy_work(tmp_path_factory):
    return _workspace(tmp_path_factory)


@pytest.fixture(scope="session")
def comfy(comfy_work):
    server = start_server(comfy_work)
    try:
        yield server
    finally:
        stop_server(server)


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
    result = comfy.client().run(graph, out_dir=tmp_path, timeout=RUN_TIMEOUT, on_event=lambda k, d: events.append(k),
                                previews=True)
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


# ---------------------------------------------------------------------------------------------------------------
# The queue client in real deployments: a quick --tiny smoke test, headers through a proxy, dropped websockets
# and a server restarted mid-run (never queued twice)
# ---------------------------------------------------------------------------------------------------------------

class RecordingProxy:
    """A loopback TCP proxy in front of ComfyUI, as a reverse proxy in a real deployment would be: it records the
    request head of every connection (plain HTTP and the websocket upgrade), can refuse connections that lack a
    header (401), and `drop()` cuts every open connection (a network failure)."""

    def __init__(self, upstream: str, require: tuple = ()):
        from urllib.parse import urlparse

        up = urlparse(upstream)
        self.upstream = (up.hostname, up.port)
        self.require = tuple(require)  # (lower-case header name, value)
        self.heads, self.open = [], []
        self.lock = threading.Lock()
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while not self.closed:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn):
        data = b""
        while b"\r\n\r\n" not in data and len(data) < 1 << 16:
            chunk = conn.recv(4096)
            if not chunk:
                conn.close()
                return
            data += chunk
        head = data.split(b"\r\n\r\n", 1)[0].decode("latin-1").split("\r\n")
        headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in head[1:])}
        with self.lock:
            self.heads.append((head[0], headers))
        if self.require and headers.get(self.require[0]) != self.require[1]:
            conn.sendall(b"HTTP/1.1 401 Unauthorized\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
            conn.close()
            return
        up = socket.create_connection(self.upstream)
        up.sendall(data)
        with self.lock:
            self.open.append((conn, up))
        for a, b in ((conn, up), (up, conn)):
            threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(src, dst):
        try:
            while True:
                chunk = src.recv(65536)
                if not chunk:
                    break
                dst.sendall(chunk)
        except OSError:
            pass
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def drop(self):
        with self.lock:
            pairs, self.open = self.open, []
        for pair in pairs:
            for s in pair:
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self):
        self.closed = True
        self.sock.close()
        self.drop()


def test_queue_tiny_smoke_test_is_quick_and_headers_reach_the_server(comfy, tmp_path, capsys, monkeypatch):
    proxy = RecordingProxy(comfy.url, require=("authorization", "Bearer t0ken"))
    try:
        wf_path = API_DIR / "three_way_comparison.json"
        rc = cli.main(["queue", str(wf_path), "--tiny", "--server", proxy.url, "--out", str(tmp_path / "denied")])
        assert rc == qc.EXIT_FAILED and "HTTP 401" in capsys.readouterr().err  # the proxy wants the token
        monkeypatch.setenv("TUNELAB_TEST_TOKEN", "t0ken")
        out = tmp_path / "out"
        start = time.monotonic()
        rc = cli.main(["queue", str(wf_path), "--tiny", "--server", proxy.url, "--out", str(out),
                       "--token-env", "TUNELAB_TEST_TOKEN"])
        seconds = time.monotonic() - start
        captured = capsys.readouterr()
        assert rc == 0, captured
        print(f"queue --tiny three_way_comparison.json: {seconds:.1f} s")
        assert seconds < 60, f"the smoke test took {seconds:.1f} s"
        files = sorted(p.name for p in out.iterdir())
        assert files == ["01.png", "02.png", "03.png", "grid.png"], files  # the Compare node's saved outputs
        assert _png_size(out / "01.png") == (128, 128)  # sizes lowered to the tiny default, not 1024
        assert "1 temporary preview(s) not downloaded" in captured.out
        granted = [(line, h) for line, h in proxy.heads if h.get("authorization") == "Bearer t0ken"]
        assert any(line.startswith("POST /prompt") for line, _ in granted)
        assert any(line.startswith("GET /ws?") and h.get("upgrade", "").lower() == "websocket" for line, h in granted)
        assert any(line.startswith("GET /view?") for line, _ in granted)
    finally:
        proxy.close()


def _long_generate(comfy, steps=300):
    """weighted_prompt.json on the tiny presets with a long TuneLab Generate (a node to catch mid-run)."""
    info = comfy.object_info()
    graph = qc.tiny_sizes(qc.tiny_model_overrides(qc.load_api_graph(API_DIR / "weighted_prompt.json"), info), info)
    (gen_id,) = [i for i, n in graph.items() if n["class_type"] == "TuneLabGenerate"]
    graph[gen_id]["inputs"].update(steps=steps, width=64, height=64)
    return _fresh_output_names(graph), gen_id


def _on_first_progress(node_id, action):
    fired = threading.Event()

    def on_event(kind, data):
        if kind == "progress" and str(data.get("node")) == node_id and not fired.is_set():
            fired.set()
            threading.Thread(target=action, daemon=True).start()
    return on_event, fired


def test_dropped_websocket_is_followed_again_without_queuing_twice(comfy, tmp_path):
    graph, gen_id = _long_generate(comfy)
    proxy = RecordingProxy(comfy.url)
    try:
        client = qc.ComfyClient(proxy.url, http_timeout=60, backoff=(0.2, 2.0))
        notices = []
        client.on_notice = notices.append
        on_event, fired = _on_first_progress(gen_id, proxy.drop)
        before = comfy.log().count("got prompt")
        result = client.run(graph, out_dir=tmp_path, timeout=RUN_TIMEOUT, on_event=on_event)
        assert fired.is_set() and result.status == "success"
        assert result.reconnects >= 1 and result.resubmitted == 0, notices
        assert comfy.log().count("got prompt") == before + 1  # queued once
        assert result.images
    finally:
        proxy.close()


def test_restarted_server_runs_the_prompt_once_more_under_the_same_id(comfy, comfy_work, tmp_path):
    graph, gen_id = _long_generate(comfy)
    port = _free_port()
    first = start_server(comfy_work, port, log_name="restart-1.log")
    second = []

    def restart():
        stop_server(first)
        second.append(start_server(comfy_work, port, log_name="restart-2.log"))

    try:
        client = qc.ComfyClient(first.url, http_timeout=60, backoff=(0.5, 2.0))
        notices = []
        client.on_notice = notices.append
        on_event, fired = _on_first_progress(gen_id, restart)
        result = client.run(graph, out_dir=tmp_path, timeout=RUN_TIMEOUT, on_event=on_event)
        assert fired.is_set() and result.status == "success", notices
        assert result.resubmitted == 1 and any("lost prompt" in n for n in notices), notices
        assert first.log().count("got prompt") == 1 and second[0].log().count("got prompt") == 1
        assert qc.ComfyClient(second[0].url).knows(result.prompt_id) == "done"  # under the client's own id
        assert result.images
    finally:
        for s in [first, *second]:
            if s.proc.poll() is None:
                stop_server(s)
