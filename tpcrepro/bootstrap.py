"""Paired bootstrap over validation images: is a top-1 difference real?

Every train record keeps each validation image's top-1 hit (`correct_top1`,
packed bits in data-set order), and every run of a profile sees the same
validation images, so two rows can be compared image by image. A row's runs
over several seeds are pooled: its accuracy on a resample of images is the
mean hit over its seeds and those images. A contrast is a weighted sum of
rows' accuracies (a − b: weights +1, −1; b read off a curve between two
points at a's MACs: −(1 − w), −w), and its 95 % interval the 2.5 and 97.5
percentiles over resamples, the same resample for every row.

What is resampled is the unit drawn independently: an image, or a cluster of
images that share what makes them hard. The smoke scenes show each held-out
digit in several scenes (scenes.val_clusters), and a glyph that one method
misreads it misreads in most of its scenes: resampling scenes one by one
treats those as independent and gives intervals too narrow (by 15-20 % for
the smoke rows' differences, measured on the committed records). So with
`clusters` the bootstrap resamples clusters, each with all its images, and a
resample's value is the mean over the images it holds.

The interval measures the validation set's sampling noise (with seeds
pooled); training noise between seeds shows as the ± in the tables.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

N_BOOT = 2000
SEED = 0


@dataclass(frozen=True)
class Interval:
    diff: float  # points of top-1 on the full validation set
    lo: float
    hi: float

    @property
    def half_width(self) -> float:
        return (self.hi - self.lo) / 2


def contrast(terms: Sequence[tuple[float, np.ndarray]], n_boot: int = N_BOOT, seed: int = SEED,
             level: float = 0.95, clusters: Optional[np.ndarray] = None) -> Interval:
    """Σ weight · top-1(hits) in points, with its bootstrap interval.

    terms: (weight, hits) with hits bool [seeds, n] (or [n]); every hits array covers the same n images in the
    same order. Images (clusters: int [n], each image's cluster, then clusters with all their images) are
    resampled with replacement, the same resample for every term.
    """
    rows = [(float(w), np.atleast_2d(np.asarray(h, dtype=bool))) for w, h in terms]
    n = rows[0][1].shape[1]
    if any(h.shape[1] != n for _, h in rows):
        raise ValueError(f"every row must cover the same validation images; got {[h.shape[1] for _, h in rows]}")
    per_image = sum(w * h.mean(axis=0) for w, h in rows)  # [n]: the contrast's value on each image
    rng = np.random.default_rng(seed)
    if clusters is None:
        sums, sizes = per_image, None
    else:
        clusters = np.asarray(clusters)
        if clusters.shape != (n,):
            raise ValueError(f"clusters must give one cluster per image ({n}), got shape {clusters.shape}")
        _, ids = np.unique(clusters, return_inverse=True)
        sums, sizes = np.bincount(ids, weights=per_image), np.bincount(ids).astype(float)
    m = len(sums)
    boot = np.empty(n_boot)
    for start in range(0, n_boot, 250):  # chunks keep the index array small
        idx = rng.integers(0, m, size=(min(250, n_boot - start), m))
        boot[start:start + len(idx)] = (sums[idx].mean(axis=1) if sizes is None
                                        else sums[idx].sum(axis=1) / sizes[idx].sum(axis=1))
    a = (1 - level) / 2
    lo, hi = np.quantile(boot, [a, 1 - a])
    return Interval(diff=100.0 * float(per_image.mean()), lo=100.0 * float(lo), hi=100.0 * float(hi))


def difference(a: np.ndarray, b: np.ndarray, **kw) -> Interval:
    """top-1(a) − top-1(b) in points, paired over images, seeds pooled."""
    return contrast([(1.0, a), (-1.0, b)], **kw)


def interpolation_weights(x: float, xs: Sequence[float]) -> tuple[list[float], str]:
    """Weights of the points (MACs xs) that read a curve at x linearly; outside the curve: its nearest point.

    Returns (weights in the order of xs, how it was read).
    """
    order = sorted(range(len(xs)), key=lambda i: xs[i])
    w = [0.0] * len(xs)
    lo, hi = order[0], order[-1]
    if len(xs) == 1:
        return [1.0], "the only point"
    if x <= xs[lo] or x >= xs[hi]:
        near = lo if abs(x - xs[lo]) <= abs(x - xs[hi]) else hi
        w[near] = 1.0
        return w, "at the point" if abs(xs[near] - x) <= 1e-9 * max(1.0, abs(x)) else "nearest point (outside the curve)"
    for i, j in zip(order, order[1:]):
        if xs[i] <= x <= xs[j]:
            t = (x - xs[i]) / (xs[j] - xs[i]) if xs[j] > xs[i] else 0.0
            w[i], w[j] = 1.0 - t, t
            break
    return w, "interpolated"
