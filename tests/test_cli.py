"""The `convtrain` command line: help, config resolution, one-line errors, evaluate, predict, info.

Everything runs in-process through typer's CliRunner with a fixed terminal width; fits are
tiny (a few hundred digits, one small conv block) and untracked unless the test is about
tracking (see test_tracking.py).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys

import numpy as np
import pytest

from convtrain.cli import app
from convtrain.config import FIELD_TYPES, FitConfig, tomllib
from tests.support.cli import invoke

pytestmark = pytest.mark.usefixtures("in_tmp_cwd")

TINY = ["--limit", "300", "--filters", "4", "--epochs", "1", "--batch-size", "32", "--no-track"]


def assert_one_line_error(result, *fragments, exit_code=None):
    assert result.exit_code != 0
    if exit_code is not None:
        assert result.exit_code == exit_code
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    for fragment in fragments:
        assert fragment in lines[0]
    assert "Traceback" not in result.output


# ---- help and start-up --------------------------------------------------------------------------


FREEZE_PROBE = """
import gc, sys
from convtrain.cli import main
sys.argv = ["convtrain"] + sys.argv[1:]
try:
    main()
finally:
    print(gc.get_freeze_count() > 0, file=sys.stderr)
"""


@pytest.mark.parametrize("args", [["--version"], ["fit", "--epochs", "0"]])
def test_the_command_leaves_its_objects_out_of_the_exit_garbage_collections(args):
    """Whether it succeeds or fails, the command freezes what it made before Python tears it down
    (those collections took 0.6 s after a tracked fit had printed its last line)."""
    done = subprocess.run([sys.executable, "-c", FREEZE_PROBE, *args], capture_output=True, text=True, timeout=120)
    assert done.stderr.strip().splitlines()[-1] == "True", done.stderr

def test_help_lists_every_command():
    result = invoke("--help")
    assert result.exit_code == 0
    for command in ("fit", "evaluate", "predict", "info", "ui", "sweep"):
        assert command in result.output


def test_fit_help_has_a_flag_for_every_config_field():
    result = invoke("fit", "--help")
    assert result.exit_code == 0
    for name in FIELD_TYPES:
        if name == "track":
            assert "--no-track" in result.output
        else:
            assert "--" + name.replace("_", "-") in result.output, name
    for flag in ("--config", "--print-config", "--resume", "--quiet"):
        assert flag in result.output
    assert f"(default: {FitConfig().epochs})" in result.output  # defaults come from FitConfig
    # every setting's flag shows its default
    assert result.output.count("(default:") == len(FIELD_TYPES)
    assert "--debug" in invoke("--help").output  # one option of the app, for every command


def test_fit_flags_keep_their_spellings():
    result = invoke("fit", "--filters", "8,16", "--kernel-sizes", "5x3", "--padding", "same", "--no-track",
                    "--nesterov", "--balanced", "--n-s", "40", "--schedule", "cyclic", "--cycles", "2",
                    "--val-fraction", "0.2", "--data-path", "x.npz", "--data", "npz", "--conv-algo", "im2col",
                    "--print-config")
    # the npz file does not exist: --print-config still prints, saying the length it could count
    assert result.exit_code == 0, result.output
    printed = FitConfig.from_dict(tomllib.loads(result.stdout))
    # the template flags, printed as the layer list they expand to
    expected = FitConfig(filters=[8, 16], kernel_sizes=[[5, 3]], padding=["same"]).network_layers()
    assert printed.layers == expected and printed.layers[0]["kernel"] == [5, 3]
    assert (printed.track, printed.nesterov, printed.balanced) == (False, True, True)
    assert (printed.n_s, printed.schedule, printed.cycles, printed.val_fraction) == (40, "cyclic", 2, 0.2)
    assert printed.conv_algo == "im2col"
    assert "# length: cyclic schedule: 2 cycles x 2 x 40 = 160 updates" in result.stdout
    assert "x.npz" in result.stdout.splitlines()[0]


def test_version():
    from convtrain import __version__

    result = invoke("--version")
    assert result.exit_code == 0
    assert result.stdout.strip() == f"convtrain {__version__}"


def test_sweep_command_is_registered():
    result = invoke("sweep", "--help")
    assert result.exit_code == 0
    assert "--workers" in result.output


def test_importing_the_cli_loads_neither_mlflow_nor_numpy():
    imports = subprocess.run([sys.executable, "-X", "importtime", "-c", "import convtrain.cli"],
                             capture_output=True, text=True, check=True).stderr
    loaded = {line.split("|")[-1].strip().split(".")[0] for line in imports.splitlines() if "|" in line}
    assert not loaded & {"mlflow", "numpy", "optuna", "matplotlib", "sklearn"}


def test_info_reports_version_and_build():
    result = invoke("info")
    assert result.exit_code == 0, result.output
    for key in ("convtrain", "openmp", "num threads", "blas", "tracking store"):
        assert key in result.output


# ---- configs and errors ----------------------------------------------------------------------------

def test_print_config_resolves_file_then_flags(tmp_path):
    (tmp_path / "fit.toml").write_text("[optim]\nepochs = 7\nlr = 0.01\n[model]\nfilters = [8]\n")
    result = invoke("fit", "--config", "fit.toml", "--lr", "0.2", "--kernel-sizes", "5x3", "--print-config")
    assert result.exit_code == 0, result.output
    printed = FitConfig.from_dict(tomllib.loads(result.stdout))
    assert (printed.epochs, printed.lr) == (7, 0.2)
    # the network as the layer list the template options expand to
    assert printed.layers[0] == {"type": "conv", "filters": 8, "kernel": [5, 3]}
    assert printed.network_layers() == FitConfig(filters=[8], kernel_sizes=[[5, 3]]).network_layers()
    assert not (tmp_path / "runs").exists() and not (tmp_path / "mlflow.db").exists()


@pytest.mark.parametrize("args, fragments, code", [
    (["fit", "--epochs", "x"], ["--epochs", "fit --help"], 2),
    (["fit", "--epoch", "3"], ["--epoch", "--epochs"], 2),
    (["fit", "--lr", "-1"], ["lr", "-1.0"], 2),
    (["fit", "--filters", "16,zero"], ["filters", "zero"], 2),
    (["fit", "--data", "imagenet"], ["imagenet", "digits"], 2),
    (["fit", "--data", "mnist"], ["--data-path"], 2),
    (["fit", "--data", "mnist", "--data-path", "no/such/dir"], ["no/such/dir"], 1),
    (["fit", "--batch-size", "5000", "--no-track"], ["batch_size", "5000"], 2),
    (["fit", "--filters", "4", "--kernel-sizes", "9", "--no-track"], ["kernel"], 2),
    (["fit", "--conv-algo", "fft"], ["conv_algo", "fft", "winograd"], 2),
    (["fit", "--conv-algo", "winograd", "--kernel-sizes", "5", "--no-track"], ["conv_algo", "3x3"], 2),
    (["fit", "--config", "missing.toml"], ["missing.toml", "not found"], 2),
    (["fit", "--resume", "nowhere"], ["nowhere"], 1),
    (["evaluate", "missing.npz"], ["missing.npz"], 1),
    (["nosuchcommand"], ["nosuchcommand"], 2),
])
def test_bad_input_gives_one_line_and_no_traceback(args, fragments, code, tmp_path):
    result = invoke(*args)
    assert_one_line_error(result, *fragments, exit_code=code)
    assert not (tmp_path / "runs").exists()


def test_unknown_config_key_suggests_the_close_name(tmp_path):
    (tmp_path / "fit.toml").write_text("epoch = 3\n")
    assert_one_line_error(invoke("fit", "--config", "fit.toml"), "epoch", "did you mean 'epochs'")


@pytest.mark.parametrize("args", [["--debug", "fit", "--lr", "-1"], ["fit", "--lr", "-1", "--debug"]])
def test_debug_adds_the_traceback_and_keeps_the_exit_code(args):
    plain = invoke("fit", "--lr", "-1")
    result = invoke(*args)
    assert result.exit_code == plain.exit_code == 2
    assert "Traceback" in result.stderr and "ConfigError" in result.stderr
    assert result.stderr.strip().splitlines()[-1] == plain.stderr.strip()


def test_existing_checkpoint_in_out_is_not_overwritten(tmp_path):
    assert invoke("fit", *TINY, "--out", "model").exit_code == 0
    before = (tmp_path / "model" / "checkpoint.npz").read_bytes()
    assert_one_line_error(invoke("fit", *TINY, "--out", "model"), "--resume")
    assert (tmp_path / "model" / "checkpoint.npz").read_bytes() == before


# ---- fit, evaluate, predict without tracking ------------------------------------------------------------

@pytest.fixture
def digits_model(tmp_path):
    result = invoke("fit", *TINY, "--out", "model")
    assert result.exit_code == 0, result.output
    return tmp_path / "model"


def test_untracked_fit_writes_model_checkpoint_config_and_plots(digits_model, tmp_path):
    for name in ("model.npz", "checkpoint.npz", "config.toml", "plots/learning_curves.png",
                 "plots/confusion_matrix.png", "plots/filters_conv1.png"):
        assert (digits_model / name).is_file(), name
    assert not (tmp_path / "mlflow.db").exists()
    saved = FitConfig.from_toml(digits_model / "config.toml")
    assert (saved.limit, saved.filters, saved.track) == (300, [4], False)


def test_fit_output_is_plain_in_a_non_terminal(tmp_path):
    result = invoke("fit", *TINY, "--epochs", "2", "--out", "plain")
    assert result.exit_code == 0, result.output
    assert "\x1b[" not in result.output and "\r" not in result.output
    epoch_lines = [line for line in result.stdout.splitlines() if re.match(r"epoch \d/2 ", line)]
    assert len(epoch_lines) == 2 and "val loss" in epoch_lines[0] and "img/s" in epoch_lines[0]
    assert "training history" in result.stdout


def test_timings_print_where_the_wall_time_went(tmp_path):
    result = invoke("fit", *TINY, "--quiet", "--timings", "--out", "timed")
    assert result.exit_code == 0, result.output
    lines = result.stdout.split("where the time went (wall clock)\n", 1)[1].splitlines()
    seconds = {line.split()[0] if not line.startswith("model") else "model logging":
               float(line.split(" s")[0].split()[-1]) for line in lines if " s" in line}
    phases = ["start-up", "data", "store", "training", "evaluation", "plots", "model logging", "other", "total"]
    assert list(seconds) == phases, lines
    assert seconds["total"] == pytest.approx(sum(seconds[p] for p in phases[:-1]), abs=0.06)
    assert "where the time went" not in invoke("fit", *TINY, "--quiet", "--out", "untimed").stdout


def test_quiet_prints_only_the_summary():
    result = invoke("fit", *TINY, "--quiet", "--out", "quiet")
    assert result.exit_code == 0, result.output
    assert not [line for line in result.stdout.splitlines() if re.match(r"epoch \d", line)]
    assert "training history" in result.stdout and "model" in result.stdout


def test_evaluate_prints_metrics_per_class_table_and_confusion(digits_model):
    result = invoke("evaluate", digits_model / "model.npz")
    assert result.exit_code == 0, result.output
    for text in ("digits val split", "accuracy", "balanced accuracy", "per class", "confusion matrix"):
        assert text in result.output
    report = json.loads(invoke("evaluate", digits_model / "model.npz", "--json").stdout)
    assert report["split"] == "val" and report["count"] > 0
    assert np.array(report["confusion"]).sum() == report["count"]
    assert 0.0 <= report["balanced_accuracy"] <= 1.0


def test_predict_npz_and_image_file_match_the_network(digits_model, tmp_path):
    from PIL import Image

    from convtrain.data import load_dataset
    from convtrain.nn.network import Network

    images = load_dataset("digits").x_val[:3]
    np.savez(tmp_path / "three.npz", x=images)
    Image.fromarray((images[0, 0] * 255 / 16).astype(np.uint8)).resize((32, 32)).save(tmp_path / "digit.png")

    result = invoke("predict", digits_model / "model.npz", "three.npz", "--json")
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    expected = Network.load(digits_model / "model.npz").predict_proba(images)
    assert [row["input"] for row in rows] == ["three.npz[0]", "three.npz[1]", "three.npz[2]"]
    for row, probabilities in zip(rows, expected):
        assert list(row["probabilities"].values()) == pytest.approx(probabilities.tolist(), abs=1e-6)

    result = invoke("predict", digits_model / "model.npz", "digit.png", "--top", "2")
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("digit.png: ")
    assert_one_line_error(invoke("predict", digits_model / "model.npz", "nothing.png"), "nothing.png")


def _write_names(folder):
    folder.mkdir()
    stems = {"Japanese": ["tanaka", "suzuki", "takahashi", "watanabe", "yamamoto", "nakamura", "kobayashi",
                          "kato", "yoshida", "yamada", "sasaki", "matsumoto"],
             "German": ["schmidt", "schneider", "fischer", "weber", "meyer", "wagner", "becker", "schulz",
                        "hoffmann", "koch", "richter", "wolf"]}
    for language, names in stems.items():
        (folder / f"{language}.txt").write_text("\n".join(names * 3) + "\n", encoding="utf-8")


def test_names_model_predicts_names_given_inline_or_in_a_file(tmp_path):
    _write_names(tmp_path / "names")
    result = invoke("fit", "--data", "names", "--data-path", "names", "--filters", "6",
                    "--kernel-sizes", "5", "--epochs", "3", "--batch-size", "8", "--no-track", "--out", "names-model")
    assert result.exit_code == 0, result.output
    (tmp_path / "query.txt").write_text("Tanaka\nSchmidt\n")
    result = invoke("predict", "names-model/model.npz", "query.txt", "Yamada", "--json")
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert [row["input"] for row in rows] == ["Tanaka", "Schmidt", "Yamada"]
    assert all(set(row["probabilities"]) == {"German", "Japanese"} for row in rows)


def test_evaluate_and_predict_take_the_run_folder(digits_model, tmp_path):
    by_file = json.loads(invoke("evaluate", digits_model / "model.npz", "--json").stdout)
    by_folder = invoke("evaluate", digits_model, "--json")
    assert by_folder.exit_code == 0, by_folder.output
    report = json.loads(by_folder.stdout)
    assert report["model"] == str(digits_model / "model.npz")
    assert {k: v for k, v in report.items() if k != "model"} == {k: v for k, v in by_file.items() if k != "model"}
    # a fit stopped before it saved its model: the folder's checkpoint
    (digits_model / "model.npz").unlink()
    assert json.loads(invoke("evaluate", digits_model, "--json").stdout)["model"] == str(digits_model / "checkpoint.npz")
    (tmp_path / "empty").mkdir()
    assert_one_line_error(invoke("evaluate", tmp_path / "empty"), "model.npz", "checkpoint.npz", exit_code=1)
    x = np.zeros((1, 1, 8, 8), np.float32)
    np.savez(tmp_path / "x.npz", x=x)
    assert invoke("predict", digits_model, tmp_path / "x.npz").exit_code == 0


def test_a_resumed_fit_says_so_first(tmp_path):
    assert invoke("fit", *TINY, "--out", "run").exit_code == 0
    result = invoke("fit", "--resume", "run", "--epochs", "2", "--no-track")
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines()[0] == "resuming the fit at epoch 2/2 from run/checkpoint.npz"


def test_every_option_of_every_command_shows_its_default():
    import typer.main

    group = typer.main.get_command(app)
    commands = {"convtrain": group, **{f"convtrain {name}": command for name, command in group.commands.items()}}
    missing = []
    for name, command in commands.items():
        for param in command.params:
            if param.param_type_name != "option" or param.name in ("help", "version"):
                continue
            shown = (param.show_default is True and param.default not in (None, False)) or isinstance(
                param.show_default, str)
            if not shown and "(default:" not in (param.help or ""):
                missing.append(f"{name} {param.opts[0]}")
    assert not missing, missing
    assert "[default: (off)]" in invoke("fit", "--help", env={"COLUMNS": "200"}).output


def test_ui_refuses_an_unknown_experiment_and_lists_the_known_ones(tmp_path):
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    for name in ("digits", "names"):
        client.create_experiment(name)
    result = invoke("ui", "--experiment", "digts", "--port", "1")
    assert_one_line_error(result, "no experiment 'digts'", "digits, names", exit_code=2)
    assert "Default" in result.stderr  # MLflow's own experiment is listed too


def test_ui_without_an_experiment_opens_convtrain_or_the_list(tmp_path):
    import mlflow

    from convtrain.tracking.ui import experiment_to_open

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = mlflow.MlflowClient(uri)
    client.create_experiment("digits")
    assert experiment_to_open(uri, None) is None  # the experiment list
    made = client.create_experiment("convtrain")
    assert experiment_to_open(uri, None) == made
    assert experiment_to_open(uri, "digits") == client.get_experiment_by_name("digits").experiment_id


# ---- layer lists ------------------------------------------------------------------------------------

RESNET_TOML = """
[model]
[[model.layers]]
type = "conv"
filters = 8
padding = "same"
bias = false
[[model.layers]]
type = "batch_norm"
[[model.layers]]
type = "relu"
[[model.layers]]
type = "residual"
layers = [
    {type = "conv", filters = 8, padding = "same", bias = false},
    {type = "batch_norm"},
    {type = "relu"},
    {type = "conv", filters = 8, padding = "same", bias = false},
    {type = "batch_norm"},
]
[[model.layers]]
type = "global_avg_pool"
[[model.layers]]
type = "dropout"
p = 0.2
"""


def test_a_toml_layer_list_trains_and_its_model_keeps_the_list(tmp_path):
    (tmp_path / "resnet.toml").write_text(RESNET_TOML)
    result = invoke("fit", "--config", "resnet.toml", *[a for a in TINY if a not in ("--filters", "4")],
                    "--out", "resnet", "--quiet")
    assert result.exit_code == 0, result.output
    from convtrain.nn.network import Network

    network = Network.load(tmp_path / "resnet" / "model.npz")
    assert network.architecture["layers"][3]["type"] == "residual"
    assert "res1.bn2.running_var" in network.buffers()
    assert invoke("evaluate", tmp_path / "resnet" / "model.npz").exit_code == 0


@pytest.mark.parametrize("layers, fragments", [
    ('[{type = "convolution", filters = 8}]', ["layers[0]", "unknown layer type 'convolution'", "residual"]),
    ('[{type = "conv", filter = 8}]', ["conv1", "unknown setting 'filter'", "filters"]),
    ('[{type = "dropout"}]', ["dropout", "needs 'p'"]),
    ('[{type = "conv", filters = 4, kernel = 11}, {type = "flatten"}]', ["conv1", "11x11", "does not fit"]),
    ('[{type = "flatten"}, {type = "conv", filters = 4}]', ["conv1", "needs a CxHxW input"]),
    ('[{type = "conv", filters = 4}]', ["conv1", "ends with a 4x6x6 output", "flatten"]),
    ('[{type = "residual", shortcut = "identity", layers = [{type = "conv", filters = 4, padding = 1}]}, '
     '{type = "flatten"}]', ["res1", "4x8x8", "1x8x8", "can't be added"]),
    ('[{type = "residual", layers = [{type = "conv", filters = 4, stride = 3, padding = 5}]}, '
     '{type = "flatten"}]', ["res1", "can't be added"]),
])
def test_a_bad_layer_spec_gives_one_line_naming_the_layer(layers, fragments, tmp_path):
    result = invoke("fit", "--layers", layers, "--limit", "100", "--epochs", "1", "--no-track")
    assert_one_line_error(result, *fragments, exit_code=2)
    assert not (tmp_path / "runs").exists()


def test_template_options_beside_a_layer_list_are_refused():
    result = invoke("fit", "--layers", '[{type = "flatten"}]', "--filters", "8", "--print-config")
    assert_one_line_error(result, "filters", "layer list", exit_code=2)


def test_a_model_file_with_the_template_description_still_evaluates(digits_model, tmp_path):
    """Model files written before the layer list describe the template ("blocks", "hidden")."""
    from convtrain.nn.npz_files import json_entry, read_npz

    arrays = read_npz(digits_model / "model.npz", "model")
    layers = json.loads(str(arrays["architecture"]))["layers"]
    convs = [spec for spec in layers if spec["type"] == "conv"]
    old = {"input_shape": [1, 8, 8], "num_classes": 10, "dtype": "float32", "hidden": [],
           "blocks": [{"filters": spec["filters"], "kernel_size": [3, 3], "stride": [1, 1], "padding": 0, "pool": 0}
                      for spec in convs]}
    arrays["architecture"] = json_entry(old)
    np.savez(tmp_path / "old-model.npz", **arrays)
    new = invoke("evaluate", digits_model / "model.npz", "--json")
    result = invoke("evaluate", tmp_path / "old-model.npz", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["accuracy"] == json.loads(new.stdout)["accuracy"]
