"""Digits in scenes: an embedded data set with ImageNet-like token redundancy.

In the spirit of MNIST-M (digits blended over natural-image patches) and
cluttered MNIST (digits among fragments of other digits), built only from
data that ships inside scikit-learn, so it needs no download:

- **canvas**: `canvas`×`canvas` RGB (32×32 by default: 8×8 patches of 4×4
  pixels, 64 patch tokens + CLS, the token count of the digits profile).
- **background**: a crop of `china.jpg` or `flower.jpg`
  (`sklearn.datasets.load_sample_images`) at one of four scales (box-filtered
  ÷2…÷5, so a crop covers 64-160 source pixels), flipped horizontally and
  vertically at random, with colour jitter (a gain per channel, contrast).
  Training crops come from the left three quarters of each photograph,
  validation crops from the right quarter.
- **clutter**: `clutter` fragments (a random square of `fragment` × the
  glyph's side) of other digits, each in its own colour, at opacity
  `clutter_alpha`.
- **digit**: one scikit-learn digit (8×8 scan) upscaled to a random side in
  [`digit_min`, `digit_max`] pixels, at a random position (uniform over the
  middle `spread` of the positions where it fits), blended over the
  rest with its scan as alpha and a random colour whose luminance differs
  from the pixels under it by at least `contrast`. Its label is the label.
- **split**: scikit-learn's 1797 digits split once, stratified, into
  `val_digits` held out (360 by default: the digits profile's 1437/360
  split, `random_state=0`) and the rest; training scenes draw digit and
  clutter only from the rest, validation scenes only from the held-out ones.
- **determinism**: scene `i` of epoch `e` for seed `s` is drawn from
  `numpy.random.default_rng([s, e, i])`: any sampler order, DataLoader
  worker, DDP rank or resumed run sees the same scene. Training draws a
  fresh scene for every image every epoch (`train_size` per epoch); the
  validation set is fixed (`val_size` scenes from `default_rng([VAL_SEED, i])`,
  the same for every seed; scene i shows held-out digit i mod `val_digits`:
  `val_clusters` gives that digit per scene, the unit the claims' bootstrap
  resamples, since scenes of one glyph are not independent).

Each scene also has its digit's alpha mask; `token_coverage` gives the
fraction of patch tokens the digit touches (the redundancy that token
reduction exploits: on average most tokens are background).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

VAL_SEED = 2_147_483_647  # validation scenes: one fixed stream, apart from every training seed
DIGITS_VAL = 360
LEVELS = (2, 3, 4, 5)  # background scales: one canvas pixel = this many source pixels
LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)


@dataclass(frozen=True)
class ScenesCfg:
    canvas: int = 32
    train_size: int = 8192  # fresh scenes per training epoch
    val_size: int = 3000  # fixed validation scenes
    val_digits: int = DIGITS_VAL  # held-out digits (scikit-learn's digits split stratified, random_state=0)
    digit_min: int = 10  # side of the upscaled digit, pixels
    digit_max: int = 14
    clutter: int = 4  # fragments of other digits per scene
    fragment: float = 0.5  # a fragment's side ÷ the glyph's side
    clutter_alpha: float = 1.0  # a fragment's opacity (the digit's is 1)
    polarity: int = 0  # 1: strokes brighter than the background under them; 0: brighter or darker
    brightness: float = 1.0  # the background's gains are drawn in [0.6, 1.4] × this
    spread: float = 1.0  # the digit's centre: uniform over this fraction of the free range around the middle
    contrast: float = 0.25  # least luminance difference between a stroke's colour and what lies under it
    texture: float = 1.0  # the background's contrast about its mean is drawn in [0.5, 1.2] × this

    def __post_init__(self):
        if not 8 <= self.digit_min <= self.digit_max <= self.canvas:
            raise ValueError(f"data.scenes needs 8 <= digit_min <= digit_max <= canvas, got "
                             f"{self.digit_min}, {self.digit_max}, {self.canvas}")
        if self.train_size < 1 or self.val_size < 1 or self.clutter < 0 or not 0 < self.fragment <= 1:
            raise ValueError("data.scenes: train_size and val_size must be >= 1, clutter >= 0, 0 < fragment <= 1")
        if not 10 <= self.val_digits <= 1787:
            raise ValueError(f"data.scenes.val_digits must be in [10, 1787] (scikit-learn has 1797 digits, 10 classes), "
                             f"got {self.val_digits}")


# ---------------------------------------------------------------- assets

@dataclass(frozen=True)
class Assets:
    """What scenes of one split are made of: glyphs per side, their labels, background pyramids."""

    glyphs: dict  # side -> float32 [n, side, side] in [0, 1]
    labels: np.ndarray  # int64 [n]
    backgrounds: tuple  # float32 [h, w, 3] in [0, 1], each at least canvas × canvas


def digit_split(val_digits: int = DIGITS_VAL) -> tuple[np.ndarray, np.ndarray]:
    """Indices of scikit-learn's digits for training and validation (stratified, `val_digits` held out, random_state=0)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    target = load_digits().target
    idx_train, idx_val = train_test_split(np.arange(len(target)), test_size=val_digits, stratify=target, random_state=0)
    return np.asarray(idx_train), np.asarray(idx_val)


def _glyphs(images: np.ndarray, sides: range) -> dict:
    """[n, 8, 8] scans in [0, 1] -> {side: [n, side, side]}, bilinear as the digits profile upsamples."""
    import torch
    import torch.nn.functional as F

    x = torch.from_numpy(images).unsqueeze(1)
    return {k: F.interpolate(x, size=(k, k), mode="bilinear", align_corners=False)[:, 0].clamp(0, 1).numpy()
            for k in sides}


def _backgrounds(split: str, canvas: int) -> tuple:
    """Box-filtered pyramids of the left 3/4 (train) or right 1/4 (val) of each sample photograph."""
    from PIL import Image
    from sklearn.datasets import load_sample_images

    out = []
    for img in load_sample_images().images:  # china.jpg, flower.jpg: uint8 [427, 640, 3]
        cut = img.shape[1] * 3 // 4
        region = img[:, :cut] if split == "train" else img[:, cut:]
        pil = Image.fromarray(np.ascontiguousarray(region))
        for f in LEVELS:
            w, h = pil.width // f, pil.height // f
            if min(w, h) >= canvas:
                out.append(np.asarray(pil.resize((w, h), Image.BOX), dtype=np.float32) / 255.0)
    return tuple(out)


@lru_cache(maxsize=4)
def assets(split: str, canvas: int, digit_min: int, digit_max: int, val_digits: int = DIGITS_VAL) -> Assets:
    from sklearn.datasets import load_digits

    digits = load_digits()
    idx = digit_split(val_digits)[0 if split == "train" else 1]
    images = (digits.images[idx] / 16.0).astype(np.float32)
    return Assets(glyphs=_glyphs(images, range(digit_min, digit_max + 1)),
                  labels=digits.target[idx].astype(np.int64), backgrounds=_backgrounds(split, canvas))


# ---------------------------------------------------------------- one scene

class _Draws:
    """Uniforms of one scene drawn in a single call (one call per scene is what keeps generation fast)."""

    def __init__(self, rng: np.random.Generator, n: int):
        self.u, self.i = rng.random(n), 0

    def uniform(self, lo: float = 0.0, hi: float = 1.0, size: int = 0):
        if size:
            out = lo + (hi - lo) * self.u[self.i:self.i + size]
            self.i += size
            return out.astype(np.float32)
        self.i += 1
        return lo + (hi - lo) * float(self.u[self.i - 1])

    def integer(self, lo: int, hi: int) -> int:
        """Uniform in [lo, hi)."""
        return min(hi - 1, lo + int(self.uniform() * (hi - lo)))


def _colour(r: _Draws, under: np.ndarray, contrast: float, polarity: int = 0) -> np.ndarray:
    """A random RGB colour whose luminance is at least `contrast` above (polarity 1) or away from (0) the mean
    of `under` [h, w, 3]."""
    c = r.uniform(size=3)
    lum_under, lum = float(under.mean(axis=(0, 1)) @ LUMA), float(c @ LUMA)
    if polarity > 0 and lum < lum_under + contrast:  # strokes brighter than what lies under them
        c = np.clip(c + (min(1.0, lum_under + contrast) - lum), 0.0, 1.0)
    elif polarity == 0 and abs(lum - lum_under) < contrast:  # either way: away, towards the side with more room
        target = lum_under + contrast if lum_under < 0.5 else lum_under - contrast
        c = np.clip(c + (target - lum), 0.0, 1.0)
    return c


def _blend(canvas: np.ndarray, alpha: np.ndarray, colour: np.ndarray, y: int, x: int) -> None:
    """Alpha-blend a [h, w] alpha of one colour into canvas [H, W, 3] at (y, x), in place."""
    h, w = alpha.shape
    region = canvas[y:y + h, x:x + w]
    region += alpha[..., None] * (colour - region)


def draw(cfg: ScenesCfg, a: Assets, rng: np.random.Generator, digit: int | None = None):
    """One scene -> (image float32 [3, C, C] in [0, 1], label, digit alpha mask float32 [C, C]).

    `digit` picks the main digit (an index into the split's digits); None draws one.
    """
    C, n = cfg.canvas, len(a.labels)
    r = _Draws(rng, 16 + 9 * cfg.clutter)
    bg = a.backgrounds[r.integer(0, len(a.backgrounds))]
    y, x = r.integer(0, bg.shape[0] - C + 1), r.integer(0, bg.shape[1] - C + 1)
    img = bg[y:y + C, x:x + C]
    if r.uniform() < 0.5:
        img = img[:, ::-1]
    if r.uniform() < 0.5:
        img = img[::-1]
    img = img * (cfg.brightness * r.uniform(0.6, 1.4, size=3))  # colour jitter: a gain per channel ...
    mean = img.mean()
    img = np.clip((img - mean) * (cfg.texture * r.uniform(0.5, 1.2)) + mean, 0.0, 1.0)  # ... and contrast
    main = r.integer(0, n) if digit is None else int(digit)
    for _ in range(cfg.clutter):  # fragments of other digits, under the digit
        other = r.integer(0, n - 1)
        other += other >= main
        k = r.integer(cfg.digit_min, cfg.digit_max + 1)
        f = max(2, round(k * cfg.fragment))
        gy, gx = r.integer(0, k - f + 1), r.integer(0, k - f + 1)
        frag = a.glyphs[k][other, gy:gy + f, gx:gx + f]
        py, px = r.integer(0, C - f + 1), r.integer(0, C - f + 1)
        _blend(img, frag * cfg.clutter_alpha, _colour(r, img[py:py + f, px:px + f], cfg.contrast, cfg.polarity), py, px)
    k = r.integer(cfg.digit_min, cfg.digit_max + 1)
    glyph = a.glyphs[k][main]
    free = C - k  # the digit's top-left corner lies in [0, free]; `spread` narrows that around free / 2
    lo = int(round(free * (1 - cfg.spread) / 2))
    py, px = r.integer(lo, free - lo + 1), r.integer(lo, free - lo + 1)
    _blend(img, glyph, _colour(r, img[py:py + k, px:px + k], cfg.contrast, cfg.polarity), py, px)
    mask = np.zeros((C, C), dtype=np.float32)
    mask[py:py + k, px:px + k] = glyph
    return np.ascontiguousarray(img.transpose(2, 0, 1), dtype=np.float32), int(a.labels[main]), mask


def val_clusters(cfg: ScenesCfg) -> np.ndarray:
    """The held-out digit each validation scene shows (scene i: digit i mod val_digits). int64 [val_size].

    Scenes of one glyph share its difficulty, so they are not independent draws: the claims' bootstrap
    resamples these digits, each with all its scenes."""
    return np.arange(cfg.val_size) % cfg.val_digits


def digit_tokens(masks: np.ndarray, patch: int, threshold: float = 0.25) -> np.ndarray:
    """Which patch tokens the digit touches (a pixel of alpha > threshold). masks [B, C, C] -> bool [B, g, g]."""
    b, c, _ = masks.shape
    g = c // patch
    return masks[:, : g * patch, : g * patch].reshape(b, g, patch, g, patch).max(axis=(2, 4)) > threshold


def token_coverage(masks: np.ndarray, patch: int, threshold: float = 0.25) -> np.ndarray:
    """Fraction of patch tokens the digit touches, per scene. masks [B, C, C] -> [B]."""
    return digit_tokens(masks, patch, threshold).mean(axis=(1, 2))


# ---------------------------------------------------------------- dataset

class ScenesDataset:
    """A torch Dataset of scenes: (image [3, C, C] in [-1, 1], label). `set_epoch` picks training's fresh scenes."""

    def __init__(self, split: str, cfg: ScenesCfg = ScenesCfg(), seed: int = 0):
        if split not in ("train", "val"):
            raise ValueError(f"split must be train or val, got {split!r}")
        self.split, self.cfg, self.seed, self.epoch = split, cfg, seed, 0
        self.assets = assets(split, cfg.canvas, cfg.digit_min, cfg.digit_max, cfg.val_digits)
        self.classes = [str(i) for i in range(10)]

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.cfg.train_size if self.split == "train" else self.cfg.val_size

    def rng(self, i: int) -> np.random.Generator:
        key = [self.seed, self.epoch, i] if self.split == "train" else [VAL_SEED, i]
        return np.random.default_rng(key)

    def scene(self, i: int):
        """(image [3, C, C] in [0, 1], label, mask [C, C]) of scene i."""
        if not 0 <= i < len(self):
            raise IndexError(i)
        digit = None if self.split == "train" else i % len(self.assets.labels)
        return draw(self.cfg, self.assets, self.rng(i), digit)

    def __getitem__(self, i: int):
        import torch

        img, label, _ = self.scene(i)
        return torch.from_numpy(img * 2.0 - 1.0), label  # [0, 1] -> [-1, 1]
