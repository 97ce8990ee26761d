"""Settings that decide the same thing: a value the user chose (flag or config file) that another
setting would override fails with one line naming both; defaults give way silently; the length
a fit trains is said before it starts. Through FitConfig.check_settings and the CLI."""

from __future__ import annotations

import math
import re

import pytest

from convtrain.config import FLAG, FitConfig, tomllib
from convtrain.errors import ConfigError
from tests.support.cli import invoke

pytestmark = pytest.mark.usefixtures("in_tmp_cwd")

TINY = ["--limit", "300", "--filters", "4", "--batch-size", "32", "--no-track"]
CYCLIC = {"schedule": "cyclic", "cycles": 3, "n_s": 800}


def one_error_line(result) -> str:
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


def write_cifar_like_config(tmp_path):
    (tmp_path / "fit.toml").write_text('[optim]\nschedule = "cyclic"\nn_s = 800\ncycles = 3\n')


# ---- epochs vs a cyclic schedule's cycles ------------------------------------------------------

def test_epochs_flag_against_cycles_from_the_file_names_both():
    config = FitConfig(epochs=1, **CYCLIC)
    with pytest.raises(ConfigError) as info:
        config.check_settings({"epochs": FLAG, "cycles": "fit.toml", "schedule": "fit.toml", "n_s": "fit.toml"})
    message = str(info.value)
    for fragment in ("--epochs 1", "cycles = 3 (fit.toml)", "3 cycles x 2 x 800 = 4800 updates", "--cycles",
                     "--schedule constant"):
        assert fragment in message


def test_epochs_through_the_cli(tmp_path):
    write_cifar_like_config(tmp_path)
    line = one_error_line(invoke("fit", "--config", "fit.toml", "--epochs", "1", "--print-config"))
    assert "--epochs 1" in line and "cycles = 3 (fit.toml)" in line
    both_flags = one_error_line(invoke("fit", "--schedule", "cyclic", "--cycles", "2", "--epochs", "4"))
    assert "--epochs 4" in both_flags and "--cycles 2" in both_flags
    assert not (tmp_path / "runs").exists()


def test_default_epochs_give_way_to_cycles(tmp_path):
    FitConfig(**CYCLIC).check_settings({"schedule": FLAG, "cycles": FLAG})
    write_cifar_like_config(tmp_path)
    assert invoke("fit", "--config", "fit.toml", "--print-config").exit_code == 0


def test_a_written_config_with_every_key_can_be_passed_back(tmp_path):
    # config.toml / best.toml spell out every setting, epochs at its default among them
    FitConfig(**CYCLIC).save_toml(tmp_path / "written.toml")
    result = invoke("fit", "--config", "written.toml", "--print-config")
    assert result.exit_code == 0, result.output
    # but a file value that differs from the default is the user's choice
    FitConfig(epochs=FitConfig().epochs + 1, **CYCLIC).save_toml(tmp_path / "edited.toml")
    assert "epochs = " in one_error_line(invoke("fit", "--config", "edited.toml", "--print-config"))


# ---- a schedule setting for another schedule ---------------------------------------------------

@pytest.mark.parametrize("name, value, schedule", [
    ("n_s", 50, "cosine"), ("cycles", 2, "constant"), ("lr", 0.1, "cyclic"), ("step_epochs", 3, "cosine"),
    ("gamma", 0.5, "constant"), ("eta_min", 0.001, "step"), ("eta_max", 0.2, "cosine"),
])
def test_a_schedule_flag_the_schedule_does_not_use(name, value, schedule):
    config = FitConfig(schedule=schedule, **{name: value})
    with pytest.raises(ConfigError, match=f"is not used by schedule = {schedule}"):
        config.check_settings({name: FLAG})
    config.check_settings({name: "file.toml"})  # a written config spells out every schedule's settings
    flag = "--" + name.replace("_", "-")
    line = one_error_line(invoke("fit", flag, value, "--schedule", schedule))
    assert f"{flag} {value}" in line and f"--schedule {schedule}" in line


# ---- a step schedule that never drops ------------------------------------------------------------

def test_step_schedule_longer_than_the_fit():
    config = FitConfig(schedule="step", epochs=5, step_epochs=10)
    with pytest.raises(ConfigError, match="never lowers the learning rate"):
        config.check_settings({"schedule": FLAG, "epochs": FLAG})
    FitConfig(schedule="step", epochs=12, step_epochs=10).check_settings({"schedule": FLAG})
    line = one_error_line(invoke("fit", "--schedule", "step", "--epochs", "5"))
    assert "step_epochs = 10 (default)" in line and "--epochs 5" in line and "--step-epochs below 5" in line


# ---- early stopping and the monitor without a validation split ---------------------------------

@pytest.mark.parametrize("args, setting", [
    (["--patience", "3"], "--patience 3"),
    (["--monitor", "val_accuracy"], "--monitor val_accuracy"),
])
def test_patience_or_monitor_without_validation(args, setting):
    values = dict(zip([a.lstrip("-") for a in args[::2]], args[1::2]))
    config = FitConfig().with_overrides({"val_fraction": 0, **values})
    with pytest.raises(ConfigError, match="needs a validation split"):
        config.check_settings({"val_fraction": FLAG, **dict.fromkeys(values, FLAG)})
    line = one_error_line(invoke("fit", "--val-fraction", "0", *args))
    assert setting in line and "--val-fraction 0" in line and "--monitor train_loss" in line
    FitConfig(val_fraction=0, patience=3, monitor="train_loss").check_settings(
        {"val_fraction": FLAG, "patience": FLAG, "monitor": FLAG})


# ---- --resume with a setting it cannot change ---------------------------------------------------

def test_resume_refuses_another_split_or_folder_but_takes_new_epochs(tmp_path):
    saved = FitConfig(seed=0, out=str(tmp_path / "run"))
    with pytest.raises(ConfigError, match="--seed 1 conflicts with --resume"):
        FitConfig(seed=1, out=saved.out).check_settings({"seed": FLAG}, resumed=saved)
    with pytest.raises(ConfigError, match="--out elsewhere conflicts with --resume"):
        FitConfig(out="elsewhere").check_settings({"out": FLAG}, resumed=saved)
    FitConfig(seed=0, epochs=30, out=saved.out).check_settings({"seed": FLAG, "epochs": FLAG}, resumed=saved)

    assert invoke("fit", *TINY, "--epochs", "1", "--out", "run").exit_code == 0
    line = one_error_line(invoke("fit", "--resume", "run", "--seed", "1"))
    assert "--seed 1" in line and "seed = 0" in line
    assert "--limit 100" in one_error_line(invoke("fit", "--resume", "run", "--limit", "100"))
    assert invoke("fit", "--resume", "run", "--out", "run", "--seed", "0", "--print-config").exit_code == 0


# ---- the length the fit trains -------------------------------------------------------------------

def test_print_config_says_the_length_in_epochs_and_updates():
    from convtrain.data.registry import load_dataset

    config = FitConfig()
    n_train = len(load_dataset(config.data, val_fraction=config.val_fraction, seed=config.seed).y_train)
    batches = math.ceil(n_train / config.batch_size)
    result = invoke("fit", "--print-config")
    assert result.exit_code == 0
    assert result.stdout.splitlines()[0] == \
        f"# length: {config.epochs} epochs x {batches} batches = {config.epochs * batches} updates"
    # still a loadable config: the same one, its template written out as the layer list
    assert FitConfig.from_dict(tomllib.loads(result.stdout)) == config.expanded()


def test_cyclic_schedule_with_limit_says_the_epochs_before_training_and_progress_counts_them():
    result = invoke("fit", *TINY, "--schedule", "cyclic", "--cycles", "1", "--n-s", "12")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    notice = re.fullmatch(r"cyclic schedule: 1 cycle x 2 x 12 = 24 updates = (\d+) epochs of (\d+) batches",
                          lines[0])
    assert notice, lines[0]
    epochs, batches = int(notice[1]), int(notice[2])
    assert epochs == math.ceil(24 / batches) and epochs > 1
    epoch_lines = [line for line in lines if re.match(r"epoch +\d+/", line)]
    assert [line.split()[1] for line in epoch_lines] == [f"{k}/{epochs}" for k in range(1, epochs + 1)]


def test_a_config_file_with_resume_counts_where_it_changes_the_checkpoint():
    saved = FitConfig(seed=5)
    FitConfig(seed=5).check_settings({"seed": "again.toml"}, resumed=saved)  # the same value: no change
    with pytest.raises(ConfigError, match=r"seed = 0 \(other.toml\) conflicts with --resume"):
        FitConfig(seed=0).check_settings({"seed": "other.toml"}, resumed=saved)  # the default, but not the run's


def test_one_cycle_against_epochs_points_at_the_half_cycle_length():
    """With cycles already 1, the length is set by n_s: that is the flag to suggest."""
    line = one_error_line(invoke("fit", "--schedule", "cyclic", "--cycles", "1", "--epochs", "40"))
    assert "1 cycle x 2 x" in line and "pass --n-s (updates per half cycle) or --cycles for the length" in line


def test_lengths_say_one_epoch_and_one_cycle_in_the_singular():
    assert FitConfig(epochs=1).describe_length(None) == "1 epoch"
    assert FitConfig(epochs=1).describe_length(1) == "1 epoch x 1 batch = 1 update"
    one_cycle = FitConfig(schedule="cyclic", cycles=1, n_s=5).describe_length(10)
    assert one_cycle == "cyclic schedule: 1 cycle x 2 x 5 = 10 updates = 1 epoch of 10 batches", one_cycle
