"""Sweep files: what they may say, and the one-line errors for what they may not."""

import json
from pathlib import Path

import pytest

from convtrain.errors import ConfigError
from convtrain.sweep.spec import MAX_TRIALS, Choices, Range, load_sweep


def write(tmp_path, text, name="sweep.toml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_base_file_inline_overrides_and_defaults(tmp_path):
    write(tmp_path, "[optim]\nepochs = 7\nlr = 0.01\n", "fit-base.toml")
    spec = load_sweep(write(tmp_path, """
base = "fit-base.toml"
[fit]
lr = 0.02
[fit.data]
limit = 300
[space]
l2 = {low = 1e-5, high = 1e-1, log = true}
"""))
    assert spec.base.epochs == 7 and spec.base.lr == 0.02 and spec.base.limit == 300
    assert spec.name == "sweep" and spec.method == "tpe" and spec.n_trials == 20
    assert spec.objective == "val_accuracy" and spec.direction == "maximize"
    assert spec.space["l2"] == Range("l2", 1e-5, 1e-1, integer=False, log=True)
    assert str(spec.out) == "runs/sweep"


def test_list_choices_travel_as_labels_and_decode_back(tmp_path):
    spec = load_sweep(write(tmp_path, """
[sweep]
method = "grid"
[space]
filters = [[8, 16], [16, 32], [32, 64]]
kernel_sizes = [[3], [[5, 3]]]
l2 = [1e-4, 1e-3]
"""))
    filters = spec.space["filters"]
    assert isinstance(filters, Choices) and filters.labels == ("8,16", "16,32", "32,64")
    assert spec.n_trials == spec.grid_size() == 12
    point = spec.grid_points()[-1]
    config = spec.trial_config(point)
    assert config.filters == [32, 64] and config.kernel_sizes == [[5, 3]] and config.l2 == 1e-3


def test_grid_expands_int_and_stepped_ranges_and_samples_when_smaller(tmp_path):
    spec = load_sweep(write(tmp_path, """
[sweep]
method = "grid"
n_trials = 4
seed = 3
[space]
epochs = {low = 2, high = 6, step = 2}
lr = {low = 0.01, high = 0.03, step = 0.01}
"""))
    assert spec.space["epochs"].grid_labels() == [2, 4, 6]
    assert spec.space["lr"].grid_labels() == [0.01, 0.02, 0.03]
    points = spec.grid_points()
    assert len(points) == 4 and len({tuple(p.items()) for p in points}) == 4
    assert points == load_sweep(spec.path).grid_points()  # the seed fixes the sample


def test_command_line_wins_and_val_loss_minimizes(tmp_path):
    spec = load_sweep(write(tmp_path, """
[sweep]
name = "from-file"
objective = "val_loss"
n_trials = 5
[space]
lr = {low = 0.001, high = 0.1}
"""), n_trials=9, study_name="from-flag")
    assert (spec.name, spec.n_trials, spec.direction) == ("from-flag", 9, "minimize")


BAD = [
    ("[space]\nlrr = [0.1]\n", "unknown fit parameter 'lrr' (did you mean 'lr'?)"),
    ("[space]\nl2 = {low = 0.1, high = 0.01}\n", "empty range"),
    ("[space]\nl2 = []\n", "choices is empty"),
    ("[space]\n", "[space] is empty"),
    ("[sweep]\nmethod = \"grdi\"\n[space]\nlr = [0.1]\n", "did you mean 'grid'"),
    ("[sweep]\nmethod = \"grid\"\n[space]\nl2 = {low = 1e-5, high = 1e-1, log = true}\n",
     "method 'grid' needs a finite set for 'l2'"),
    ("[sweep]\npruner = \"mediann\"\n[space]\nlr = [0.1]\n", "did you mean 'median'"),
    ("[sweep]\nobjective = \"accuracy\"\n[space]\nlr = [0.1]\n", "objective: got 'accuracy'"),
    ("[sweep]\nn_trails = 3\n[space]\nlr = [0.1]\n", "did you mean 'n_trials'"),
    ("[sweep]\nmethod = \"grid\"\nn_trials = 3\n[space]\nlr = [0.1, 0.2]\n", "exceeds the grid's 2 points"),
    ("[space]\nlr = [0.1, -0.5]\n", "lr = -0.5 is not a valid fit value"),
    ("[space]\nfilters = [[8, 16], [8, 16]]\n", "given twice"),
    ("[space]\nfilters = {low = 4, high = 8}\n", "a range needs a number parameter"),
    ("[space]\nepochs = {low = 1.5, high = 4}\n", "expected a whole number"),
    ("[space]\nl2 = {low = 0, high = 0.1, log = true}\n", "a log range needs low > 0"),
    ("[space]\nl2 = {low = 0.001, hihg = 0.1}\n", "did you mean 'high'"),
    ("[space]\nout = [\"a\", \"b\"]\n", "'out' cannot be swept"),
    ("[fit]\nepoch = 3\n[space]\nlr = [0.1]\n", "unknown [fit] key 'epoch' (did you mean 'epochs'?)"),
    ("[fit]\nepochs = 0\n[space]\nlr = [0.1]\n", "epochs: got 0"),
    ("base = \"missing.toml\"\n[space]\nlr = [0.1]\n", "config file not found"),
    ("[space]\nlr = 0.1\n", "expected a list of choices or a range"),
    ("[space\nlr = [0.1]\n", "invalid TOML"),
    ("[sweep]\nname = \"" + "n" * 300 + "\"\n[space]\nlr = [0.1]\n", "name: 300 characters, expected at most 200"),
]


def test_the_conv_algorithm_can_be_swept(tmp_path):
    spec = load_sweep(write(tmp_path, '[sweep]\nmethod = "grid"\n[space]\nconv_algo = ["im2col", "winograd"]\n'))
    assert spec.space["conv_algo"].labels == ("im2col", "winograd")
    assert [spec.trial_config(point).conv_algo for point in spec.grid_points()] == ["im2col", "winograd"]
    with pytest.raises(ConfigError, match="conv_algo"):
        load_sweep(write(tmp_path, '[space]\nconv_algo = ["im2col", "fft"]\n'))


@pytest.mark.parametrize("text, message", BAD, ids=[m for _, m in BAD])
def test_bad_sweep_files_give_one_line_errors(tmp_path, text, message):
    with pytest.raises(ConfigError) as info:
        load_sweep(write(tmp_path, text))
    assert message in str(info.value)
    assert "\n" not in str(info.value)
    assert str(tmp_path / "sweep.toml") in str(info.value) or "missing.toml" in str(info.value)


@pytest.mark.parametrize("name", ["../../x", "/etc/x", "a/../../b", "..", "x\ny"])
def test_a_sweep_name_cannot_put_its_folder_outside_runs(tmp_path, name):
    spec = load_sweep(write(tmp_path, f"[sweep]\nname = {json.dumps(name)}\n[space]\nlr = [0.1]\n"))
    assert spec.name == name  # the study keeps its name
    assert spec.out.parent == Path("runs") and spec.out.name not in ("", ".", "..")
    assert "/" not in spec.out.name and "\n" not in spec.out.name
    # and so does the --study-name flag
    assert load_sweep(spec.path, study_name=name).out == spec.out


def test_the_folder_name_follows_the_run_name_rule():
    from convtrain.tracking.safe_names import safe_name
    assert safe_name("digits grid/v2", fallback="sweep") == "digits-grid-v2"
    assert safe_name("../../x", fallback="sweep") == "x" and safe_name("..", fallback="sweep") == "sweep"


@pytest.mark.parametrize("n_trials", [1_000_000, 2**63, MAX_TRIALS + 1])
def test_n_trials_is_bounded(tmp_path, n_trials):
    path = write(tmp_path, "[sweep]\nmethod = \"random\"\n[space]\nlr = {low = 0.01, high = 0.1}\n")
    with pytest.raises(ConfigError, match=f"more than the {MAX_TRIALS:,}") as info:
        load_sweep(path, n_trials=n_trials)
    assert "\n" not in str(info.value)
    if n_trials < 2**63:  # TOML integers stop at 2**63 - 1
        with pytest.raises(ConfigError, match="n_trials"):
            load_sweep(write(tmp_path, path.read_text().replace("[space]", f"n_trials = {n_trials}\n[space]")))
    assert load_sweep(path, n_trials=MAX_TRIALS).n_trials == MAX_TRIALS


def test_a_huge_grid_is_refused_from_its_size_alone(tmp_path, monkeypatch):
    # 10^4 x 10^4 = 10^8 points: counted, never listed
    monkeypatch.setattr(Range, "grid_labels", lambda self: pytest.fail("listed a grid it should only count"))
    path = write(tmp_path, "[sweep]\nmethod = \"grid\"\n[space]\nepochs = {low = 1, high = 10000}\n"
                           "batch_size = {low = 1, high = 10000}\n")
    with pytest.raises(ConfigError, match="100,000,000 points, more than the 1,000,000") as info:
        load_sweep(path)
    assert "\n" not in str(info.value)
    one_range = write(tmp_path, "[sweep]\nmethod = \"grid\"\n[space]\nepochs = {low = 1, high = 1000000000}\n")
    with pytest.raises(ConfigError, match="1,000,000,000 points"):
        load_sweep(one_range)


def test_a_big_grid_sampled_by_n_trials_lists_only_its_sample(tmp_path):
    import itertools
    import random

    spec = load_sweep(write(tmp_path, """
[sweep]
method = "grid"
n_trials = 7
seed = 5
[space]
epochs = {low = 2, high = 60, step = 2}
lr = {low = 0.01, high = 0.3, step = 0.01}
l2 = [1e-3, 1e-4, 0.0]
"""))
    assert spec.grid_size() == 30 * 30 * 3
    names = list(spec.space)
    every = [dict(zip(names, c)) for c in itertools.product(*(spec.space[n].grid_labels() for n in names))]
    expected = [every[i] for i in sorted(random.Random(5).sample(range(len(every)), 7))]
    assert spec.grid_points() == expected  # the same seeded sample, in the same order, as listing all
    # a grid of 10^6 points (the limit) with a small sample is fine
    big = load_sweep(write(tmp_path, "[sweep]\nmethod = \"grid\"\nn_trials = 3\n[space]\n"
                                     "epochs = {low = 1, high = 1000}\nbatch_size = {low = 1, high = 1000}\n", "big.toml"))
    assert big.grid_size() == 1_000_000 and len(big.grid_points()) == 3


def test_a_sweep_searches_a_blocks_width_and_a_dropout_rate_of_the_layer_list(tmp_path):
    write(tmp_path, """
[[model.layers]]
type = "conv"
filters = 8
padding = 1
[[model.layers]]
type = "residual"
layers = [{type = "conv", filters = 8, padding = 1}, {type = "relu"}, {type = "conv", filters = 8, padding = 1}]
[[model.layers]]
type = "global_avg_pool"
[[model.layers]]
type = "dropout"
name = "head"
p = 0.1
""", "fit-resnet.toml")
    spec = load_sweep(write(tmp_path, """
base = "fit-resnet.toml"
[space]
"layers.res1.filters" = [8, 16]
layers.head.p = {low = 0.1, high = 0.5}
"""))
    assert spec.space["layers.res1.filters"] == Choices("layers.res1.filters", (8, 16), (8, 16))
    assert spec.space["layers.head.p"] == Range("layers.head.p", 0.1, 0.5, integer=False, log=False)
    config = spec.trial_config({"layers.res1.filters": 16, "layers.head.p": 0.3})
    block = config.layers[1]["layers"]
    assert [block[0]["filters"], block[2]["filters"], config.layers[3]["p"]] == [16, 16, 0.3]
    assert config.layers[0]["filters"] == 8 and spec.base.layers[1]["layers"][0]["filters"] == 8


def test_a_sweep_of_a_layer_of_the_template_expands_it_and_names_the_layers_when_unknown(tmp_path):
    spec = load_sweep(write(tmp_path, '[fit]\nfilters = [4, 8]\nhidden = [16]\ndropout = 0.2\n'
                                      '[space]\n"layers.fc1_dropout.p" = [0.2, 0.4]\n'))
    config = spec.trial_config({"layers.fc1_dropout.p": 0.4})
    assert config.layers[-1] == {"type": "dropout", "p": 0.4} and config.filters == [16, 32]  # the default
    with pytest.raises(ConfigError, match=r"layers.res9.filters: the base network has no such .*conv1_relu"):
        load_sweep(write(tmp_path, '[space]\n"layers.res9.filters" = [8, 16]\n'))


def test_the_augmentation_settings_can_be_swept(tmp_path):
    write(tmp_path, '[data]\ndata = "cifar10"\ndata_path = "c"\n', "fit-base.toml")
    spec = load_sweep(write(tmp_path, """
base = "fit-base.toml"
[sweep]
method = "grid"
[space]
crop = [0, 4]
crop_padding = ["zero", "reflect"]
flip = [true, false]
cutout = {low = 0, high = 8, step = 8}
mixup = [0.0, 0.2]
"""))
    assert spec.grid_size() == 32
    configs = [spec.trial_config(point) for point in spec.grid_points()]
    assert {(c.crop, c.crop_padding, c.flip, c.cutout, c.mixup) for c in configs} == {
        (crop, padding, flip, cutout, mixup) for crop in (0, 4) for padding in ("zero", "reflect")
        for flip in (True, False) for cutout in (0, 8) for mixup in (0.0, 0.2)}
    with pytest.raises(ConfigError, match="crop_padding"):
        load_sweep(write(tmp_path, '[space]\ncrop_padding = ["zero", "wrap"]\n'))
    with pytest.raises(ConfigError, match="not images"):  # the names data refuses them before any trial
        load_sweep(write(tmp_path, '[fit]\ndata = "names"\ndata_path = "n"\n[space]\nflip = [true, false]\n'))
