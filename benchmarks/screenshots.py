"""Screenshots of what a reviewer sees in the MLflow UI, taken in a real (headless) browser.

    python benchmarks/screenshots.py [OUT_FOLDER]      # default: ./screens

In a temp folder it makes one fit (digits, early stopping that restores an earlier epoch)
and one small sweep (4 trials, registering the best model), starts `mlflow server` on that
store on a free port, and has headless Chromium photograph:

    fit-overview.png       the fit's run page: Overview with its description
    fit-description.png    the same page with the description unfolded ("Show more" clicked)
    fit-artifacts.png      the same run's Artifacts tab on plots/learning_curves.png
    fit-model-metrics.png  the experiment's Models list: named models with their metrics
    sweep-parent.png       the sweep's parent run: Overview with the sweep's description
    sweep-description.png  the same page with the description unfolded
    registered-model.png   the model registry entry the sweep's best trial went to

The server is stopped at the end (also on errors and Ctrl-C). Needs a Chromium on PATH
(Debian: apt-get install chromium); it is a tool for people checking the UI, not a
dependency of convtrain.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

SWEEP = """
[fit]
data = "digits"
limit = 400
epochs = 8
patience = 2
batch_size = 32
experiment = "screens"
[sweep]
name = "digits-lr"
method = "grid"
objective = "val_loss"
register_model = "digits-lr-best"
[space]
filters = [[4], [8]]
lr = [0.3, 0.05]
"""


HOST = "127.0.0.2"


def free_port(host: str = HOST) -> int:
    with socket.socket() as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


def make_runs(folder: Path, uri: str) -> dict:
    """One fit and one sweep in the store at `uri`; returns the ids the pages need."""
    from convtrain import FitConfig, fit
    from convtrain.sweep.launcher import run_sweep

    result = fit(FitConfig(limit=1000, filters=[8, 16], hidden=[32], epochs=40, batch_size=32, patience=4, lr=0.05,
                           experiment="screens", run_name="digits-early-stop", tracking_uri=uri,
                           register_model="digits-net", out=str(folder / "fit")), progress="quiet")
    (folder / "sweep.toml").write_text(SWEEP, encoding="utf-8")
    outcome = run_sweep(folder / "sweep.toml", tracking_uri=uri, quiet=True)
    return {"experiment": result.experiment_id, "fit": result.run_id, "parent": outcome.parent_run_id}


def start_server(folder: Path, uri: str) -> tuple[subprocess.Popen, str]:
    from convtrain.tracking.ui import server_environment

    # 127.0.0.2, not 127.0.0.1: the UI opens its "MLflow Assistant" side panel (a third of the
    # page) on first load when it sees localhost or 127.0.0.1; any 127.x address is still loopback
    port = free_port()
    log = open(folder / "server.log", "wb")
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--host", HOST, "--port", str(port),
                               "--workers", "1", "--backend-store-uri", uri, "--allowed-hosts", f"{HOST}:{port}",
                               "--cors-allowed-origins", f"http://{HOST}:{port}"], cwd=folder, stdout=log,
                              stderr=subprocess.STDOUT, start_new_session=True, env=server_environment())
    base = f"http://{HOST}:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"mlflow server exited early; see {folder / 'server.log'}")
        try:
            with urllib.request.urlopen(f"{base}/health", timeout=2):
                return server, base
        except OSError:
            time.sleep(0.5)
    stop(server)
    raise SystemExit("mlflow server did not answer within 120 s")


def stop(server: subprocess.Popen) -> None:
    if server.poll() is None:
        os.killpg(server.pid, signal.SIGTERM)  # the server and its uvicorn child
        try:
            server.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()


def screenshot(browser: str, url: str, path: Path, profile: Path) -> Path:
    # --no-sandbox: Chromium refuses to run as root otherwise; the page is our own local server.
    # The virtual time budget lets the single-page app fetch its data and render before the shot.
    subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                    f"--user-data-dir={profile}", "--window-size=1400,1000", "--virtual-time-budget=15000",
                    f"--screenshot={path}", url], check=True, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL, timeout=180)
    return path


class DevTools:
    """Just enough of the Chrome DevTools protocol (a WebSocket, stdlib only) to click the
    Overview's "Show more" before the shot, which `--screenshot` alone cannot do."""

    def __init__(self, ws_url: str):
        host_port, path = ws_url[len("ws://"):].split("/", 1)
        host, port = host_port.split(":")
        self.sock = socket.create_connection((host, int(port)), timeout=60)
        key = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall((f"GET /{path} HTTP/1.1\r\nHost: {host_port}\r\nUpgrade: websocket\r\n"
                           f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n").encode())
        answer = b""
        while b"\r\n\r\n" not in answer:
            answer += self.sock.recv(4096)
        if b" 101 " not in answer.split(b"\r\n", 1)[0]:
            raise RuntimeError(f"DevTools refused the WebSocket: {answer[:200]!r}")
        self.buffer = answer.split(b"\r\n\r\n", 1)[1]
        self.next_id = 0

    def _read(self, n: int) -> bytes:
        while len(self.buffer) < n:
            chunk = self.sock.recv(1 << 20)
            if not chunk:
                raise RuntimeError("DevTools closed the connection")
            self.buffer += chunk
        data, self.buffer = self.buffer[:n], self.buffer[n:]
        return data

    def _send(self, text: str) -> None:
        payload = text.encode()
        header = bytes([0x81])  # one final text frame, masked as a client must
        if len(payload) < 126:
            header += bytes([0x80 | len(payload)])
        elif len(payload) < 1 << 16:
            header += bytes([0x80 | 126]) + struct.pack(">H", len(payload))
        else:
            header += bytes([0x80 | 127]) + struct.pack(">Q", len(payload))
        mask = os.urandom(4)
        self.sock.sendall(header + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload)))

    def _message(self) -> dict:
        parts = []
        while True:
            first, second = self._read(2)
            length = second & 0x7F
            if length == 126:
                length = struct.unpack(">H", self._read(2))[0]
            elif length == 127:
                length = struct.unpack(">Q", self._read(8))[0]
            parts.append(self._read(length))
            if first & 0x80:  # the final frame of the message
                return json.loads(b"".join(parts))

    def call(self, method: str, **params) -> dict:
        self.next_id += 1
        self._send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:
            message = self._message()
            if message.get("id") == self.next_id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message.get("result", {})

    def evaluate(self, expression: str):
        return self.call("Runtime.evaluate", expression=expression, returnByValue=True).get("result", {}).get("value")


SHOW_MORE = "Array.from(document.querySelectorAll('button, a, span')).find(e => e.textContent.trim() === 'Show more')"


def unfolded_screenshot(browser: str, url: str, path: Path, profile: Path, height: int = 2000) -> Path:
    """The page at `url` with its description unfolded, `height` pixels tall."""
    port = free_port("127.0.0.1")  # DevTools listens on 127.0.0.1 only
    chrome = subprocess.Popen([browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                               f"--user-data-dir={profile}-devtools", f"--window-size=1400,{height}",
                               f"--remote-debugging-port={port}",
                               "about:blank"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=2) as answer:
                    page = next(t for t in json.load(answer) if t.get("type") == "page" and t.get("url") == "about:blank")
                break
            except (OSError, StopIteration, ValueError):
                if time.monotonic() > deadline:
                    raise RuntimeError("Chromium's DevTools did not answer") from None
                time.sleep(0.5)
        tools = DevTools(page["webSocketDebuggerUrl"])
        tools.call("Page.enable")
        tools.call("Page.navigate", url=url)
        deadline = time.monotonic() + 60
        while not tools.evaluate(f"Boolean({SHOW_MORE})"):
            if time.monotonic() > deadline:
                raise RuntimeError(f"no 'Show more' on {url}")
            time.sleep(0.5)
        tools.evaluate(f"{SHOW_MORE}.click()")
        time.sleep(2)  # the unfolded Markdown renders
        shot = tools.call("Page.captureScreenshot", format="png")
        path.write_bytes(base64.b64decode(shot["data"]))
        return path
    finally:
        os.killpg(chrome.pid, signal.SIGTERM)
        chrome.wait(timeout=15)


def main(out: Path) -> list[Path]:
    browser = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if browser is None:
        raise SystemExit("no Chromium on PATH (Debian: apt-get install chromium)")
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="convtrain-screens-") as tmp:
        folder = Path(tmp)
        os.chdir(folder)  # the sweep's runs/ folder and optuna.db go here
        uri = f"sqlite:///{folder / 'mlflow.db'}"
        ids = make_runs(folder, uri)
        server, base = start_server(folder, uri)
        try:
            run = f"{base}/#/experiments/{ids['experiment']}/runs"
            classic = "?workflowType=machine_learning"  # MLflow 3 opens in its GenAI view otherwise
            pages = {
                "fit-overview.png": f"{run}/{ids['fit']}{classic}",
                "fit-artifacts.png": f"{run}/{ids['fit']}/artifacts/plots/learning_curves.png{classic}",
                "fit-model-metrics.png": f"{base}/#/experiments/{ids['experiment']}/models{classic}",
                "sweep-parent.png": f"{run}/{ids['parent']}{classic}",
                "registered-model.png": f"{base}/#/models/digits-lr-best{classic}",
            }
            shots = [screenshot(browser, url, out / name, folder / "profile") for name, url in pages.items()]
            shots += [unfolded_screenshot(browser, pages[f"{page}-overview.png" if page == "fit" else "sweep-parent.png"],
                                          out / f"{page}-description.png", folder / "profile")
                      for page in ("fit", "sweep")]
        finally:
            stop(server)
    for path in shots:
        print(f"{path}  ({path.stat().st_size // 1024} KB)")
    return shots


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "screens").resolve())
