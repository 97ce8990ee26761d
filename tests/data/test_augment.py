"""The augmentation pipeline: each transform on tiny known images, seeds, per-data-set defaults
and the refusals."""

import numpy as np
import pytest

from convtrain.config import FitConfig
from convtrain.data.augment import (AugmentPlan, augment_batch, augment_images, blend, cut_mix, erase, mix, pad,
                                    plan_for, rotate, shift)
from convtrain.errors import ConfigError

# one 1-channel 3x4 image: 1..12
TINY = np.arange(1, 13, dtype=np.float32).reshape(1, 1, 3, 4)


def batch(n=16, channels=3, height=8, width=6, dtype=np.float32, seed=0):
    return np.random.default_rng(seed).standard_normal((n, channels, height, width)).astype(dtype)


def test_zero_padding_fills_the_uncovered_border_with_zeros():
    down_right = shift(TINY, np.array([[1, 1]]), padding=1, mode="zero")[0, 0]
    np.testing.assert_array_equal(down_right, [[0, 0, 0, 0],
                                               [0, 1, 2, 3],
                                               [0, 5, 6, 7]])
    up_left = shift(TINY, np.array([[-1, -2]]), padding=2, mode="zero")[0, 0]
    np.testing.assert_array_equal(up_left, [[7, 8, 0, 0],
                                            [11, 12, 0, 0],
                                            [0, 0, 0, 0]])


def test_reflect_padding_mirrors_the_image_without_its_edge():
    down_right = shift(TINY, np.array([[1, 1]]), padding=1, mode="reflect")[0, 0]
    # row -1 reflects to row 1, column -1 to column 1
    np.testing.assert_array_equal(down_right, [[6, 5, 6, 7],
                                               [2, 1, 2, 3],
                                               [6, 5, 6, 7]])
    up_left = shift(TINY, np.array([[-1, -2]]), padding=2, mode="reflect")[0, 0]
    np.testing.assert_array_equal(up_left, [[7, 8, 7, 6],
                                            [11, 12, 11, 10],
                                            [7, 8, 7, 6]])


@pytest.mark.parametrize("mode", ["zero", "reflect"])
@pytest.mark.parametrize("padding", [1, 2, 4, 6])
def test_padding_is_numpys(mode, padding):
    x = batch(n=3, channels=2, height=7, width=8)
    expected = np.pad(x, ((0, 0), (0, 0), (padding, padding), (padding, padding)),
                      mode="reflect" if mode == "reflect" else "constant")
    np.testing.assert_array_equal(pad(x, padding, mode), expected)


def test_no_shift_is_the_image():
    for mode in ("zero", "reflect"):
        np.testing.assert_array_equal(shift(TINY, np.array([[0, 0]]), padding=2, mode=mode), TINY)


def test_rotations_turn_counterclockwise_about_the_centre():
    square = np.arange(2 * 16, dtype=np.float32).reshape(1, 2, 4, 4)
    np.testing.assert_array_equal(rotate(square, [90]), np.rot90(square, 1, axes=(2, 3)))
    np.testing.assert_array_equal(rotate(square, [-90]), np.rot90(square, -1, axes=(2, 3)))
    np.testing.assert_array_equal(rotate(np.concatenate([TINY, TINY]), [0, 180]),
                                  np.concatenate([TINY, TINY[:, :, ::-1, ::-1]]))


def test_a_small_rotation_moves_the_corners_and_fills_what_it_uncovers_with_zero():
    x = np.ones((1, 1, 9, 9), dtype=np.float64)
    out = rotate(x, [30])
    assert out[0, 0, 4, 4] == 1 and out[0, 0, 0, 0] == 0 and out[0, 0, 8, 8] == 0
    assert set(np.unique(out)) == {0.0, 1.0}


def test_cutout_erases_a_square_cut_by_the_edge():
    x = np.ones((2, 2, 5, 5), dtype=np.float64)
    erase(x, np.array([[2, 0], [2, 4]]), size=3)  # centres (2, 2) and (0, 4)
    expected_inner = np.ones((5, 5))
    expected_inner[1:4, 1:4] = 0
    expected_corner = np.ones((5, 5))
    expected_corner[0:2, 3:5] = 0
    for channel in range(2):
        np.testing.assert_array_equal(x[0, channel], expected_inner)
        np.testing.assert_array_equal(x[1, channel], expected_corner)


@pytest.mark.parametrize("plan", [AugmentPlan(crop=2), AugmentPlan(crop=3, crop_padding="reflect"),
                                  AugmentPlan(flip=True), AugmentPlan(cutout=4), AugmentPlan(rotate=15),
                                  AugmentPlan(crop=4, crop_padding="reflect", flip=True, cutout=3)])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_every_transform_keeps_shape_and_dtype_and_is_seeded(plan, dtype):
    x = batch(dtype=dtype)
    before = x.copy()
    a = augment_images(x, plan, np.random.default_rng(5))
    b = augment_images(x, plan, np.random.default_rng(5))
    c = augment_images(x, plan, np.random.default_rng(6))
    assert a.shape == x.shape and a.dtype == x.dtype
    np.testing.assert_array_equal(x, before)  # the input is left alone
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    assert not np.array_equal(a, x)


def test_every_image_is_its_original_moved_and_maybe_mirrored():
    x = batch(n=32, channels=2, height=5, width=7)
    rng = np.random.default_rng(1)
    out = augment_images(x, AugmentPlan(crop=2, crop_padding="reflect", flip=True), rng)
    padded = np.pad(x, ((0, 0), (0, 0), (2, 2), (2, 2)), mode="reflect")
    padded_mirrored = np.pad(x[..., ::-1], ((0, 0), (0, 0), (2, 2), (2, 2)), mode="reflect")
    flips = 0
    for i in range(len(x)):
        windows = [(p[i, :, dy:dy + 5, dx:dx + 7], mirrored) for mirrored, p in ((0, padded), (1, padded_mirrored))
                   for dy in range(5) for dx in range(5)]
        matches = [mirrored for window, mirrored in windows if np.array_equal(window, out[i])]
        assert matches, f"image {i} is no crop of its original"
        flips += matches[0]
    assert 4 < flips < 28  # about half


def test_cutout_erases_one_square_per_image_to_zero():
    x = batch(n=64, height=10, width=10) + 10  # no zeros of its own
    out = augment_images(x, AugmentPlan(cutout=4), np.random.default_rng(0))
    erased = out == 0
    assert np.array_equal(erased[:, 0], erased[:, 1])  # the same square in every channel
    counts = erased[:, 0].sum(axis=(1, 2))
    assert counts.max() == 16 and counts.min() >= 4  # whole inside, or cut by an edge
    np.testing.assert_array_equal(out[~erased], x[~erased])


def test_the_legacy_augment_batch_is_flips_and_zero_filled_shifts():
    x = batch()
    a = augment_batch(x, np.random.default_rng(3), flip=True, max_shift=2)
    b = augment_images(x, AugmentPlan(crop=2, flip=True), np.random.default_rng(3))
    np.testing.assert_array_equal(a, b)


def test_an_inactive_plan_draws_nothing():
    rng = np.random.default_rng(0)
    state = rng.bit_generator.state
    out = augment_images(TINY, AugmentPlan(), rng)
    np.testing.assert_array_equal(out, TINY)
    assert rng.bit_generator.state == state and not AugmentPlan().active


def test_mixup_blends_each_image_with_its_partner_by_one_lam():
    x = batch(n=10)
    mixed, partner, lam = mix(x, 0.4, np.random.default_rng(0))
    assert mixed.dtype == x.dtype and sorted(partner) == list(range(10)) and 0 <= lam <= 1
    np.testing.assert_allclose(mixed, lam * x + (1 - lam) * x[partner], rtol=1e-6, atol=1e-6)
    again = mix(x, 0.4, np.random.default_rng(0))
    assert np.array_equal(again[0], mixed) and np.array_equal(again[1], partner) and again[2] == lam


def test_cutmix_pastes_one_box_of_the_partner_and_lam_is_the_kept_area():
    x = batch(n=12, height=10, width=9)
    for seed in range(20):
        out, partner, lam = cut_mix(x, 1.0, np.random.default_rng(seed))
        from_partner = (out == x[partner]) & (out != x)
        box = from_partner.any(axis=(0, 1))  # (H, W): where any image took its partner's pixel
        rows, cols = np.flatnonzero(box.any(axis=1)), np.flatnonzero(box.any(axis=0))
        if rows.size:
            assert box[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1].all()  # one box
            area = (rows[-1] - rows[0] + 1) * (cols[-1] - cols[0] + 1)
            assert lam == pytest.approx(1 - area / 90)
            inside = np.zeros((10, 9), bool)
            inside[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1] = True
            np.testing.assert_array_equal(out[:, :, inside], x[partner][:, :, inside])
            np.testing.assert_array_equal(out[:, :, ~inside], x[:, :, ~inside])
        else:
            assert lam == 1.0 or np.array_equal(out, x)


def test_blend_is_the_plans_mixup_or_cutmix():
    x = batch()
    for plan, function, alpha in ((AugmentPlan(mixup=0.3), mix, 0.3), (AugmentPlan(cutmix=1.0), cut_mix, 1.0)):
        got, want = blend(x, plan, np.random.default_rng(4)), function(x, alpha, np.random.default_rng(4))
        assert np.array_equal(got[0], want[0]) and np.array_equal(got[1], want[1]) and got[2] == want[2]
        assert plan.mixes and plan.active


# ---- the config: [augment], the shorthand and the defaults per data set ----------------

def test_augment_shorthand_is_the_data_sets_default_pipeline():
    assert plan_for(FitConfig(data="digits", augment=True)) == AugmentPlan(crop=1)
    assert plan_for(FitConfig(data="mnist", data_path="m", augment=True)) == AugmentPlan(crop=2)
    assert plan_for(FitConfig(data="cifar10", data_path="c", augment=True)) == AugmentPlan(crop=2, flip=True)
    assert plan_for(FitConfig(data="folder", data_path="f", augment=True)) == AugmentPlan(crop=2, flip=True)
    assert not plan_for(FitConfig(data="cifar10", data_path="c")).active  # off unless asked


def test_settings_replace_parts_of_the_default_or_stand_alone():
    config = FitConfig(data="cifar10", data_path="c", augment=True, crop=4, crop_padding="reflect", cutout=8)
    assert plan_for(config) == AugmentPlan(crop=4, crop_padding="reflect", flip=True, cutout=8)
    assert plan_for(FitConfig(data="cifar10", data_path="c", augment=True, flip=False)) == AugmentPlan(crop=2)
    assert plan_for(FitConfig(data="digits", flip=True)) == AugmentPlan(flip=True)
    assert plan_for(FitConfig(data="digits", augment=True, crop=0)) == AugmentPlan()


def test_the_augment_table_reads_and_round_trips(tmp_path):
    path = tmp_path / "fit.toml"
    path.write_text('[data]\ndata = "cifar10"\ndata_path = "c"\n\n'
                    '[augment]\ncrop = 4\ncrop_padding = "reflect"\nflip = true\ncutout = 8\n')
    config = FitConfig.from_toml(path)
    assert (config.crop, config.crop_padding, config.flip, config.cutout) == (4, "reflect", True, 8)
    assert "[augment]" in config.to_toml()
    (tmp_path / "again.toml").write_text(config.to_toml())
    assert FitConfig.from_toml(tmp_path / "again.toml") == config
    old_spelling = tmp_path / "old.toml"
    old_spelling.write_text("[data]\naugment = true\n")  # where augment was before the table
    assert FitConfig.from_toml(old_spelling).augment is True


def test_names_data_refuses_image_transforms():
    for settings in ({"augment": True}, {"flip": True}, {"crop": 2}, {"cutout": 3}, {"rotate": 5.0},
                     {"cutmix": 1.0}):
        with pytest.raises(ConfigError, match="not images") as info:
            FitConfig(data="names", data_path="n", **settings).validate()
        assert "\n" not in str(info.value)
    FitConfig(data="names", data_path="n", flip=False, crop=0).validate()  # nothing asked: fine


@pytest.mark.parametrize("settings, message", [
    ({"crop": -1}, "crop: got -1"), ({"cutout": -2}, "cutout: got -2"),
    ({"crop_padding": "wrap"}, "crop_padding: got 'wrap', expected zero or reflect"),
    ({"mixup": -0.5}, "mixup: got -0.5"), ({"cutmix": -1.0}, "cutmix: got -1.0"),
    ({"mixup": 0.2, "cutmix": 1.0}, "choose mixup or cutmix"), ({"rotate": 200.0}, "rotate: got 200.0")])
def test_bad_settings_are_refused_naming_the_value(settings, message):
    with pytest.raises(ConfigError, match=message):
        FitConfig(**settings).validate()


def test_transforms_larger_than_the_images_are_refused():
    with pytest.raises(ConfigError, match="crop: got 8 with crop_padding = 'reflect'"):
        AugmentPlan(crop=8, crop_padding="reflect").check((1, 8, 8))
    with pytest.raises(ConfigError, match="cutout: got 9"):
        AugmentPlan(cutout=9).check((1, 8, 8))
    AugmentPlan(crop=4, crop_padding="reflect", cutout=8).check((3, 32, 32))


# ---- through the CLI ---------------------------------------------------------------------

def test_the_flags_print_the_augment_table(tmp_path):
    from tests.support.cli import invoke

    result = invoke("fit", "--data", "cifar10", "--data-path", tmp_path, "--crop", 4, "--crop-padding", "reflect",
                    "--flip", "--cutout", 8, "--print-config")
    assert result.exit_code == 0, result.output
    table = result.stdout.split("[augment]")[1].split("\n[")[0]
    for line in ("crop = 4", 'crop_padding = "reflect"', "flip = true", "cutout = 8", "mixup = 0.0"):
        assert line in table


def test_the_cli_refuses_augmenting_names_with_one_line(tmp_path):
    from tests.support.cli import error_line, invoke

    (tmp_path / "names").mkdir()
    (tmp_path / "names" / "English.txt").write_text("Smith\nJones\n", encoding="utf-8")
    for flags in (["--augment"], ["--flip"], ["--crop", 2]):
        result = invoke("fit", "--data", "names", "--data-path", tmp_path / "names", "--no-track",
                        "--out", tmp_path / "run", *flags)
        assert result.exit_code == 2, result.output
        assert "not images" in error_line(result)
    assert not (tmp_path / "run").exists()


def test_a_crop_padding_flag_without_a_crop_is_refused(tmp_path):
    from tests.support.cli import error_line, invoke

    result = invoke("fit", "--crop-padding", "reflect", "--no-track", "--out", tmp_path / "run")
    assert "--crop-padding reflect is not used without a crop" in error_line(result)
    printed = invoke("fit", "--augment", "--crop-padding", "reflect", "--print-config")  # digits' crop 1
    assert printed.exit_code == 0, printed.output
