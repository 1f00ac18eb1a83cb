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
                        help="swap every model choice for the matching built-in tiny preset (a quick smoke test)")
    parser.add_argument("--out", type=Path, default=Path("queue-output"),
                        help="folder for the downloaded images (default ./queue-output)")
    parser.add_argument("--no-download", action="store_true", help="do not download the images")
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
        clients = [qc.ComfyClient(s) for s in (args.server or ["http://127.0.0.1:8188"])]
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
            graph = qc.tiny_model_overrides(graph, clients[0].object_info())
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
            try:
                result = client.run(
                    graphs[i], out_dir=None if args.no_download else args.out,
                    prefix=f"job{i + 1}_" if total > 1 else "", timeout=args.timeout,
                    on_submit=lambda pid: (in_flight.__setitem__(i, (client, pid)),
                                           say(f"{t} queued prompt {pid}" + (f" ({label})" if label else ""))),
                    on_event=lambda kind, data: _report(say, t, qc.describe_event(kind, data, graphs[i])),
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
                shown = ", ".join(str(p) for p in result.images[:4]) + (" ..." if len(result.images) > 4 else "")
                n_out = sum(1 for o in result.outputs.values() for v in (o or {}).values() if isinstance(v, list))
                say(f"{t} success in {result.seconds:.1f} s: "
                    + (f"{len(result.images)} image(s) -> {shown}" if result.images else
                       f"{n_out} output(s), no images downloaded"), always=True)
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


def _report(say, tag, line):
    if line:
        say(f"{tag} {line}")
