"""The queue client against a small fake ComfyUI served in-process on 127.0.0.1 (HTTP routes plus a websocket).

The fake speaks the documented protocol: POST /prompt answers {prompt_id, number, node_errors} or 400
{error, node_errors}; a worker thread then sends execution_start / executing / progress / executed /
execution_success (or execution_error / execution_interrupted) to the client's websocket and records /history.
Node behaviour is chosen by class_type: "Slow" reports progress until interrupted, "Steps" reports `n` steps,
"Fail" raises, SaveImage and PreviewImage produce images, "Report" a non-image file. `drop_sockets()` cuts every
open websocket (a network drop); `restart()` also forgets every prompt and its history (a server restart).
"""
import base64
import hashlib
import io
import json
import queue
import socket
import threading
import time
import urllib.parse
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from tunelab import cli
from tunelab.core import queue_client as qc

WS_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


def _png() -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 30, 30)).save(buf, format="PNG")
    return buf.getvalue()


def _frame(payload: bytes, opcode: int = 0x1) -> bytes:
    n = len(payload)
    head = bytes([0x80 | opcode])
    if n < 126:
        head += bytes([n])
    elif n < 1 << 16:
        head += bytes([126]) + n.to_bytes(2, "big")
    else:
        head += bytes([127]) + n.to_bytes(8, "big")
    return head + payload


class FakeComfy:
    KNOWN = {"TuneLabLoadPipeline", "EmptyImage", "SaveImage", "PreviewImage", "Slow", "Fail", "Steps", "Report"}
    REPORT = b'{"psnr": 30.0}\n'

    def __init__(self, drop_websocket=False, step_seconds=0.02):
        self.drop_websocket = drop_websocket
        self.step_seconds = step_seconds
        self.prompts, self.history, self.requests, self.headers = {}, {}, [], []
        self.sockets: dict = {}
        self.interrupt_flag = threading.Event()
        self.socket_gen = 0  # bumped by drop_sockets(): handlers of an older generation hang up
        self.generation = 0  # bumped by restart(): executions of an older generation vanish
        self.submissions = []  # every accepted POST /prompt body, across restarts
        self.deleted, self.interrupts = [], []
        self.lock = threading.Lock()
        self.png = _png()
        self.stopping = False
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):
                pass

            def _send(self, status, body, ctype="application/json"):
                raw = body if isinstance(body, bytes) else json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(raw)))
                self.end_headers()
                self.wfile.write(raw)

            def _body(self):
                n = int(self.headers.get("Content-Length") or 0)
                return json.loads(self.rfile.read(n) or b"{}")

            def do_GET(self):
                url = urllib.parse.urlparse(self.path)
                q = dict(urllib.parse.parse_qsl(url.query))
                fake.requests.append(("GET", url.path))
                fake.headers.append(dict(self.headers))
                if url.path == "/ws":
                    return self._websocket(q.get("clientId", ""))
                if url.path == "/system_stats":
                    return self._send(200, {"system": {"comfyui_version": "fake"}, "devices": []})
                if url.path == "/object_info":
                    return self._send(200, fake.object_info())
                if url.path.startswith("/object_info/"):
                    name = url.path.rsplit("/", 1)[1]
                    info = fake.object_info()
                    return self._send(200, {name: info[name]} if name in info else {})
                if url.path == "/queue":
                    running = [[n, pid, {}, {}, []] for n, pid in enumerate(fake.prompts) if pid not in fake.history]
                    return self._send(200, {"queue_running": running, "queue_pending": []})
                if url.path.startswith("/history/"):
                    pid = url.path.rsplit("/", 1)[1]
                    return self._send(200, {pid: fake.history[pid]} if pid in fake.history else {})
                if url.path == "/view":
                    if q.get("filename", "").endswith(".png"):
                        return self._send(200, fake.png, "image/png")
                    if q.get("filename", "").endswith(".json"):
                        return self._send(200, fake.REPORT, "application/json")
                    return self._send(404, {"error": "not found"})
                return self._send(404, {"error": "no route"})

            def do_POST(self):
                path = urllib.parse.urlparse(self.path).path
                body = self._body()
                fake.requests.append(("POST", path))
                fake.headers.append(dict(self.headers))
                if path == "/prompt":
                    status, answer = fake.accept(body)
                    return self._send(status, answer)
                if path == "/interrupt":
                    fake.interrupts.append(body.get("prompt_id"))
                    fake.interrupt_flag.set()
                    return self._send(200, {})
                if path == "/queue":
                    fake.deleted += body.get("delete", [])
                    return self._send(200, {})
                return self._send(404, {"error": "no route"})

            def _read_frames(self, closed):
                """Read the client's (masked) frames; answer a close frame with a close frame."""
                try:
                    while True:
                        b0, b1 = self.rfile.read(2)
                        n = b1 & 0x7F
                        if n == 126:
                            n = int.from_bytes(self.rfile.read(2), "big")
                        elif n == 127:
                            n = int.from_bytes(self.rfile.read(8), "big")
                        self.rfile.read((4 if b1 & 0x80 else 0) + n)
                        if b0 & 0x0F == 0x8:
                            self.wfile.write(_frame(b"\x03\xe8", opcode=0x8))
                            self.wfile.flush()
                            return
                except (OSError, ValueError):
                    pass
                finally:
                    closed.set()

            def _websocket(self, client_id):
                key = self.headers.get("Sec-WebSocket-Key", "")
                accept = base64.b64encode(hashlib.sha1((key + WS_GUID).encode()).digest()).decode()
                self.send_response(101, "Switching Protocols")
                self.send_header("Upgrade", "websocket")
                self.send_header("Connection", "Upgrade")
                self.send_header("Sec-WebSocket-Accept", accept)
                self.end_headers()
                self.wfile.flush()
                self.close_connection = True
                if fake.drop_websocket:
                    return
                outbox = queue.Queue()
                gen = fake.socket_gen
                with fake.lock:
                    fake.sockets[client_id] = outbox
                closed = threading.Event()
                threading.Thread(target=self._read_frames, args=(closed,), daemon=True).start()
                try:
                    self.wfile.write(_frame(json.dumps({"type": "status", "data": {"status": {
                        "exec_info": {"queue_remaining": 0}}, "sid": client_id}}).encode()))
                    self.wfile.write(_frame(b"\x00\x00\x00\x01\x00\x00\x00\x02fakepng", opcode=0x2))
                    self.wfile.flush()
                    while not fake.stopping and not closed.is_set() and gen == fake.socket_gen:
                        try:
                            msg = outbox.get(timeout=0.05)
                        except queue.Empty:
                            continue
                        self.wfile.write(_frame(json.dumps(msg).encode()))
                        self.wfile.flush()
                except OSError:
                    pass
                finally:
                    with fake.lock:
                        if fake.sockets.get(client_id) is outbox:
                            fake.sockets.pop(client_id, None)
                    if gen != fake.socket_gen:  # dropped: cut the TCP connection, as a network failure would
                        try:
                            self.connection.shutdown(socket.SHUT_RDWR)
                        except OSError:
                            pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def drop_sockets(self):
        self.socket_gen += 1

    def restart(self):
        """Forget every prompt (running ones stop without a trace) and cut the sockets, like a restarted server."""
        self.generation += 1
        self.prompts.clear()
        self.history.clear()
        self.drop_sockets()

    def close(self):
        self.stopping = True
        self.server.shutdown()
        self.server.server_close()

    @staticmethod
    def object_info():
        return {"TuneLabLoadPipeline": {"input": {"required": {
                    "model": [["tiny-sdxl", "tiny-sdxl-refiner", "tiny-ip2p", "tiny-sd15"], {}],
                    "dtype": [["auto", "fp32"], {}]}}, "output": ["TUNELAB_PIPE"]},
                "EmptyImage": {"input": {"required": {"width": ["INT", {}], "height": ["INT", {}]},
                                         "optional": {"color": ["INT", {}]}}, "output": ["IMAGE"]},
                "SaveImage": {"input": {"required": {"images": ["IMAGE", {}], "filename_prefix": ["STRING", {}]}},
                              "output": []}}

    # ---- the "server" ----
    def accept(self, body):
        graph, client_id = body.get("prompt") or {}, body.get("client_id")
        for node_id, node in graph.items():
            if node.get("class_type") not in self.KNOWN:
                return 400, {"error": {"type": "invalid_prompt", "message": f"Cannot execute because node "
                             f"{node.get('class_type')} does not exist.", "details": f"Node ID '#{node_id}'",
                             "extra_info": {}}, "node_errors": {}}
        errors = {}
        for node_id, node in graph.items():
            for name, value in (node.get("inputs") or {}).items():
                if value == "INVALID":
                    errors[node_id] = {"errors": [{"type": "value_not_in_list", "message": "Value not in list",
                                                   "details": f"{name}: 'INVALID' not in ['a', 'b']",
                                                   "extra_info": {}}],
                                       "dependent_outputs": ["9"], "class_type": node["class_type"]}
        if errors:
            return 400, {"error": {"type": "prompt_outputs_failed_validation",
                                   "message": "Prompt outputs failed validation", "details": "", "extra_info": {}},
                         "node_errors": errors}
        pid = body.get("prompt_id") or str(uuid.uuid4())
        self.prompts[pid] = body
        self.submissions.append(body)
        threading.Thread(target=self.execute, args=(pid, graph, client_id), daemon=True).start()
        return 200, {"prompt_id": pid, "number": len(self.prompts), "node_errors": {}}

    def send(self, client_id, kind, data):
        deadline = time.monotonic() + 2
        while time.monotonic() < deadline and not self.drop_websocket:
            with self.lock:
                box = self.sockets.get(client_id)
            if box is not None:
                box.put({"type": kind, "data": data})
                return
            time.sleep(0.01)

    def execute(self, pid, graph, client_id):
        try:
            self._execute(pid, graph, client_id, self.generation)
        except _Vanished:
            pass

    def _execute(self, pid, graph, client_id, generation):
        messages, outputs = [], {}

        def emit(kind, data):
            if generation != self.generation:
                raise _Vanished
            data = {**data, "prompt_id": pid, "timestamp": int(time.time() * 1000)}
            if kind.startswith("execution_"):
                messages.append([kind, data])
            self.send(client_id, kind, data)

        def finish(status_str, completed):
            if generation != self.generation:
                raise _Vanished
            self.history[pid] = {"prompt": [0, pid, graph, {}, []], "outputs": outputs,
                                 "status": {"status_str": status_str, "completed": completed, "messages": messages}}
            self.send(client_id, "executing", {"node": None, "prompt_id": pid})

        emit("execution_start", {})
        emit("execution_cached", {"nodes": []})
        for node_id, node in graph.items():
            kind = node["class_type"]
            emit("executing", {"node": node_id, "display_node": node_id})
            if kind == "Slow":
                i = 0
                while not self.interrupt_flag.is_set():
                    i += 1
                    emit("progress", {"value": i, "max": 1000, "node": node_id})
                    time.sleep(self.step_seconds)
                self.interrupt_flag.clear()
                emit("execution_interrupted", {"node_id": node_id, "node_type": kind, "executed": []})
                return finish("error", False)
            if kind == "Fail":
                emit("execution_error", {"node_id": node_id, "node_type": kind, "executed": [],
                                         "exception_type": "RuntimeError", "exception_message": "boom",
                                         "traceback": ["Traceback (most recent call last):\n", "  line 1\n",
                                                       "RuntimeError: boom\n"]})
                return finish("error", False)
            if kind == "Steps":
                n = int(node["inputs"].get("n", 10))
                for step in range(1, n + 1):
                    emit("progress", {"value": step, "max": n, "node": node_id})
                    time.sleep(self.step_seconds)
                continue
            if kind == "Report":
                files = [{"filename": "report.json", "subfolder": "tunelab/eval", "type": "output"}]
                outputs[node_id] = {"files": files, "text": ["mean PSNR 30.0"]}
                emit("executed", {"node": node_id, "display_node": node_id, "output": outputs[node_id]})
                continue
            for step in (1, 2):
                emit("progress", {"value": step, "max": 2, "node": node_id})
            if kind in ("SaveImage", "PreviewImage"):
                prefix = node["inputs"].get("filename_prefix", "preview")
                images = [{"filename": f"{prefix}_{n:05d}_.png", "subfolder": "",
                           "type": "output" if kind == "SaveImage" else "temp"} for n in (1, 2)]
                outputs[node_id] = {"images": images}
                emit("executed", {"node": node_id, "display_node": node_id, "output": {"images": images}})
            time.sleep(self.step_seconds)
        emit("execution_success", {})
        finish("success", True)


class _Vanished(Exception):
    """An execution that a restart() forgot."""


@pytest.fixture
def fake():
    server = FakeComfy()
    yield server
    server.close()


GRAPH = {
    "1": {"inputs": {"width": 64, "height": 64, "color": 0}, "class_type": "EmptyImage", "_meta": {"title": "Blank"}},
    "2": {"inputs": {"model": "sd_xl_base_1.0.safetensors", "dtype": "auto"}, "class_type": "TuneLabLoadPipeline",
          "_meta": {"title": "Load"}},
    "9": {"inputs": {"images": ["1", 0], "filename_prefix": "tunelab"}, "class_type": "SaveImage",
          "_meta": {"title": "Save v1.0"}},
}


def _write(tmp_path, graph, name="wf.json"):
    p = tmp_path / name
    p.write_text(json.dumps(graph))
    return p


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------------------------------------------------------
# --set / --sweep parsing
# ---------------------------------------------------------------------------------------------------------------

def test_parse_assignment_and_values():
    ov = qc.parse_assignment("Save v1.0.filename_prefix=run=1")  # a title with dots, a value with '='
    assert (ov.node, ov.input, ov.text) == ("Save v1.0", "filename_prefix", "run=1")
    for bad in ("seed=1", "3.seed", ".seed=1", "3.=1"):
        with pytest.raises(qc.BadWorkflow, match="NODE.INPUT=VALUE"):
            qc.parse_assignment(bad)
    assert qc.parse_value("42") == 42 and qc.parse_value("7.5") == 7.5 and qc.parse_value("true") is True
    assert qc.parse_value('["4", 0]') == ["4", 0]
    assert qc.parse_value("a cat") == "a cat"
    assert qc.parse_value("42", current="old text") == "42"          # a string input stays a string
    assert qc.parse_value('"quoted"', current="old") == "quoted"


def test_apply_overrides_by_id_title_and_class():
    sets = [qc.parse_assignment(s) for s in ("1.width=128", "Save v1.0.filename_prefix=7",
                                             "TuneLabLoadPipeline.model=tiny-sdxl", "9.images=[\"2\", 0]")]
    out = qc.apply_overrides(GRAPH, sets)
    assert out["1"]["inputs"]["width"] == 128
    assert out["9"]["inputs"]["filename_prefix"] == "7"
    assert out["2"]["inputs"]["model"] == "tiny-sdxl"
    assert out["9"]["inputs"]["images"] == ["2", 0]
    assert GRAPH["1"]["inputs"]["width"] == 64  # the original is untouched
    with pytest.raises(qc.BadWorkflow, match="no node with id, title or type 'Nope'"):
        qc.apply_overrides(GRAPH, [qc.parse_assignment("Nope.x=1")])
    with pytest.raises(qc.BadWorkflow, match="has no input 'sead'"):
        qc.apply_overrides(GRAPH, [qc.parse_assignment("1.sead=1")])
    # an optional input the file leaves out is accepted when the server declares it
    out = qc.apply_overrides(GRAPH, [qc.parse_assignment("1.batch=2")], declared=lambda ct: ["batch"])
    assert out["1"]["inputs"]["batch"] == 2


def test_expand_jobs():
    assert qc.expand_jobs() == [[]]
    jobs = qc.expand_jobs(["1.width=8", "2.model=a", "2.model=b"], ["1.height=1,2,3"])
    assert len(jobs) == 6
    assert all(str(j[0]) == "1.width=8" for j in jobs)
    assert {(j[1].text, j[2].text) for j in jobs} == {(m, h) for m in "ab" for h in "123"}
    jobs = qc.expand_jobs([], ['9.filename_prefix=["a, b", "c"]'])
    assert [j[0].text for j in jobs] == ["a, b", "c"]


def test_tiny_model_overrides():
    graph = json.loads(json.dumps(GRAPH))
    graph["3"] = {"inputs": {"model": "instruct-pix2pix-00-22000.safetensors", "dtype": "auto"},
                  "class_type": "TuneLabLoadPipeline"}
    graph["4"] = {"inputs": {"model": "sd_xl_refiner_1.0.safetensors", "dtype": "auto"},
                  "class_type": "TuneLabLoadPipeline"}
    graph["5"] = {"inputs": {"lora_name": "sdxl-wrong-lora.safetensors", "strength": 1.0, "pipe": ["2", 0]},
                  "class_type": "TuneLabLoadLora"}
    info = dict(FakeComfy.object_info())
    info["TuneLabLoadLora"] = {"input": {"required": {
        "pipe": ["TUNELAB_PIPE"], "lora_name": [["mine.safetensors", "tiny-sdxl-wrong-lora (built-in)"]],
        "strength": ["FLOAT", {"default": 1.0}]}}}
    out = qc.tiny_model_overrides(graph, info)
    assert [out[i]["inputs"]["model"] for i in "234"] == ["tiny-sdxl", "tiny-ip2p", "tiny-sdxl-refiner"]
    assert out["2"]["inputs"]["dtype"] == "auto"
    assert out["5"]["inputs"]["lora_name"] == "tiny-sdxl-wrong-lora (built-in)"


# ---------------------------------------------------------------------------------------------------------------
# The command against the fake server
# ---------------------------------------------------------------------------------------------------------------

def test_queue_success_progress_and_download(fake, tmp_path, capsys):
    wf = _write(tmp_path, GRAPH)
    out = tmp_path / "out"
    rc = cli.main(["queue", str(wf), "--server", fake.url, "--out", str(out), "--set", "Blank.color=255",
                   "--set", "9.filename_prefix=42", "--tiny"])
    captured = capsys.readouterr()
    assert rc == 0, captured
    assert "queued prompt" in captured.out
    assert "node 1 (Blank): 2/2" in captured.out          # progress lines
    assert "running node 9 (Save v1.0)" in captured.out
    assert "success" in captured.out
    assert sorted(p.name for p in out.iterdir()) == ["42_00001_.png", "42_00002_.png"]
    assert (out / "42_00001_.png").read_bytes() == fake.png
    (body,) = fake.prompts.values()
    sent = body["prompt"]
    assert sent["1"]["inputs"]["color"] == 255 and sent["9"]["inputs"]["filename_prefix"] == "42"
    assert sent["2"]["inputs"]["model"] == "tiny-sdxl"     # --tiny
    assert body["client_id"]
    assert all(p in ("/prompt", "/ws", "/queue", "/history/" + next(iter(fake.prompts)), "/view", "/system_stats",
                     "/object_info", "/object_info/EmptyImage", "/object_info/SaveImage",
                     "/object_info/TuneLabLoadPipeline") for _, p in fake.requests)


def test_client_run_returns_outputs(fake, tmp_path):
    client = qc.ComfyClient(fake.url)
    events = []
    result = client.run(GRAPH, out_dir=tmp_path, prefix="x_", timeout=30, on_event=lambda k, d: events.append(k))
    assert result.status == "success" and len(result.images) == 2
    assert result.outputs["9"]["images"][0]["filename"] == "tunelab_00001_.png"
    assert [p.name for p in result.images] == ["x_tunelab_00001_.png", "x_tunelab_00002_.png"]
    assert events[0] == "execution_start" and events[-1] == "execution_success" and "progress" in events


def test_bad_graph_prints_node_errors(fake, tmp_path, capsys):
    graph = json.loads(json.dumps(GRAPH))
    graph["2"]["inputs"]["dtype"] = "INVALID"
    rc = cli.main(["queue", str(_write(tmp_path, graph)), "--server", fake.url, "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == qc.EXIT_FAILED
    assert "ComfyUI refused the workflow: Prompt outputs failed validation" in err
    assert "node 2 (TuneLabLoadPipeline, 'Load'): Value not in list: dtype: 'INVALID' not in" in err
    assert not fake.history


def test_unknown_node_type_refused(fake, tmp_path, capsys):
    graph = {**GRAPH, "5": {"inputs": {}, "class_type": "Mystery"}}
    rc = cli.main(["queue", str(_write(tmp_path, graph)), "--server", fake.url])
    assert rc == qc.EXIT_FAILED
    assert "Cannot execute because node Mystery does not exist" in capsys.readouterr().err


def test_execution_error_exit_code(fake, tmp_path, capsys):
    graph = {**GRAPH, "5": {"inputs": {"images": ["1", 0]}, "class_type": "Fail", "_meta": {"title": "F"}}}
    rc = cli.main(["queue", str(_write(tmp_path, graph)), "--server", fake.url, "--out", str(tmp_path / "o"),
                   "--traceback", "1"])
    err = capsys.readouterr().err
    assert rc == qc.EXIT_FAILED
    assert "node 5 (Fail) failed: RuntimeError: boom" in err
    assert "RuntimeError: boom" in err.splitlines()[-1]  # the traceback's last line


def test_interrupt_is_reported(fake, tmp_path, capsys):
    graph = {"1": {"inputs": {}, "class_type": "Slow"}, "9": GRAPH["9"], "0": GRAPH["1"]}
    client = qc.ComfyClient(fake.url)
    pids = []
    timer = threading.Timer(0.3, lambda: client.interrupt(pids[0] if pids else None))
    timer.start()
    with pytest.raises(qc.ExecutionInterrupted, match="interrupted at node 1"):
        client.run(graph, timeout=20, on_submit=pids.append)
    timer.join()
    assert fake.interrupts == pids

    threading.Timer(0.3, lambda: qc.ComfyClient(fake.url).interrupt()).start()
    rc = cli.main(["queue", str(_write(tmp_path, graph)), "--server", fake.url])
    assert rc == qc.EXIT_INTERRUPTED
    assert "interrupted" in capsys.readouterr().err


def test_timeout_cancels_the_prompt(fake, tmp_path, capsys):
    graph = {"1": {"inputs": {}, "class_type": "Slow"}, "9": GRAPH["9"]}
    rc = cli.main(["queue", str(_write(tmp_path, graph)), "--server", fake.url, "--timeout", "0.5"])
    assert rc == qc.EXIT_TIMEOUT
    assert "did not finish within 0.5 s" in capsys.readouterr().err
    (pid,) = fake.prompts
    assert fake.deleted == [pid] and fake.interrupts == [pid]


def test_unreachable_server(tmp_path, capsys):
    port = _free_port()
    rc = cli.main(["queue", str(_write(tmp_path, GRAPH)), "--server", f"127.0.0.1:{port}"])
    err = capsys.readouterr().err
    assert rc == qc.EXIT_UNREACHABLE
    assert f"cannot reach ComfyUI at http://127.0.0.1:{port}" in err and "Is it running?" in err


def test_ui_format_refused(tmp_path, capsys, fake):
    ui = {"last_node_id": 1, "nodes": [{"id": 1, "type": "SaveImage", "widgets_values": ["x"]}], "links": [],
          "version": 0.4}
    path = _write(tmp_path, ui, "demo.json")
    rc = cli.main(["queue", str(path), "--server", fake.url])
    err = capsys.readouterr().err
    assert rc == qc.EXIT_USAGE
    assert "is a UI-format workflow" in err and "Export (API)" in err
    (tmp_path / "api").mkdir()
    _write(tmp_path / "api", GRAPH, "demo.json")
    assert cli.main(["queue", str(path), "--server", fake.url]) == qc.EXIT_USAGE
    assert f"use its API twin {tmp_path / 'api' / 'demo.json'}" in capsys.readouterr().err
    assert not fake.prompts


def test_bad_set_refused_before_submitting(fake, tmp_path, capsys):
    rc = cli.main(["queue", str(_write(tmp_path, GRAPH)), "--server", fake.url, "--set", "7.seed=1"])
    assert rc == qc.EXIT_USAGE
    assert "no node with id, title or type '7'" in capsys.readouterr().err
    assert not fake.prompts


def test_missing_websocket_client(monkeypatch, fake, tmp_path, capsys):
    import sys

    monkeypatch.setitem(sys.modules, "websocket", None)
    rc = cli.main(["queue", str(_write(tmp_path, GRAPH)), "--server", fake.url])
    assert rc == qc.EXIT_USAGE
    assert "pip install 'tunelab[headless]'" in capsys.readouterr().err


def test_websocket_drop_falls_back_to_history(tmp_path):
    server = FakeComfy(drop_websocket=True)
    try:
        result = qc.ComfyClient(server.url).run(GRAPH, out_dir=tmp_path, timeout=20)
        assert result.status == "success" and len(result.images) == 2
    finally:
        server.close()


def test_batch_spreads_over_servers(tmp_path, capsys):
    a, b = FakeComfy(step_seconds=0.15), FakeComfy(step_seconds=0.15)
    try:
        rc = cli.main(["queue", str(_write(tmp_path, GRAPH)), "--server", a.url, "--server", b.url,
                       "--sweep", "1.width=8,16,24", "--set", "9.filename_prefix=p", "--out", str(tmp_path / "o")])
        out = capsys.readouterr().out
        assert rc == 0, out
        assert len(a.prompts) >= 1 and len(b.prompts) >= 1 and len(a.prompts) + len(b.prompts) == 3
        widths = sorted(p["prompt"]["1"]["inputs"]["width"] for s in (a, b) for p in s.prompts.values())
        assert widths == [8, 16, 24]
        assert "3/3 job(s) succeeded" in out
        assert sorted(p.name for p in (tmp_path / "o").iterdir()) == [
            f"job{j}_p_0000{n}_.png" for j in (1, 2, 3) for n in (1, 2)]
    finally:
        a.close()
        b.close()


# ---------------------------------------------------------------------------------------------------------------
# Real deployments: headers, idempotent retries, non-image outputs, previews, --tiny sizes
# ---------------------------------------------------------------------------------------------------------------

STEPS_GRAPH = {"1": {"inputs": {"n": 30}, "class_type": "Steps", "_meta": {"title": "Work"}}, "9": GRAPH["9"],
               "0": GRAPH["1"]}


def test_headers_and_token_reach_every_route(fake, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("TUNELAB_TEST_TOKEN", "s3cret")
    rc = cli.main(["queue", str(_write(tmp_path, GRAPH)), "--server", fake.url, "--out", str(tmp_path / "o"),
                   "--header", "X-Proxy-User: ada", "--token-env", "TUNELAB_TEST_TOKEN"])
    captured = capsys.readouterr()
    assert rc == 0, captured
    assert "s3cret" not in captured.out + captured.err
    routes = {path for _, path in fake.requests}
    assert {"/prompt", "/ws", "/view", "/system_stats"} <= routes
    assert len(fake.headers) == len(fake.requests)
    for headers in fake.headers:
        assert headers.get("Authorization") == "Bearer s3cret" and headers.get("X-Proxy-User") == "ada"
    rc = cli.main(["queue", str(_write(tmp_path, GRAPH)), "--server", fake.url, "--header", "no colon here"])
    assert rc == qc.EXIT_USAGE and "expected 'Name: value'" in capsys.readouterr().err
    monkeypatch.delenv("TUNELAB_TEST_TOKEN")
    rc = cli.main(["queue", str(_write(tmp_path, GRAPH)), "--server", fake.url, "--token-env", "TUNELAB_TEST_TOKEN"])
    assert rc == qc.EXIT_USAGE and "empty or not set" in capsys.readouterr().err


def test_client_sets_the_prompt_id(fake, tmp_path):
    result = qc.ComfyClient(fake.url).run(GRAPH, prompt_id="my-id-1", timeout=20)
    assert result.prompt_id == "my-id-1" and list(fake.prompts) == ["my-id-1"]
    assert fake.submissions[0]["prompt_id"] == "my-id-1"


def _midway(fake, action, after=5):
    """Run `action` once the Steps node has reported `after` steps."""
    def watch():
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            with fake.lock:
                started = any(pid in fake.prompts for pid in list(fake.prompts))
            if started and len(fake.requests) and fake.progressed >= after:
                return action()
            time.sleep(0.01)
    t = threading.Thread(target=watch, daemon=True)
    t.start()
    return t


def _counting(fake):
    """Count the Steps node's progress messages on the fake (for _midway)."""
    fake.progressed = 0
    send = fake.send

    def counted(client_id, kind, data):
        if kind == "progress":
            fake.progressed += 1
        return send(client_id, kind, data)
    fake.send = counted


def test_dropped_websocket_reconnects_and_never_queues_twice(tmp_path):
    fake = FakeComfy(step_seconds=0.05)
    _counting(fake)
    try:
        client = qc.ComfyClient(fake.url, backoff=(0.1, 0.5))
        notices = []
        client.on_notice = notices.append
        events = []
        watcher = _midway(fake, fake.drop_sockets)
        result = client.run(STEPS_GRAPH, out_dir=tmp_path, timeout=30, on_event=lambda k, d: events.append((k, d)))
        watcher.join()
        assert result.status == "success" and result.reconnects >= 1 and result.resubmitted == 0
        assert len(fake.submissions) == 1  # the prompt stayed known to the server: no second submission
        ws_connects = [p for _, p in fake.requests if p == "/ws"]
        assert len(ws_connects) >= 2
        assert any("websocket dropped" in n for n in notices) and any("reconnected" in n for n in notices)
        late = [d["value"] for k, d in events if k == "progress" and d["node"] == "1"]
        assert late and late[-1] == 30  # progress kept coming after the reconnection
    finally:
        fake.close()


def test_restarted_server_gets_the_prompt_again_under_the_same_id(tmp_path):
    fake = FakeComfy(step_seconds=0.05)
    _counting(fake)
    try:
        client = qc.ComfyClient(fake.url, backoff=(0.1, 0.5))
        watcher = _midway(fake, fake.restart)
        result = client.run(STEPS_GRAPH, out_dir=tmp_path, timeout=30)
        watcher.join()
        assert result.status == "success" and result.resubmitted == 1
        ids = [b["prompt_id"] for b in fake.submissions]
        assert ids == [result.prompt_id] * 2  # once before the restart, once after: the same id
        assert list(fake.prompts) == [result.prompt_id]  # and the restarted server holds it once
        assert len(result.images) == 2
    finally:
        fake.close()


def test_reports_are_downloaded_and_previews_only_when_asked(fake, tmp_path, capsys):
    graph = {**GRAPH, "5": {"inputs": {}, "class_type": "Report"},
             "6": {"inputs": {"images": ["1", 0]}, "class_type": "PreviewImage"}}
    out = tmp_path / "o"
    rc = cli.main(["queue", str(_write(tmp_path, graph)), "--server", fake.url, "--out", str(out)])
    text = capsys.readouterr().out
    assert rc == 0
    assert sorted(p.name for p in out.iterdir()) == ["report.json", "tunelab_00001_.png", "tunelab_00002_.png"]
    assert (out / "report.json").read_bytes() == FakeComfy.REPORT
    assert "2 image(s) and 1 other file(s)" in text and "2 temporary preview(s) not downloaded" in text
    out2 = tmp_path / "o2"
    assert cli.main(["queue", str(_write(tmp_path, graph)), "--server", fake.url, "--out", str(out2),
                     "--previews"]) == 0
    assert len(list(out2.iterdir())) == 5


def test_progress_lines_every_few_percent(fake, tmp_path, capsys, monkeypatch):
    import functools

    from tunelab.core import progress

    # 60 quick steps: lift the one-line-a-second floor (tests/test_progress.py covers it) to see every 5 %
    monkeypatch.setattr(progress, "RateLog", functools.partial(progress.RateLog, min_interval=0.0))
    graph = {"1": {"inputs": {"n": 60}, "class_type": "Steps", "_meta": {"title": "Work"}}}
    fake.step_seconds = 0.001
    assert cli.main(["queue", str(_write(tmp_path, graph)), "--server", fake.url, "--no-download"]) == 0
    lines = [ln for ln in capsys.readouterr().out.splitlines() if "node 1 (Work):" in ln]
    assert 15 <= len(lines) <= 22, lines
    assert lines[-1].split("] ", 1)[1].startswith("node 1 (Work): 60/60 (100%)")
    assert any("/s" in ln and "ETA" in ln for ln in lines)


def test_tiny_lowers_steps_and_sizes_within_widget_limits():
    graph = {"1": {"class_type": "TuneLabCompare", "inputs": {"steps": 50, "width": 1024, "height": 1000,
                                                               "seed": 42, "guidance": 13.0}},
             "2": {"class_type": "TuneLabWrongImageSynthesis", "inputs": {"steps": 50, "width": 1024, "height": 32}},
             "3": {"class_type": "TuneLabTrainLora", "inputs": {"max_train_steps": 500, "resolution": 1024}},
             "4": {"class_type": "KSampler", "inputs": {"steps": 50}}}
    info = {"TuneLabCompare": {"input": {"required": {"steps": ["INT", {"min": 1}], "width": ["INT", {"min": 64,
                                                                                                     "step": 24}],
                                                      "height": ["INT", {"min": 64, "step": 8}],
                                                      "seed": ["INT", {}], "guidance": ["FLOAT", {}]}}},
            "TuneLabWrongImageSynthesis": {"input": {"required": {"steps": ["INT", {"min": 1}],
                                                                  "width": ["INT", {"min": 64, "step": 8}],
                                                                  "height": ["INT", {"min": 8, "step": 8}]}}},
            "TuneLabTrainLora": {"input": {"required": {"max_train_steps": ["INT", {"min": 1}],
                                                        "resolution": ["INT", {"min": 64, "step": 8}]}}},
            "KSampler": {"input": {"required": {"steps": ["INT", {"min": 1}]}}}}
    out = qc.tiny_sizes(graph, info)
    assert out["1"]["inputs"] == {"steps": 20, "width": 136, "height": 128, "seed": 42, "guidance": 13.0}
    assert out["2"]["inputs"] == {"steps": 4, "width": 64, "height": 32}  # never raised
    assert out["3"]["inputs"] == {"max_train_steps": 2, "resolution": 64}
    assert out["4"]["inputs"] == {"steps": 50}  # not ours: ComfyUI's own models are not swapped either
    assert graph["1"]["inputs"]["steps"] == 50
