"""Training-time augmentation of image batches: the pipeline of the config's [augment] table.

Transforms, applied in this order to a standardized batch (N, C, H, W), each drawn per image
from one generator:

    flip     mirror left-right, each image with probability 1/2
    rotate   turn each image about its centre by an angle uniform in [-rotate, rotate] degrees
             (counterclockwise positive; nearest pixel, as torchvision's RandomRotation; the
             corners it uncovers 0)
    crop     pad each side by `crop` pixels (zero: the channel mean; or reflect), then take a
             random H x W window: a translation by up to `crop` pixels each way
    cutout   set one random `cutout` x `cutout` square to 0 (the channel mean); its centre may
             lie anywhere in the image, so near an edge part of it falls outside
    mixup    blend the batch with a shuffled copy of itself by lam ~ Beta(mixup, mixup), one
             lam per batch; the loss then mixes the two label sets by the same lam
    cutmix   or paste one random box of the shuffled copy into every image, the box's area
             1 - lam with lam ~ Beta(cutmix, cutmix) (clipped at the edges, lam then recounted
             from the box), the labels mixed by lam as for mixup

Flip and crop commute in distribution (the crop's offsets are symmetric); flipping first keeps
the draws of the pipeline `--augment` always meant. Every step is vectorized over the batch: one
fancy-index assignment for the flips, one padded copy and one gather for the crop, one masked
write for cutout. The randomness comes from the
generator the caller passes (the trainer's augmentation generator, seeded from the fit's seed),
so the same seed gives the same batches for any thread count.

`augment = true` is a shorthand for the data set's default pipeline (DEFAULTS): 2-pixel
translations (1 for the 8x8 digits) for every image set, plus flips for CIFAR-10 and image
folders. Digits and MNIST are not flipped (a mirrored 2 or 7 is no digit), and the names data
is not images at all (its width axis is a letter's position): image transforms are refused there.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from convtrain.errors import ConfigError

PADDINGS = ("zero", "reflect")
NOT_IMAGES = ("names",)  # data sets whose arrays are not pictures


@dataclass(frozen=True)
class AugmentPlan:
    """The transforms one fit applies to its training batches."""

    crop: int = 0                # padding in pixels before the random crop; 0 = no crop
    crop_padding: str = "zero"   # zero or reflect
    flip: bool = False
    rotate: float = 0.0          # largest angle in degrees; 0 = none
    cutout: int = 0              # side of the erased square; 0 = none
    mixup: float = 0.0           # Beta(mixup, mixup) for the blend weight; 0 = no mixup
    cutmix: float = 0.0          # Beta(cutmix, cutmix) for the kept area; 0 = no cutmix

    @property
    def active(self) -> bool:
        """Whether anything is drawn: a plan that does nothing leaves the batches (and the
        generator) untouched."""
        return bool(self.crop or self.flip or self.rotate or self.cutout or self.mixes)

    @property
    def mixes(self) -> bool:
        """Whether each batch is mixed with a shuffled copy (mixup or cutmix): labels mix too."""
        return bool(self.mixup or self.cutmix)

    def check(self, input_shape) -> None:
        """ConfigError unless the transforms fit images of shape (C, H, W)."""
        _, height, width = input_shape
        if self.crop and self.crop_padding == "reflect" and self.crop >= min(height, width):
            raise ConfigError(f"crop: got {self.crop} with crop_padding = 'reflect', expected fewer pixels than "
                              f"the images' smaller side ({height}x{width}); reflection mirrors the image "
                              "without its edge row")
        if self.crop > max(height, width):
            raise ConfigError(f"crop: got {self.crop}, expected at most the images' size ({height}x{width})")
        if self.cutout > max(height, width):
            raise ConfigError(f"cutout: got {self.cutout}, expected at most the images' size ({height}x{width})")

    def describe(self) -> str:
        """The plan in a few words, e.g. 'crop 4 (reflect), flip, cutout 8'; 'none'."""
        parts = []
        if self.crop:
            parts.append(f"crop {self.crop} ({self.crop_padding})")
        if self.flip:
            parts.append("flip")
        if self.rotate:
            parts.append(f"rotate {self.rotate:g}")
        if self.cutout:
            parts.append(f"cutout {self.cutout}")
        if self.mixup:
            parts.append(f"mixup {self.mixup:g}")
        if self.cutmix:
            parts.append(f"cutmix {self.cutmix:g}")
        return ", ".join(parts) or "none"


# What `augment = true` means per data set; a data set not listed gets DEFAULT_PLAN.
DEFAULT_PLAN = AugmentPlan(crop=2)
DEFAULTS: dict[str, AugmentPlan] = {
    "digits": AugmentPlan(crop=1),          # 8x8 images: 2 pixels would move a quarter off
    "mnist": AugmentPlan(crop=2),
    "cifar10": AugmentPlan(crop=2, flip=True),
    "folder": AugmentPlan(crop=2, flip=True),
    "npz": AugmentPlan(crop=2),             # unknown pictures: not mirrored unless asked
    "names": AugmentPlan(),
}
# the FitConfig fields of the [augment] table, besides the `augment` shorthand
TRANSFORM_FIELDS = ("crop", "crop_padding", "flip", "rotate", "cutout", "mixup", "cutmix")


def default_plan(data: str) -> AugmentPlan:
    """The pipeline `augment = true` stands for on data set `data`."""
    return DEFAULTS.get(data, DEFAULT_PLAN)


def plan_for(config) -> AugmentPlan:
    """The pipeline a FitConfig asks for: its data set's default when `augment` is on (else
    nothing), with every transform the config sets (crop, flip: not None) in place of the
    default's. ConfigError for image transforms on data that is not images."""
    base = default_plan(config.data) if config.augment else AugmentPlan()
    plan = AugmentPlan(
        crop=base.crop if config.crop is None else int(config.crop),
        crop_padding=config.crop_padding,
        flip=base.flip if config.flip is None else bool(config.flip),
        rotate=float(config.rotate),
        cutout=int(config.cutout),
        mixup=float(config.mixup),
        cutmix=float(config.cutmix),
    )
    if config.data in NOT_IMAGES:
        asked = [name for name in ("crop", "flip", "rotate", "cutout", "mixup", "cutmix") if getattr(plan, name)]
        if config.augment or asked:
            what = ", ".join(asked) if asked else "augment"
            raise ConfigError(f"{what}: the {config.data} data set is not images (its width axis is a letter's "
                              "position); leave out augment and the [augment] transforms")
    return plan


def augmented_batch(xb: np.ndarray, yb: np.ndarray, plan: AugmentPlan, rng: np.random.Generator):
    """(images, mixed) of a training batch under `plan`: the transformed images, and for mixup or
    cutmix (partner labels, lam) for the loss (None otherwise)."""
    if not plan.active:
        return xb, None
    xb = augment_images(xb, plan, rng)
    if not plan.mixes:
        return xb, None
    xb, partner, lam = blend(xb, plan, rng)
    return xb, (yb[partner], lam)


def augment_images(x: np.ndarray, plan: AugmentPlan, rng: np.random.Generator) -> np.ndarray:
    """A new batch (N, C, H, W) with `plan`'s image transforms (flip, rotate, crop, cutout, in
    that order); mixup and cutmix, which also change the labels, are `blend`.

    The draws come first, in a fixed order (flips, shifts, cutout centres, angles), each only
    for a transform the plan has: flips and 2-pixel shifts draw exactly what `--augment` drew
    before plans existed, so older fits and their checkpoints continue bit for bit."""
    if x.ndim != 4:
        raise ValueError(f"augment_images expects a batch (N, C, H, W), got shape {x.shape}")
    n = x.shape[0]
    flipped = np.flatnonzero(rng.random(n) < 0.5) if plan.flip else None
    shifts = rng.integers(-plan.crop, plan.crop + 1, size=(n, 2)) if plan.crop else None
    centres = _cutout_centres(x.shape, rng) if plan.cutout else None
    angles = rng.uniform(-plan.rotate, plan.rotate, size=n) if plan.rotate else None
    out = x.copy()
    if flipped is not None:
        out[flipped] = out[flipped, :, :, ::-1]
    if angles is not None:
        out = rotate(out, angles)
    if shifts is not None:
        out = shift(out, shifts, plan.crop, plan.crop_padding)
    if centres is not None:
        erase(out, centres, plan.cutout)
    return out


def shift(x: np.ndarray, shifts: np.ndarray, padding: int, mode: str = "zero") -> np.ndarray:
    """Image i moved down by shifts[i, 0] and right by shifts[i, 1] pixels (each in
    [-padding, padding]), the uncovered border filled by `mode`: the random crop of the batch
    padded by `padding`, at offset padding - shift. One padded copy of the batch, then one
    gather of the H x W windows (a strided view of it, indexed by image and offset)."""
    _, _, height, width = x.shape
    padded = pad(x, padding, mode)
    windows = np.lib.stride_tricks.sliding_window_view(padded, (height, width), axis=(2, 3))  # (N, C, 2p+1, 2p+1, H, W)
    offsets = padding - np.asarray(shifts)  # (N, 2), in [0, 2 * padding]
    return windows[np.arange(x.shape[0]), :, offsets[:, 0], offsets[:, 1]]


def rotate(x: np.ndarray, degrees: np.ndarray) -> np.ndarray:
    """Image i turned counterclockwise (as displayed, row 0 on top) by degrees[i] about its
    centre, each output pixel the nearest source pixel, 0 where that falls outside: one gather
    of the batch by precomputed flat indices."""
    n, channels, height, width = x.shape
    theta = np.deg2rad(np.asarray(degrees, dtype=np.float64))[:, None, None]
    rows, cols = np.mgrid[0:height, 0:width].astype(np.float64)
    rows -= (height - 1) / 2
    cols -= (width - 1) / 2
    cos, sin = np.cos(theta), np.sin(theta)
    # the output pixel at (row, col) from the centre shows the source pixel turned back by theta
    source_rows = np.rint(cos * rows + sin * cols + (height - 1) / 2).astype(np.intp)  # (N, H, W)
    source_cols = np.rint(cos * cols - sin * rows + (width - 1) / 2).astype(np.intp)
    inside = (source_rows >= 0) & (source_rows < height) & (source_cols >= 0) & (source_cols < width)
    flat = np.where(inside, source_rows * width + source_cols, 0).reshape(n, 1, height * width)
    out = np.take_along_axis(x.reshape(n, channels, height * width), flat, axis=2).reshape(x.shape)
    np.copyto(out, 0, where=~inside[:, None])
    return out


def pad(x: np.ndarray, padding: int, mode: str = "zero") -> np.ndarray:
    """x (N, C, H, W) padded by `padding` pixels on each side of H and W: zeros, or the image
    reflected about its edge row and column (numpy's "reflect"; padding < H and W). Written
    into one new array (a few times faster than np.pad)."""
    if mode not in PADDINGS:
        raise ValueError(f"padding mode: got {mode!r}, expected one of {', '.join(PADDINGS)}")
    n, channels, height, width = x.shape
    p = padding
    out = np.empty((n, channels, height + 2 * p, width + 2 * p), dtype=x.dtype)
    out[:, :, p:p + height, p:p + width] = x
    if mode == "zero":
        out[:, :, :p] = 0
        out[:, :, p + height:] = 0
        out[:, :, p:p + height, :p] = 0
        out[:, :, p:p + height, p + width:] = 0
        return out
    if p >= height or p >= width:
        raise ValueError(f"reflect padding of {p} needs images larger than {p} pixels, got {height}x{width}")
    before, after = np.arange(p, 0, -1), np.arange(width - 2, width - 2 - p, -1)   # mirrored columns
    out[:, :, p:p + height, :p] = x[:, :, :, before]
    out[:, :, p:p + height, p + width:] = x[:, :, :, after]
    above, below = np.arange(2 * p, p, -1), np.arange(p + height - 2, height - 2, -1)  # mirrored padded rows
    out[:, :, :p] = out[:, :, above]
    out[:, :, p + height:] = out[:, :, below]
    return out


def erase(x: np.ndarray, centres: np.ndarray, size: int) -> np.ndarray:
    """Set a size x size square around centres[:, i] (rows; cols) of image i to 0, in place (a
    square cut by an edge erases what is inside); returns x."""
    _, _, height, width = x.shape
    top, left = np.asarray(centres) - size // 2
    rows, cols = np.arange(height), np.arange(width)
    inside_rows = (rows >= top[:, None]) & (rows < top[:, None] + size)    # (N, H)
    inside_cols = (cols >= left[:, None]) & (cols < left[:, None] + size)  # (N, W)
    erased = inside_rows[:, :, None] & inside_cols[:, None, :]            # (N, H, W)
    np.copyto(x, 0, where=erased[:, None, :, :])
    return x


def _cutout_centres(shape, rng: np.random.Generator) -> np.ndarray:
    """(2, N) centres, uniform over the image's rows and columns."""
    n, _, height, width = shape
    return rng.integers(0, [[height], [width]], size=(2, n))


def mix(x: np.ndarray, alpha: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, float]:
    """Mixup: (lam * x + (1 - lam) * x[partner], partner, lam) with lam ~ Beta(alpha, alpha) and
    `partner` a permutation of the batch; the loss mixes the labels y and y[partner] by lam."""
    lam = float(rng.beta(alpha, alpha))
    partner = rng.permutation(x.shape[0])
    mixed = x * x.dtype.type(lam)
    mixed += x[partner] * x.dtype.type(1.0 - lam)
    return mixed, partner, lam


def blend(x: np.ndarray, plan: AugmentPlan, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, float]:
    """The plan's mixup or cutmix of the batch: (mixed batch, partner, lam); the loss mixes the
    labels y and y[partner] by lam."""
    return mix(x, plan.mixup, rng) if plan.mixup else cut_mix(x, plan.cutmix, rng)


def cut_mix(x: np.ndarray, alpha: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, float]:
    """CutMix: every image gets the same box cut from its partner (a permutation of the batch)
    pasted in; the box covers about 1 - lam of the image for lam ~ Beta(alpha, alpha), is
    centred uniformly and clipped at the edges. Returns (batch, partner, lam), lam being the
    area each image keeps of its own."""
    n, _, height, width = x.shape
    lam = float(rng.beta(alpha, alpha))
    partner = rng.permutation(n)
    side = np.sqrt(1.0 - lam)
    box_height, box_width = int(height * side), int(width * side)
    centre_row, centre_col = (int(v) for v in rng.integers(0, [height, width]))
    top, bottom = max(centre_row - box_height // 2, 0), min(centre_row + box_height - box_height // 2, height)
    left, right = max(centre_col - box_width // 2, 0), min(centre_col + box_width - box_width // 2, width)
    out = x.copy()
    out[:, :, top:bottom, left:right] = x[partner, :, top:bottom, left:right]
    return out, partner, 1.0 - (bottom - top) * (right - left) / (height * width)


def augment_batch(x: np.ndarray, rng: np.random.Generator, flip: bool = True,
                  max_shift: int = 2) -> np.ndarray:
    """A new batch (N, C, H, W): shifted by up to max_shift pixels each way (the uncovered
    border 0) and, with `flip`, each image mirrored with probability 1/2; `augment_images` with a
    zero-padded crop of max_shift and flips."""
    if x.ndim != 4:
        raise ValueError(f"augment_batch expects (N, C, H, W), got shape {x.shape}")
    if max_shift < 0:
        raise ValueError(f"max_shift must be >= 0, got {max_shift}")
    return augment_images(x, AugmentPlan(crop=max_shift, flip=flip), rng)
