"""Screenshots of what a reviewer sees in the MLflow UI, taken in a real (headless) browser.

    python benchmarks/screenshots.py [OUT_FOLDER]      # default: ./screens

In a temp folder it makes one fit (digits, early stopping that restores an earlier epoch)
and one small sweep (4 trials, registering the best model), starts `mlflow server` on that
store on a free port, and has headless Chromium photograph:

    fit-overview.png       the fit's run page: Overview with its description
    fit-artifacts.png      the same run's Artifacts tab on plots/learning_curves.png
    fit-model-metrics.png  the experiment's Models list: named models with their metrics
    sweep-parent.png       the sweep's parent run: Overview with the sweep's description
    registered-model.png   the model registry entry the sweep's best trial went to

The server is stopped at the end (also on errors and Ctrl-C). Needs a Chromium on PATH
(Debian: apt-get install chromium); it is a tool for people checking the UI, not a
dependency of convtrain.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
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


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind((HOST, 0))
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
        finally:
            stop(server)
    for path in shots:
        print(f"{path}  ({path.stat().st_size // 1024} KB)")
    return shots


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "screens").resolve())
