"""A small client for a running ComfyUI server: submit an API-format graph, follow it, fetch its images.

Uses only ComfyUI's documented routes: ``POST /prompt``, ``GET /ws?clientId=`` (progress), ``GET /history/{id}``,
``GET /queue``, ``GET /view``, ``POST /interrupt``, ``POST /queue`` (delete), ``GET /object_info`` and
``GET /system_stats``. HTTP goes through the standard library; the websocket needs ``websocket-client``
(``pip install tunelab[headless]``). Never imports ComfyUI.

For real deployments: extra headers (``Authorization: Bearer ...`` for a ComfyUI behind a proxy) go with every
request and the websocket handshake. The client chooses the prompt id itself, so a retry is idempotent: when the
websocket drops, it reconnects with backoff under the same client id and follows the same prompt; after an outage
it asks the server whether it still knows the prompt (``/queue``, then ``/history``) and submits it again, with
the same id, only when the server lost it (a restart). A prompt is never queued twice on one server.
"""
from __future__ import annotations

import copy
import itertools
import json
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Mapping, Optional

from .errors import TuneLabError
from .workflow import is_api_format, is_link, is_ui_format

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_UNREACHABLE, EXIT_TIMEOUT, EXIT_INTERRUPTED = 0, 1, 2, 3, 4, 130


class QueueError(TuneLabError):
    exit_code = EXIT_FAILED


class ServerUnreachable(QueueError):
    exit_code = EXIT_UNREACHABLE


class BadWorkflow(QueueError):
    exit_code = EXIT_USAGE


class PromptRejected(QueueError):
    """ComfyUI refused the graph (HTTP 400); `node_errors` is its per-node report."""

    def __init__(self, message: str, error=None, node_errors=None):
        self.error, self.node_errors = error, node_errors or {}
        super().__init__(message)


class ExecutionFailed(QueueError):
    def __init__(self, message: str, data=None):
        self.data = data or {}
        super().__init__(message)


class ExecutionInterrupted(QueueError):
    exit_code = EXIT_INTERRUPTED


class QueueTimeout(QueueError):
    exit_code = EXIT_TIMEOUT


class MissingDependency(QueueError):
    exit_code = EXIT_USAGE


# --------------------------------------------------------------------------------------------------------------
# Graph files and overrides
# --------------------------------------------------------------------------------------------------------------

def load_api_graph(path) -> dict:
    """Read an API-format workflow file; a UI-format file is refused with the reason and where its twin is."""
    p = Path(path)
    try:
        graph = json.loads(p.read_text(encoding="utf-8"))
    except OSError as e:
        raise BadWorkflow(f"cannot read {p}: {e.strerror or e}") from None
    except ValueError as e:
        raise BadWorkflow(f"{p} is not JSON: {e}") from None
    if isinstance(graph, Mapping) and "prompt" in graph and is_api_format(graph.get("prompt")):
        graph = graph["prompt"]  # a saved request body {"prompt": {...}}
    if is_ui_format(graph):
        twin = p.parent / "api" / p.name
        hint = (f"use its API twin {twin}" if twin.is_file() else
                "export it from ComfyUI with Workflow > Export (API), or for the pack's own workflows run "
                "`python -m tunelab workflows` and use workflows/api/")
        raise BadWorkflow(f"{p} is a UI-format workflow (the canvas format with 'nodes' and 'links'); POST /prompt "
                          f"runs the API format ({{node id: {{class_type, inputs}}}}): {hint}")
    if not is_api_format(graph):
        raise BadWorkflow(f"{p} is not an API-format workflow: expected {{node id: {{\"class_type\", \"inputs\"}}}}")
    return graph


def parse_value(text: str, current=None):
    """A --set value: JSON when it parses (numbers, true/false, lists), else the plain text. Where the graph
    holds a string there, the text stays a string unless it is a quoted JSON string."""
    if isinstance(current, str) and not text.startswith('"'):
        return text
    try:
        return json.loads(text)
    except ValueError:
        return text


@dataclass(frozen=True)
class Override:
    node: str       # node id, title or class_type
    input: str
    text: str       # the value as typed; parsed against the graph's current value

    def __str__(self):
        return f"{self.node}.{self.input}={self.text}"


def parse_assignment(text: str) -> Override:
    """``NODE.INPUT=VALUE`` (NODE: a node id, a node title or a class_type; titles may contain dots)."""
    key, sep, value = text.partition("=")
    node, dot, name = key.rpartition(".")
    if not sep or not dot or not node.strip() or not name.strip():
        raise BadWorkflow(f"'{text}' is not NODE.INPUT=VALUE (e.g. 3.seed=42, \"KSampler.steps=20\", "
                          f"TuneLabLoadPipeline.model=tiny-sdxl)")
    return Override(node.strip(), name.strip(), value)


def find_nodes(graph: Mapping, ref: str) -> list:
    """Node ids for a reference: the id itself, else every node with that title, else every node of that class."""
    if ref in graph:
        return [ref]
    for key in (lambda n: (n.get("_meta") or {}).get("title"), lambda n: n.get("class_type")):
        ids = [i for i, n in graph.items() if key(n) == ref]
        if ids:
            return ids
    return []


def apply_overrides(graph: Mapping, overrides: Iterable[Override],
                    declared: Optional[Callable[[str], Iterable[str]]] = None) -> dict:
    """A copy of `graph` with the overrides applied. `declared(class_type)` may name inputs a node accepts
    though the file does not set them (optional inputs)."""
    out = copy.deepcopy(dict(graph))
    for ov in overrides:
        ids = find_nodes(out, ov.node)
        if not ids:
            known = ", ".join(f"{i} ({(n.get('_meta') or {}).get('title') or n['class_type']})" for i, n in out.items())
            raise BadWorkflow(f"--set {ov}: no node with id, title or type '{ov.node}' (nodes: {known})")
        for i in ids:
            inputs = out[i].setdefault("inputs", {})
            if ov.input not in inputs and not (declared and ov.input in set(declared(out[i]["class_type"]))):
                raise BadWorkflow(f"--set {ov}: node {i} ({out[i]['class_type']}) has no input '{ov.input}' "
                                  f"(inputs: {', '.join(inputs) or 'none'})")
            current = inputs.get(ov.input)
            inputs[ov.input] = parse_value(ov.text, None if is_link(current) else current)
    return out


def _sweep_values(text: str) -> list:
    text = text.strip()
    if text.startswith("["):
        try:
            values = json.loads(text)
            if isinstance(values, list) and values:
                return [v if isinstance(v, str) else json.dumps(v) for v in values]
        except ValueError:
            pass
    return [v.strip() for v in text.split(",") if v.strip()]


def expand_jobs(sets: Iterable[str] = (), sweeps: Iterable[str] = ()) -> list:
    """The batch as a list of override lists. A NODE.INPUT given once with --set is fixed; given several times,
    or with --sweep NODE.INPUT=a,b,c (or a JSON list), its values are an axis; several axes multiply."""
    axes: dict = {}
    for s in sets:
        ov = parse_assignment(s)
        axes.setdefault((ov.node, ov.input), []).append(ov)
    for s in sweeps:
        ov = parse_assignment(s)
        values = _sweep_values(ov.text)
        if not values:
            raise BadWorkflow(f"--sweep {s}: no values (give NODE.INPUT=a,b,c)")
        axes.setdefault((ov.node, ov.input), []).extend(Override(ov.node, ov.input, v) for v in values)
    return [list(combo) for combo in itertools.product(*axes.values())] if axes else [[]]


TINY_HINTS = (("tiny-ip2p", ("ip2p", "pix2pix", "instruct")), ("tiny-sdxl-refiner", ("refiner",)),
              ("tiny-sd15", ("v1-5", "v1_5", "sd15", "sd_15", "sd-1", "sd1.", "1.5")), ("tiny-sdxl", ("",)))


def tiny_model_overrides(graph: Mapping, object_info: Mapping) -> dict:
    """A copy of `graph` whose model choices are swapped for the built-in tiny presets, judged from the server's
    own schemas: every combo input offering ``tiny-*`` choices gets the preset matching its current value
    (InstructPix2Pix -> tiny-ip2p, refiner -> tiny-sdxl-refiner, SD1.5 -> tiny-sd15, else tiny-sdxl); a list with a
    single tiny choice, such as the built-in tiny LoRA in a LoRA list, gets that one."""
    out = copy.deepcopy(dict(graph))
    for node in out.values():
        info = object_info.get(node.get("class_type")) or {}
        sections = info.get("input") or {}
        for section in ("required", "optional"):
            for name, entry in (sections.get(section) or {}).items():
                kind = entry[0] if entry else None
                choices = kind if isinstance(kind, list) else (
                    (entry[1] or {}).get("options", []) if kind == "COMBO" and len(entry) > 1 else [])
                presets = [c for c in choices if isinstance(c, str) and c.startswith("tiny-")]
                value = (node.get("inputs") or {}).get(name)
                if not presets or name not in (node.get("inputs") or {}) or is_link(value) or value in presets:
                    continue
                low = str(value).lower()
                for preset, hints in TINY_HINTS:
                    if preset in presets and any(h in low for h in hints):
                        node["inputs"][name] = preset
                        break
                else:
                    if len(presets) == 1:  # e.g. the built-in tiny LoRA in a LoRA list
                        node["inputs"][name] = presets[0]
    return out


# The tiny presets' defaults (the CLI's: compare and generate 20 steps at 128 px, synthesis 4 steps at 64 px,
# training 64 px and a couple of steps), so `queue --tiny` is a smoke test of seconds, not of minutes.
TINY_CAPS = {"steps": 20, "width": 128, "height": 128, "resolution": 64, "max_train_steps": 2,
             "validation_inference_steps": 4, "num_class_images": 2, "class_generation_steps": 4}
TINY_CAPS_BY_CLASS = {"TuneLabWrongImageSynthesis": {"steps": 4, "width": 64, "height": 64}}


def tiny_sizes(graph: Mapping, object_info: Mapping) -> dict:
    """A copy of `graph` whose TuneLab step counts and pixel sizes are lowered to the tiny defaults (`TINY_CAPS`;
    never raised), kept legal for the server's own widget limits (min, step)."""
    out = copy.deepcopy(dict(graph))
    for node in out.values():
        kind = str(node.get("class_type", ""))
        if not kind.startswith("TuneLab"):
            continue
        caps = {**TINY_CAPS, **TINY_CAPS_BY_CLASS.get(kind, {})}
        sections = (object_info.get(kind) or {}).get("input") or {}
        declared = {name: entry for sec in ("required", "optional") for name, entry in (sections.get(sec) or {}).items()}
        inputs = node.get("inputs") or {}
        for name, cap in caps.items():
            value, entry = inputs.get(name), declared.get(name)
            if not entry or entry[0] != "INT" or not isinstance(value, int) or isinstance(value, bool) or value <= cap:
                continue
            opts = entry[1] if len(entry) > 1 and isinstance(entry[1], Mapping) else {}
            lo, step = int(opts.get("min", 0)), int(opts.get("step", 1) or 1)
            target = lo + -(-(max(cap, lo) - lo) // step) * step  # onto the widget's step grid, rounding up
            inputs[name] = min(value, target)
    return out


# --------------------------------------------------------------------------------------------------------------
# Server messages in words
# --------------------------------------------------------------------------------------------------------------

def _short(text, limit=300) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


def format_rejection(body: Mapping, graph: Optional[Mapping] = None) -> str:
    """ComfyUI's 400 answer to POST /prompt ({error, node_errors}) as readable lines."""
    error = body.get("error")
    if isinstance(error, Mapping):
        head = error.get("message") or error.get("type") or "rejected"
        if error.get("details"):
            head += f": {_short(error['details'])}"
    else:
        head = str(error or "rejected")
    lines = [f"ComfyUI refused the workflow: {head}"]
    for node_id, info in (body.get("node_errors") or {}).items():
        title = ((graph or {}).get(node_id, {}).get("_meta") or {}).get("title")
        who = f"node {node_id} ({info.get('class_type', '?')}{', ' + repr(title) if title else ''})"
        for err in info.get("errors") or [{"message": str(info)}]:
            msg = err.get("message", "")
            if err.get("details"):
                msg += f": {_short(err['details'])}"
            lines.append(f"  {who}: {msg}")
    return "\n".join(lines)


def format_execution_error(data: Mapping, traceback_lines: int = 0) -> str:
    msg = (f"node {data.get('node_id')} ({data.get('node_type')}) failed: "
           f"{data.get('exception_type', 'error')}: {_short(data.get('exception_message', ''), 1000)}")
    tb = data.get("traceback") or []
    if traceback_lines and tb:
        msg += "\n" + "".join(tb[-traceback_lines:]).rstrip()
    return msg


def describe_event(kind: str, data: Mapping, graph: Optional[Mapping] = None) -> Optional[str]:
    """A one-line progress report for a websocket message about our prompt, or None for the uninteresting ones."""
    def who(node_id):
        node = (graph or {}).get(str(node_id)) or {}
        title = (node.get("_meta") or {}).get("title") or node.get("class_type")
        return f"node {node_id}" + (f" ({title})" if title else "")

    if kind == "execution_start":
        return "started"
    if kind == "execution_cached" and data.get("nodes"):
        return f"cached: {', '.join(str(n) for n in data['nodes'])}"
    if kind == "executing" and data.get("node") is not None:
        return f"running {who(data['node'])}"
    if kind == "progress":
        return f"{who(data.get('node'))}: {data.get('value')}/{data.get('max')}"
    if kind == "executed":
        images = [i for items in (data.get("output") or {}).values() if isinstance(items, list)
                  for i in items if isinstance(i, Mapping) and "filename" in i]
        return f"{who(data.get('node'))} done" + (f", {len(images)} image(s)" if images else "")
    return None


# --------------------------------------------------------------------------------------------------------------
# The client
# --------------------------------------------------------------------------------------------------------------

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".gif", ".bmp", ".tif", ".tiff")


@dataclass
class RunResult:
    prompt_id: str
    status: str                              # "success"
    outputs: dict = field(default_factory=dict)
    images: list = field(default_factory=list)  # saved local paths of images
    seconds: float = 0.0
    files: list = field(default_factory=list)  # every saved local path (images, reports, LoRA files ...)
    previews_skipped: int = 0                # temporary preview files not downloaded (previews=False)
    resubmitted: int = 0                     # times the prompt was submitted again after the server lost it
    reconnects: int = 0                      # websocket reconnections


def parse_header(text: str) -> tuple:
    """'Name: value' -> (name, value)."""
    name, sep, value = str(text).partition(":")
    if not sep or not name.strip() or any(c in name for c in " \t\r\n") or "\n" in value or "\r" in value:
        raise BadWorkflow(f"--header {text.split(':')[0]!r}...: expected 'Name: value', e.g. "
                          f"'Authorization: Bearer TOKEN'")
    return name.strip(), value.strip()


PREVIEW_IMAGE = 1  # ComfyUI's BinaryEventTypes.PREVIEW_IMAGE
_IMAGE_TYPES = {1: "JPEG", 2: "PNG"}


def parse_preview_frame(raw: bytes) -> Optional[tuple]:
    """(format, image bytes) of a binary /ws frame that is a preview image (4-byte event type 1, 4-byte image type
    1 JPEG / 2 PNG, then the image), else None."""
    if len(raw) < 8 or int.from_bytes(raw[:4], "big") != PREVIEW_IMAGE:
        return None
    kind = _IMAGE_TYPES.get(int.from_bytes(raw[4:8], "big"))
    return (kind, bytes(raw[8:])) if kind else None


def normalize_server(server: str) -> str:
    server = server.strip().rstrip("/")
    if "://" not in server:
        server = "http://" + server
    parsed = urllib.parse.urlparse(server)
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise BadWorkflow(f"--server {server}: expected http://HOST:PORT")
    return server


def _websocket_module():
    try:
        import websocket  # websocket-client
    except ImportError:
        raise MissingDependency("following progress needs the websocket-client package: pip install 'tunelab[headless]' "
                         "(or pip install websocket-client)") from None
    if not hasattr(websocket, "create_connection"):
        raise MissingDependency("the installed 'websocket' module is not websocket-client; pip install websocket-client")
    return websocket


class ComfyClient:
    def __init__(self, server: str = "http://127.0.0.1:8188", *, client_id: Optional[str] = None,
                 http_timeout: float = 30.0, headers: Optional[Mapping] = None, retry_for: float = 300.0,
                 backoff: tuple = (0.5, 15.0)):
        """`headers`: sent with every request and the websocket handshake. `retry_for`: how long (s) to keep
        reconnecting and retrying through one outage before giving up; `backoff`: (first, longest) wait in s."""
        self.server = normalize_server(server)
        self._fixed_id = client_id
        self.client_id = client_id or uuid.uuid4().hex
        self.http_timeout = http_timeout
        self.headers = dict(headers or {})
        self.retry_for = float(retry_for)
        self.backoff = (float(backoff[0]), float(backoff[1]))
        self.on_notice: Optional[Callable[[str], None]] = None  # reconnects, resubmits: one line each
        self.reconnects = 0

    # ---- HTTP -----------------------------------------------------------------------------------------------
    def _request(self, method: str, path: str, body=None, query: Optional[Mapping] = None):
        url = self.server + path + (("?" + urllib.parse.urlencode(query)) if query else "")
        data = None if body is None else json.dumps(body).encode()
        headers = dict(self.headers)
        if data is not None:
            headers["Content-Type"] = "application/json"
        req = urllib.request.Request(url, data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=self.http_timeout) as resp:
                return resp.status, resp.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()
        except (urllib.error.URLError, OSError) as e:
            reason = getattr(e, "reason", e)
            raise ServerUnreachable(
                f"cannot reach ComfyUI at {self.server} ({reason}). Is it running? Start it with "
                f"`python main.py --listen {urllib.parse.urlparse(self.server).hostname} --port "
                f"{urllib.parse.urlparse(self.server).port or 80}` in the ComfyUI folder, or pass --server URL"
            ) from None

    def _json(self, method: str, path: str, body=None, query=None):
        status, raw = self._request(method, path, body, query)
        try:
            payload = json.loads(raw) if raw else None
        except ValueError:
            payload = None
        if status >= 400:
            raise QueueError(f"{method} {path} answered HTTP {status}: {_short(raw.decode('utf-8', 'replace'))}")
        return payload

    def system_stats(self) -> dict:
        return self._json("GET", "/system_stats")

    def object_info(self, class_type: Optional[str] = None) -> dict:
        return self._json("GET", "/object_info" + (f"/{urllib.parse.quote(class_type)}" if class_type else ""))

    def history(self, prompt_id: str) -> dict:
        return (self._json("GET", f"/history/{urllib.parse.quote(prompt_id)}") or {}).get(prompt_id) or {}

    def queue(self) -> dict:
        """{"queue_running": [...], "queue_pending": [...]}; each item is [number, prompt_id, prompt, ...]."""
        return self._json("GET", "/queue") or {}

    def knows(self, prompt_id: str) -> Optional[str]:
        """"queued" (pending or running), "done" (in the history) or None (the server never had it, or lost it in a
        restart). The queue is asked first: ComfyUI moves a finished prompt into the history before it leaves the
        queue, so asking in this order cannot miss one that finishes in between."""
        q = self.queue()
        for item in (q.get("queue_running") or []) + (q.get("queue_pending") or []):
            if isinstance(item, (list, tuple)) and len(item) > 1 and item[1] == prompt_id:
                return "queued"
        return "done" if self.history(prompt_id) else None

    def view(self, filename: str, subfolder: str = "", kind: str = "output") -> bytes:
        status, raw = self._request("GET", "/view", query={"filename": filename, "subfolder": subfolder, "type": kind})
        if status != 200:
            raise QueueError(f"GET /view {filename} answered HTTP {status}")
        return raw

    def interrupt(self, prompt_id: Optional[str] = None) -> None:
        self._request("POST", "/interrupt", {"prompt_id": prompt_id} if prompt_id else {})

    def cancel(self, prompt_id: str) -> None:
        """Stop a prompt of ours: drop it from the queue if it waits, interrupt it if it runs."""
        self._request("POST", "/queue", {"delete": [prompt_id]})
        self.interrupt(prompt_id)

    def submit(self, graph: Mapping, *, prompt_id: Optional[str] = None, extra_data: Optional[Mapping] = None,
               on_warning: Optional[Callable[[str], None]] = None) -> str:
        body = {"prompt": graph, "client_id": self.client_id}
        if prompt_id:
            body["prompt_id"] = prompt_id
        if extra_data:
            body["extra_data"] = extra_data
        status, raw = self._request("POST", "/prompt", body)
        try:
            answer = json.loads(raw) if raw else {}
        except ValueError:
            answer = {}
        if status != 200 or not isinstance(answer, Mapping) or "prompt_id" not in answer:
            if isinstance(answer, Mapping) and ("error" in answer or "node_errors" in answer):
                raise PromptRejected(format_rejection(answer, graph), answer.get("error"), answer.get("node_errors"))
            raise QueueError(f"POST /prompt answered HTTP {status}: {_short(raw.decode('utf-8', 'replace'))}")
        if answer.get("node_errors") and on_warning:  # accepted, but some outputs were dropped as invalid
            on_warning(format_rejection({"error": "some outputs failed validation and will not run",
                                         "node_errors": answer["node_errors"]}, graph).replace("refused", "warned about"))
        return answer["prompt_id"]

    def submit_idempotent(self, graph: Mapping, prompt_id: str, *, deadline: Optional[float] = None,
                          on_warning: Optional[Callable[[str], None]] = None) -> str:
        """POST the graph under our own `prompt_id`, retrying with backoff while the server is unreachable; before
        each retry it asks whether the earlier attempt got through, so the prompt is queued at most once."""
        give_up = time.monotonic() + self.retry_for
        if deadline is not None:
            give_up = min(give_up, deadline)
        wait = self.backoff[0]
        while True:
            try:
                if self.knows(prompt_id):  # an earlier attempt got through (its answer was lost)
                    return prompt_id
                return self.submit(graph, prompt_id=prompt_id, on_warning=on_warning)
            except ServerUnreachable:
                if time.monotonic() + wait > give_up:
                    raise
                self._notice(f"server unreachable; retrying prompt {prompt_id} in {wait:g} s")
                time.sleep(wait)
                wait = min(wait * 2, self.backoff[1])

    def _notice(self, text: str) -> None:
        if self.on_notice:
            self.on_notice(text)

    # ---- websocket ------------------------------------------------------------------------------------------
    def connect(self, *, fresh: bool = True):
        """Open the progress websocket; do this before `submit` so no message is missed.

        Each run gets a fresh client id (unless one was fixed): ComfyUI drops the socket registered under an id
        when an older connection with that id closes, so reusing one could lose a later run's messages. A
        reconnection during a run (`fresh=False`) keeps the id: ComfyUI sends the prompt's messages to it."""
        websocket = _websocket_module()
        if fresh and not self._fixed_id:
            self.client_id = uuid.uuid4().hex
        parsed = urllib.parse.urlparse(self.server)
        scheme = "wss" if parsed.scheme == "https" else "ws"
        url = f"{scheme}://{parsed.netloc}{parsed.path}/ws?clientId={urllib.parse.quote(self.client_id)}"
        try:
            ws = websocket.create_connection(url, timeout=self.http_timeout,
                                             header=[f"{k}: {v}" for k, v in self.headers.items()])
        except (OSError, websocket.WebSocketException) as e:
            raise ServerUnreachable(f"cannot open ComfyUI's websocket at {url} ({e})") from None
        return ws

    def wait(self, ws, prompt_id: str, *, timeout: Optional[float] = None,
             on_event: Optional[Callable[[str, dict], None]] = None, poll: float = 0.5,
             quiet_check: float = 10.0, resubmit: Optional[Callable[[], None]] = None,
             on_preview: Optional[Callable[[str, bytes], None]] = None) -> str:
        """Follow `prompt_id` until it ends; returns "success" or raises ExecutionFailed / ExecutionInterrupted /
        QueueTimeout / ServerUnreachable. Asks /history when the websocket stays silent for `quiet_check` s.

        When the socket drops, it polls /history and reconnects with backoff (same client id). Once the server
        answers again after an outage it asks whether the prompt is still known (`knows`): finished -> its status
        from /history; lost (a restart) -> `resubmit()` submits it again under the same id. An outage longer than
        `retry_for` raises ServerUnreachable. A socket this call opened is closed here. `on_preview(format, image
        bytes)` gets the binary preview frames ("JPEG"/"PNG"), e.g. a training node's validation images while it runs."""
        websocket = _websocket_module()
        deadline = None if timeout is None else time.monotonic() + timeout
        own = None  # a socket this call opened
        if ws is not None:
            ws.settimeout(poll)
        last_news = time.monotonic()
        wait, next_connect = self.backoff[0], 0.0
        outage: Optional[float] = None  # when the current outage began: the server may have lost the prompt
        try:
            while True:
                now = time.monotonic()
                if deadline is not None and now > deadline:
                    raise QueueTimeout(f"prompt {prompt_id} did not finish within {timeout:g} s")
                if ws is None:
                    if now >= next_connect:
                        try:
                            ws = own = self.connect(fresh=False)
                            ws.settimeout(poll)
                            self.reconnects += 1
                            last_news = time.monotonic()
                            self._notice(f"websocket reconnected; following prompt {prompt_id}")
                        except ServerUnreachable:
                            outage = outage or now
                            next_connect, wait = now + wait, min(wait * 2, self.backoff[1])
                    try:
                        done = self._after_outage(prompt_id, resubmit) if outage else \
                            self._status_from_history(prompt_id)
                        outage = None
                        if done:
                            return done
                    except ServerUnreachable:
                        outage = outage or now
                        if now - outage > self.retry_for:
                            raise ServerUnreachable(f"ComfyUI at {self.server} stayed unreachable for more than "
                                                    f"{self.retry_for:g} s while running prompt {prompt_id}") from None
                    if ws is None:
                        time.sleep(poll)
                    continue
                try:
                    raw = ws.recv()
                except websocket.WebSocketTimeoutException:
                    if time.monotonic() - last_news > quiet_check:  # a quiet socket: make sure we missed nothing
                        last_news = time.monotonic()
                        try:
                            done = self._status_from_history(prompt_id)
                            lost = not done and self.knows(prompt_id) is None
                        except ServerUnreachable:
                            done, lost = None, True
                        if done:
                            return done
                        if lost:  # a half-open socket to a server that restarted or went away
                            self._close(ws)
                            ws = own = None
                            outage = outage or time.monotonic()
                    continue
                except (websocket.WebSocketException, OSError):
                    self._close(ws)
                    ws = own = None
                    outage = outage or time.monotonic()
                    next_connect = time.monotonic() + wait
                    self._notice(f"websocket dropped; reconnecting in {wait:g} s")
                    wait = min(wait * 2, self.backoff[1])
                    continue
                wait = self.backoff[0]
                if isinstance(raw, bytes):
                    frame = parse_preview_frame(raw)
                    if frame and on_preview:
                        on_preview(*frame)
                    continue
                if not raw:
                    continue
                try:
                    msg = json.loads(raw)
                except ValueError:
                    continue
                kind, data = msg.get("type"), msg.get("data") or {}
                if data.get("prompt_id") not in (None, prompt_id):
                    continue
                if kind != "status" and data.get("prompt_id") is None:
                    continue
                last_news = time.monotonic()
                if on_event and kind != "status":
                    on_event(kind, data)
                result = self._final(kind, data, prompt_id)
                if result:
                    return result
        finally:
            if own is not None:
                self._close(own)

    def _after_outage(self, prompt_id: str, resubmit) -> Optional[str]:
        """The server answers again: the prompt's final status if it finished, None if it is still queued or
        running; a prompt the server lost is submitted again (same id) through `resubmit`."""
        state = self.knows(prompt_id)
        if state == "done":
            return self._status_from_history(prompt_id)
        if state is None:
            if resubmit is None:
                raise QueueError(f"the server lost prompt {prompt_id} (restarted?) and this call cannot submit it "
                                 "again; run it once more")
            self._notice(f"the server lost prompt {prompt_id} (restarted?); submitting it again under the same id")
            resubmit()
        return None

    @staticmethod
    def _close(ws) -> None:
        try:
            ws.close()
        except Exception:
            pass

    @staticmethod
    def _final(kind, data, prompt_id) -> Optional[str]:
        if kind == "execution_success" or (kind == "executing" and data.get("node") is None
                                           and data.get("prompt_id") == prompt_id):
            return "success"
        if kind == "execution_error":
            raise ExecutionFailed(format_execution_error(data), data)
        if kind == "execution_interrupted":
            raise ExecutionInterrupted(f"prompt {prompt_id} was interrupted at node {data.get('node_id')} "
                                       f"({data.get('node_type')})")
        return None

    def _status_from_history(self, prompt_id) -> Optional[str]:
        entry = self.history(prompt_id)
        status = entry.get("status") or {}
        for kind, data in status.get("messages") or []:
            if kind in ("execution_error", "execution_interrupted"):
                self._final(kind, data, prompt_id)
        if status.get("completed") or status.get("status_str") == "success":
            return "success"
        if status.get("status_str") == "error":
            raise ExecutionFailed(f"prompt {prompt_id} ended with an error (see the ComfyUI log)")
        return None

    # ---- outputs --------------------------------------------------------------------------------------------
    def output_files(self, prompt_id: str, wait: float = 5.0) -> tuple:
        """(outputs, [file descriptors {filename, subfolder, type, node, key}]) from /history: every file a node
        reports, under any output key (images, gifs, audio, and TuneLab's `files`: reports, LoRA copies ...)."""
        end = time.monotonic() + wait
        entry = self.history(prompt_id)
        while not entry.get("outputs") and not entry.get("status") and time.monotonic() < end:  # not recorded yet
            time.sleep(0.2)
            entry = self.history(prompt_id)
        outputs = entry.get("outputs") or {}
        files = []
        for node_id, out in outputs.items():
            for key, items in (out or {}).items():
                if isinstance(items, list):
                    files += [{**i, "node": node_id, "key": key} for i in items
                              if isinstance(i, Mapping) and isinstance(i.get("filename"), str)]
        return outputs, files

    def output_images(self, prompt_id: str, wait: float = 5.0) -> tuple:
        """(outputs, image descriptors): `output_files` limited to image files."""
        outputs, files = self.output_files(prompt_id, wait)
        return outputs, [f for f in files if is_image_name(f["filename"])]

    def download(self, files: Iterable[Mapping], out_dir, prefix: str = "") -> list:
        from .files import atomic_path

        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        saved = []
        for item in files:
            name = Path(str(item["filename"]).replace("\\", "/")).name
            if name in ("", ".", ".."):
                continue
            target = out_dir / f"{prefix}{name}"
            n = 1
            while target.exists() or target in saved:
                target = out_dir / f"{prefix}{Path(name).stem}_{n}{Path(name).suffix}"
                n += 1
            data = self.view(item["filename"], item.get("subfolder", ""), item.get("type", "output"))
            with atomic_path(target) as tmp:
                tmp.write_bytes(data)
            saved.append(target)
        return saved

    def run(self, graph: Mapping, *, out_dir=None, prefix: str = "", timeout: Optional[float] = None,
            on_event: Optional[Callable[[str, dict], None]] = None,
            on_submit: Optional[Callable[[str], None]] = None,
            on_warning: Optional[Callable[[str], None]] = None, previews: bool = False,
            prompt_id: Optional[str] = None,
            on_preview: Optional[Callable[[str, bytes], None]] = None) -> RunResult:
        """Submit under our own prompt id, follow to the end through dropped sockets and restarts (see the module
        docstring), download what the nodes report: images and other files (reports, LoRA copies), but not
        temporary previews (type "temp") unless `previews`. A timeout cancels the prompt before raising."""
        start = time.monotonic()
        prompt_id = prompt_id or str(uuid.uuid4())
        deadline = None if timeout is None else start + timeout
        self.reconnects = 0
        resubmitted = []
        ws = self.connect()
        try:
            self.submit_idempotent(graph, prompt_id, deadline=deadline, on_warning=on_warning)
            if on_submit:
                on_submit(prompt_id)

            def resubmit():
                self.submit_idempotent(graph, prompt_id, deadline=deadline, on_warning=on_warning)
                resubmitted.append(prompt_id)

            try:
                status = self.wait(ws, prompt_id, timeout=timeout, on_event=on_event, resubmit=resubmit,
                                     on_preview=on_preview)
            except QueueTimeout:
                try:
                    self.cancel(prompt_id)
                except QueueError:
                    pass
                raise
        finally:
            self._close(ws)
        outputs, files = self.output_files(prompt_id)
        wanted = [f for f in files if previews or f.get("type", "output") != "temp"]
        saved = self.download(wanted, out_dir, prefix) if out_dir is not None else []
        return RunResult(prompt_id, status, outputs, [p for p in saved if is_image_name(p.name)],
                         time.monotonic() - start, files=saved, previews_skipped=len(files) - len(wanted),
                         resubmitted=len(resubmitted), reconnects=self.reconnects)


def is_image_name(name: str) -> bool:
    return Path(str(name)).suffix.lower() in IMAGE_SUFFIXES
