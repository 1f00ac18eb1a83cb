"""A headless Chromium driven over the DevTools protocol (CDP), and a ComfyUI server to point it at.

Used by ``tools/workflow_shots.py``; needs only ``websocket-client`` (the pack's ``headless`` extra), a Chromium
binary (Debian: ``apt-get install chromium``) and a ComfyUI checkout. Nothing here downloads a browser.
"""
from __future__ import annotations

import base64
import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--hide-scrollbars", "--mute-audio")


class BrowserError(RuntimeError):
    pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(predicate, timeout: float, what: str, proc=None, log=None):
    deadline = time.monotonic() + timeout
    while True:
        if proc is not None and proc.poll() is not None:
            tail = Path(log).read_text(errors="replace")[-3000:] if log else ""
            raise BrowserError(f"{what}: the process exited with {proc.returncode}\n{tail}")
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise BrowserError(f"{what}: gave up after {timeout:.0f} s")
        time.sleep(0.25)


def _stop(proc, grace: float = 20):
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


@contextlib.contextmanager
def comfyui_server(comfyui: Path, pack: Path, *, front_end_root=None, timeout: float = 300):
    """A ComfyUI server on a free loopback port with `pack` linked through a custom_nodes folder of its own
    (the checkout's custom_nodes is never touched) and temporary output/input/user folders. Yields its URL."""
    comfyui = Path(comfyui).resolve()
    python = comfyui / ".venv" / "bin" / "python"
    python = str(python) if python.is_file() else sys.executable
    with tempfile.TemporaryDirectory(prefix="tunelab-comfy-") as tmp:
        work = Path(tmp)
        for sub in ("output", "temp", "user", "input", "models", "custom_nodes"):
            (work / sub).mkdir()
        (work / "custom_nodes" / "tunelab").symlink_to(Path(pack).resolve(), target_is_directory=True)
        (work / "extra_model_paths.yaml").write_text(
            f"tunelab_shots:\n    base_path: {work / 'models'}\n    custom_nodes: {work / 'custom_nodes'}\n")
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        cmd = [python, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port), "--disable-auto-launch",
               "--output-directory", str(work / "output"), "--temp-directory", str(work / "temp"),
               "--user-directory", str(work / "user"), "--input-directory", str(work / "input"),
               "--database-url", "sqlite:///:memory:", "--extra-model-paths-config",
               str(work / "extra_model_paths.yaml")]
        if front_end_root:
            cmd += ["--front-end-root", str(Path(front_end_root).resolve())]
        log_path = work / "comfyui.log"
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(cmd, cwd=comfyui, stdout=log, stderr=subprocess.STDOUT,
                                    env={**os.environ, "PYTHONUNBUFFERED": "1"})
            try:
                def up():
                    try:
                        with urllib.request.urlopen(url + "/system_stats", timeout=2) as r:
                            return r.status == 200
                    except OSError:
                        return False
                _wait(up, timeout, f"ComfyUI at {url}", proc, log_path)
                yield url
            finally:
                _stop(proc)


class Page:
    """One browser tab over a CDP websocket: evaluate JavaScript, click, take screenshots."""

    def __init__(self, ws_url: str):
        import websocket  # the pack's "headless" extra

        # Chromium refuses websocket clients that send an Origin it was not told to allow
        self._ws = websocket.create_connection(ws_url, timeout=120, suppress_origin=True)
        self._next = 0

    def send(self, method: str, **params):
        self._next += 1
        msg_id = self._next
        self._ws.send(json.dumps({"id": msg_id, "method": method, "params": params}))
        while True:
            msg = json.loads(self._ws.recv())
            if msg.get("id") == msg_id:
                if "error" in msg:
                    raise BrowserError(f"{method}: {msg['error'].get('message')}")
                return msg.get("result") or {}

    def js(self, expression: str, *, timeout: float = 60):
        """The JSON value of a JavaScript expression (promises awaited); a thrown error raises BrowserError."""
        res = self.send("Runtime.evaluate", expression=expression, awaitPromise=True, returnByValue=True,
                        timeout=int(timeout * 1000))
        if "exceptionDetails" in res:
            d = res["exceptionDetails"]
            text = (d.get("exception") or {}).get("description") or d.get("text")
            raise BrowserError(f"page script failed: {text}")
        return (res.get("result") or {}).get("value")

    def wait_js(self, expression: str, timeout: float = 60, what: str = None):
        return _wait(lambda: self.js(expression), timeout, what or expression[:80])

    def viewport(self, width: int, height: int):
        self.send("Emulation.setDeviceMetricsOverride", width=width, height=height, deviceScaleFactor=1,
                  mobile=False)

    def goto(self, url: str):
        self.send("Page.enable")
        self.send("Page.navigate", url=url)

    def click(self, x: float, y: float):
        """A real mouse click at page coordinates (what a user's click sends)."""
        for kind in ("mouseMoved", "mousePressed", "mouseReleased"):
            self.send("Input.dispatchMouseEvent", type=kind, x=x, y=y, button="left", clickCount=1,
                      buttons=0 if kind == "mouseMoved" else 1)

    def screenshot(self, path: Path, *, clip=None, quality: int = 80, scale: float = 1.0):
        """Save the viewport (or `clip` = {x, y, width, height} in page pixels, scaled by `scale`) as JPEG."""
        params = {"format": "jpeg", "quality": quality}
        if clip:
            params["clip"] = {**clip, "scale": scale}
        data = base64.b64decode(self.send("Page.captureScreenshot", **params)["data"])
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_bytes(data)
        os.replace(tmp, path)
        return path

    def close(self):
        self._ws.close()


def find_chromium(explicit=None) -> str:
    for cand in [explicit, os.environ.get("CHROMIUM"), "chromium", "chromium-browser", "google-chrome"]:
        if cand and (shutil.which(cand) or Path(cand).is_file()):
            return shutil.which(cand) or cand
    raise BrowserError("no Chromium found: apt-get install chromium, or pass --chromium PATH")


@contextlib.contextmanager
def chromium(binary=None, *, width: int = 1280, height: int = 800):
    """A headless Chromium with a fresh profile; yields a `Page` on its first tab."""
    binary = find_chromium(binary)
    with tempfile.TemporaryDirectory(prefix="tunelab-chromium-", ignore_cleanup_errors=True) as profile:
        log_path = Path(profile) / "chromium.log"
        with open(log_path, "wb") as log:
            proc = subprocess.Popen([binary, *CHROMIUM_FLAGS, f"--user-data-dir={profile}",
                                     "--remote-debugging-port=0", f"--window-size={width},{height}",
                                     "about:blank"], stdout=log, stderr=subprocess.STDOUT)
            page = None
            try:
                port_file = Path(profile) / "DevToolsActivePort"
                _wait(lambda: port_file.is_file() and port_file.read_text().strip(), 60, "Chromium's debugging port",
                      proc, log_path)
                port = int(port_file.read_text().split()[0])

                def first_tab():
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=5) as r:
                        tabs = [t for t in json.load(r) if t.get("type") == "page"]
                    return tabs[0]["webSocketDebuggerUrl"] if tabs else None
                page = Page(_wait(first_tab, 30, "Chromium's first tab", proc, log_path))
                page.viewport(width, height)
                yield page
            finally:
                if page is not None:
                    page.close()
                _stop(proc, 10)
