"""No MLflow INFO lines in the user's terminal: API fits and resumes log quietly, warnings still show."""

import logging
import os
import subprocess
import sys

from convtrain.tracking.quiet import quiet_mlflow_info


class Collect(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.records = []

    def emit(self, record):
        self.records.append((record.levelname, record.getMessage()))


def test_info_is_dropped_warnings_pass_and_the_level_comes_back(monkeypatch):
    import mlflow  # noqa: F401  (sets MLflow's loggers up)

    monkeypatch.delenv("MLFLOW_LOGGING_LEVEL", raising=False)
    logger = logging.getLogger("mlflow")
    before = logger.level
    monkeypatch.setattr(logger, "level", logging.INFO)
    collect = Collect()
    logger.addHandler(collect)
    try:
        with quiet_mlflow_info():
            logging.getLogger("mlflow.pyfunc").info("Validating input example against model signature")
            logging.getLogger("mlflow.pyfunc").warning("a warning the user needs")
        logging.getLogger("mlflow.pyfunc").info("after")
        # the user's own level is theirs
        monkeypatch.setenv("MLFLOW_LOGGING_LEVEL", "INFO")
        with quiet_mlflow_info():
            logging.getLogger("mlflow.store").info("asked for")
    finally:
        logger.removeHandler(collect)
        logger.setLevel(before)
    assert collect.records == [("WARNING", "a warning the user needs"), ("INFO", "after"), ("INFO", "asked for")]


def test_an_api_fit_and_its_resume_print_no_mlflow_info(tmp_path):
    script = (
        "from convtrain import FitConfig, fit\n"
        "config = FitConfig(epochs=1, limit=300, filters=[4], batch_size=32)\n"
        "first = fit(config, progress='none')\n"
        "fit(config.with_overrides({'epochs': 2}), progress='none', resume=first.out_dir)\n"
        "fit(config.with_overrides({'epochs': 2}), progress='none', resume=first.run_id)\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_LOGGING_LEVEL", "MLFLOW_TRACKING_URI")}
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "mlflow.db").is_file()
    assert " INFO mlflow" not in result.stderr, result.stderr
    assert "Validating input example" not in result.stderr + result.stdout


def test_the_cli_resuming_by_run_id_prints_no_mlflow_info(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_LOGGING_LEVEL", "MLFLOW_TRACKING_URI")}
    env["COLUMNS"] = "120"
    tiny = ["--limit", "300", "--filters", "4", "--batch-size", "32"]

    def convtrain(*args):
        result = subprocess.run([sys.executable, "-m", "convtrain", *args], cwd=tmp_path, env=env,
                                capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stderr
        assert " INFO " not in result.stderr and "Validating input example" not in result.stdout, result.stderr
        return result

    first = convtrain("fit", *tiny, "--epochs", "1")
    run_id = next(line.split()[2] for line in first.stdout.splitlines() if line.startswith("mlflow run"))
    resumed = convtrain("fit", "--resume", run_id, "--epochs", "2")
    assert resumed.stdout.startswith("resuming run ")
