"""Shared fixtures: isolated results/runs folders, tiny ImageFolder data, fast smoke overrides."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("TPCREPRO_NO_PROGRESS", "1")

# A short smoke run: 2 epochs on 128 training images, 64 val images.
FAST = ("train.epochs=2", "train.warmup_epochs=1", "data.subset_train=128", "data.subset_val=64", "train.batch_size=32")


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    """Every test writes records and runs under its own tmp_path, never into the repo."""
    monkeypatch.setenv("TPCREPRO_RESULTS", str(tmp_path / "results"))
    monkeypatch.setenv("TPCREPRO_RUNS", str(tmp_path / "runs"))
    torch.set_num_threads(2)
    yield


def make_image_folder(root, classes=("a", "b"), per_class=3, size=32, splits=("train", "val")):
    from PIL import Image
    import numpy as np

    rng = np.random.default_rng(0)
    for split in splits:
        for c in classes:
            d = root / split / c
            d.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                arr = rng.integers(0, 255, (size, size, 3), dtype=np.uint8)
                Image.fromarray(arr).save(d / f"{i}.png")
    return root


@pytest.fixture
def image_folder(tmp_path):
    return make_image_folder(tmp_path / "data")


requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
