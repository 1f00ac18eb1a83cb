"""`python -m tunelab queue WORKFLOW`: run an API-format workflow on a running ComfyUI and download its images.

    python -m tunelab queue workflows/api/wrong_lora_compare.json --set 3.seed=7 --out out/
    python -m tunelab queue wf.json --sweep KSampler.cfg=5,7,9 --server 127.0.0.1:8188 --server 127.0.0.1:8189

NODE in NODE.INPUT=VALUE is a node id, a node title or a class type (all nodes of that type). VALUE is JSON when
it parses (42, 7.5, true, ["4", 0]), else text. A NODE.INPUT given several times with --set, or with
--sweep NODE.INPUT=a,b,c, makes a batch (one job per value; several axes multiply), spread over the --server list.
Exit status: 0 success, 1 ComfyUI refused or failed the workflow, 2 bad arguments or file, 3 server unreachable,
4 timeout, 130 interrupted.
"""
from __future__ import annotations

import queue as queue_mod
import sys
import threading
from pathlib import Path


def add_arguments(parser) -> None:
    parser.epilog = ("NODE is a node id, a title or a class type; VALUE is JSON when it parses, else text. Exit status: "
                     "0 success, 1 refused or failed, 2 bad arguments or file, 3 server unreachable, 4 timeout, "
                     "130 interrupted.")
    parser.add_argument("workflow", type=Path, help="an API-format workflow JSON (e.g. workflows/api/NAME.json)")
    parser.add_argument("--server", action="append", metavar="URL",
                        help="ComfyUI server, e.g. http://127.0.0.1:8188 (default); repeat to spread a batch")
    parser.add_argument("--set", action="append", default=[], metavar="NODE.INPUT=VALUE",
                        help="override an input; repeat the same NODE.INPUT to queue one job per value")
    parser.add_argument("--sweep", action="append", default=[], metavar="NODE.INPUT=A,B,C",
                        help="one job per value (comma list or JSON list); several sweeps multiply")
    parser.add_argument("--tiny", action="store_true",
                        help="swap every model choice for the matching built-in tiny preset and lower steps and "
                             "sizes to the tiny defaults (a smoke test of seconds)")
    parser.add_argument("--header", action="append", default=[], metavar="'NAME: VALUE'",
                        help="an HTTP header for every request and the websocket, e.g. 'Authorization: Bearer "
                             "TOKEN' for a ComfyUI behind a proxy; repeat for several")
    parser.add_argument("--token-env", default=None, metavar="VAR",
                        help="send 'Authorization: Bearer $VAR' (keeps the token out of the command line)")
    parser.add_argument("--retry-for", type=float, default=300.0, metavar="S",
                        help="keep reconnecting (and resubmitting a prompt a restarted server lost, under the "
                             "same id) for up to S seconds per outage (default 300)")
    parser.add_argument("--previews", action="store_true",
                        help="also download temporary preview files (PreviewImage); by default only saved outputs")
    parser.add_argument("--out", type=Path, default=Path("queue-output"),
                        help="folder for the downloaded outputs: images, reports, other files the nodes report "
                             "(default ./queue-output)")
    parser.add_argument("--no-download", action="store_true", help="do not download anything")
    parser.add_argument("--timeout", type=float, default=3600.0, metavar="S",
                        help="give up (and cancel the prompt) after S seconds per job (default 3600)")
    parser.add_argument("--quiet", action="store_true", help="print only the outcome of each job")
    parser.add_argument("--traceback", type=int, default=0, metavar="N",
                        help="on a node failure, also print the last N lines of its traceback (default 0: none)")


class _Printer:
    def __init__(self, quiet: bool):
        self.quiet, self.lock = quiet, threading.Lock()

    def __call__(self, text: str, *, err: bool = False, always: bool = False) -> None:
        if self.quiet and not always and not err:
            return
        with self.lock:
            print(text, file=sys.stderr if err else sys.stdout, flush=True)


def _declared_inputs(client, cache: dict):
    def declared(class_type: str):
        if class_type not in cache:
            try:
                info = (client.object_info(class_type) or {}).get(class_type) or {}
            except Exception:
                info = {}
            cache[class_type] = [n for s in ("required", "optional") for n in (info.get("input") or {}).get(s) or {}]
        return cache[class_type]
    return declared


def run(args) -> int:
    from ..core import files
    from ..core import queue_client as qc
    from ..core.checks import check_int, check_number

    # flags first (exit 2): nothing is queued with a bad one
    check_number(args.timeout, "timeout", 0.0, lo_open=True, hint="seconds per job")
    check_int(args.traceback, "traceback", 0, hint="lines of a failed node's traceback; 0: none")
    if not args.no_download:
        files.check_output_dir(args.out, "out")
    say = _Printer(args.quiet)
    try:
        graph = qc.load_api_graph(args.workflow)
        jobs = qc.expand_jobs(args.set, args.sweep)
        headers = _headers(args)
        clients = [qc.ComfyClient(s, headers=headers, retry_for=args.retry_for)
                   for s in (args.server or ["http://127.0.0.1:8188"])]
        qc._websocket_module()
    except qc.QueueError as e:
        say(f"error: {e}", err=True)
        return e.exit_code
    for c in clients:
        try:
            c.system_stats()
        except qc.QueueError as e:
            say(f"error: {e}", err=True)
            return e.exit_code

    try:
        if args.tiny:
            info = clients[0].object_info()
            graph = qc.tiny_sizes(qc.tiny_model_overrides(graph, info), info)
        cache: dict = {}
        graphs = [qc.apply_overrides(graph, job, declared=_declared_inputs(clients[0], cache)) for job in jobs]
    except qc.QueueError as e:
        say(f"error: {e}", err=True)
        return e.exit_code

    total = len(jobs)
    todo: queue_mod.Queue = queue_mod.Queue()
    for i in range(total):
        todo.put(i)
    codes = [None] * total
    in_flight: dict = {}  # job -> (client, prompt_id)
    stop = threading.Event()

    def tag(i, client):
        where = client.server.split("://", 1)[-1]
        return f"[{i + 1}/{total} {where}]" if total > 1 or len(clients) > 1 else f"[{where}]"

    def work(client):
        while not stop.is_set():
            try:
                i = todo.get_nowait()
            except queue_mod.Empty:
                return
            t = tag(i, client)
            label = " ".join(str(o) for o in jobs[i])
            progress = _NodeProgress(say, t, graphs[i])
            client.on_notice = lambda text, t=t: say(f"{t} {text}", err=True)
            try:
                result = client.run(
                    graphs[i], out_dir=None if args.no_download else args.out,
                    prefix=f"job{i + 1}_" if total > 1 else "", timeout=args.timeout, previews=args.previews,
                    on_submit=lambda pid: (in_flight.__setitem__(i, (client, pid)),
                                           say(f"{t} queued prompt {pid}" + (f" ({label})" if label else ""))),
                    on_event=progress,
                    on_warning=lambda text: say(f"{t} warning: {text}", err=True))
            except qc.ExecutionFailed as e:
                codes[i] = e.exit_code
                text = qc.format_execution_error(e.data, args.traceback) if e.data else str(e)
                say(f"{t} error: {text}", err=True)
            except qc.QueueError as e:
                codes[i] = e.exit_code
                say(f"{t} error: {e}", err=True)
            else:
                codes[i] = 0
                say(f"{t} success in {result.seconds:.1f} s: {_outcome(result, args)}", always=True)
            finally:
                in_flight.pop(i, None)

    threads = [threading.Thread(target=work, args=(c,), daemon=True) for c in clients]
    for th in threads:
        th.start()
    try:
        for th in threads:
            while th.is_alive():
                th.join(0.2)
    except KeyboardInterrupt:
        stop.set()
        for client, pid in list(in_flight.values()):
            try:
                client.cancel(pid)
                say(f"cancelled prompt {pid} on {client.server}", err=True)
            except qc.QueueError:
                pass
        say("interrupted", err=True)
        return qc.EXIT_INTERRUPTED

    failed = [c for c in codes if c]
    if total > 1:
        say(f"{total - len(failed)}/{total} job(s) succeeded", always=True)
    return failed[0] if failed else 0


def _headers(args) -> dict:
    import os

    from ..core import queue_client as qc

    headers = dict(qc.parse_header(h) for h in args.header)
    if args.token_env:
        token = os.environ.get(args.token_env, "").strip()
        if not token:
            raise qc.BadWorkflow(f"--token-env {args.token_env}: that environment variable is empty or not set")
        headers["Authorization"] = f"Bearer {token}"
    return headers


def _outcome(result, args) -> str:
    files = result.files
    others = [p for p in files if p not in result.images]
    shown = ", ".join(str(p) for p in files[:4]) + (" ..." if len(files) > 4 else "")
    text = (f"{len(result.images)} image(s)" + (f" and {len(others)} other file(s)" if others else "")
            + f" -> {shown}") if files else "nothing downloaded" if args.no_download else "no output files"
    if result.previews_skipped:
        text += f"; {result.previews_skipped} temporary preview(s) not downloaded (--previews)"
    if result.resubmitted or result.reconnects:
        text += f"; {result.reconnects} reconnect(s), {result.resubmitted} resubmission(s) under the same id"
    return text


class _NodeProgress:
    """Websocket events in words; a node's progress as a line every few percent with the count, rate and ETA
    (core.progress.RateLog), not one line per step."""

    def __init__(self, say, tag, graph):
        from ..core import queue_client as qc
        from ..core.progress import RateLog

        self.say, self.tag, self.graph, self.qc, self.RateLog = say, tag, graph, qc, RateLog
        self.logs: dict = {}

    def __call__(self, kind, data) -> None:
        if kind == "progress":
            node, total = str(data.get("node")), int(data.get("max") or 1)
            log = self.logs.get(node)
            if log is None or log.total != max(total, 1) or int(data.get("value") or 0) < log.last:
                desc = self.qc.describe_event("progress", {**data, "value": 0}, self.graph).rsplit(":", 1)[0]
                log = self.logs[node] = self.RateLog(total, desc, write=lambda line: self.say(f"{self.tag} {line}"))
                log.last = 0
            log.last = int(data.get("value") or 0)
            log.update_to(log.last)
            return
        line = self.qc.describe_event(kind, data, self.graph)
        if line:
            self.say(f"{self.tag} {line}")
