"""Data: the embedded digits split, ImageFolder errors, corrupt images skipped and counted."""

from __future__ import annotations

import os

import pytest
import torch

from tpcrepro import data
from tpcrepro.errors import UserError
from tpcrepro.recipe import DataCfg, ModelCfg, load_recipe


def test_digits_fixed_stratified_split():
    tr, va = data.DigitsDataset("train"), data.DigitsDataset("val")
    assert (len(tr), len(va)) == (1437, 360)
    assert tr.images.shape[1:] == (1, 16, 16)
    counts = torch.bincount(va.labels, minlength=10)
    assert counts.min() >= 35 and counts.max() <= 37  # stratified: 36 per class
    assert torch.equal(data.DigitsDataset("val").images, va.images)  # fixed
    assert -1.0 <= tr.images.min() and tr.images.max() <= 1.0


def test_digits_translation_stays_in_frame():
    ds = data.DigitsDataset("train", translate=1)
    torch.manual_seed(0)
    x, _ = ds[0]
    assert x.shape == (1, 16, 16)
    assert abs(x.sum() - ds.images[0].sum()) < 40  # shifted by at most a pixel, not rescaled


def _cfgs(root=None, n_cls=2):
    r = load_recipe("smoke/vit")
    dcfg = DataCfg(dataset="folder", root=str(root) if root else None, workers=0,
                   aug=r.data.aug.__class__(auto_augment=None, re_prob=0.0, mixup=0.0, cutmix=0.0))
    return dcfg, ModelCfg(name="vit_smoke_patch2_16", num_classes=n_cls, img_size=16, in_chans=3)


def test_missing_data_dir_is_one_line_error(tmp_path, monkeypatch):
    monkeypatch.delenv(data.DATA_ENV, raising=False)
    dcfg, mcfg = _cfgs(tmp_path / "nowhere")
    with pytest.raises(UserError, match="does not exist; pass --data"):
        data.build_datasets(dcfg, mcfg)
    dcfg, mcfg = _cfgs(None)
    with pytest.raises(UserError, match="TPCREPRO_DATA"):
        data.build_datasets(dcfg, mcfg)


def test_missing_split_folder(image_folder):
    import shutil

    shutil.rmtree(image_folder / "val")
    dcfg, mcfg = _cfgs(image_folder)
    with pytest.raises(UserError, match="no 'val/' folder"):
        data.build_datasets(dcfg, mcfg)


def test_empty_class_folder(image_folder):
    (image_folder / "train" / "c").mkdir()
    dcfg, mcfg = _cfgs(image_folder, n_cls=3)
    with pytest.raises(UserError, match="at least one image"):
        data.build_datasets(dcfg, mcfg)


def test_class_count_mismatch_names_the_fix(image_folder):
    dcfg, mcfg = _cfgs(image_folder, n_cls=5)
    with pytest.raises(UserError, match="model.num_classes=2"):
        data.build_datasets(dcfg, mcfg)


def test_unreadable_dir(image_folder, monkeypatch):
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if str(p).endswith("train") else real(p, mode))
    with pytest.raises(UserError, match="permission denied; fix the permissions"):
        data.build_datasets(*_cfgs(image_folder))


def test_corrupt_image_is_skipped_and_counted(image_folder):
    (image_folder / "val" / "a" / "0.png").write_bytes(b"not a png at all")
    dcfg, mcfg = _cfgs(image_folder)
    ds = data.build_datasets(dcfg, mcfg)
    loader = data.eval_loader(ds.val, batch_size=4, workers=0)
    seen = skipped = 0
    paths = []
    for x, y, bad in loader:
        skipped += len(bad)
        paths += bad
        seen += 0 if x is None else len(x)
    assert (seen, skipped) == (5, 1)
    assert paths == [str(image_folder / "val" / "a" / "0.png")]


def test_subset_is_a_fixed_sample():
    tr = data.DigitsDataset("train")
    a, b = data._subset(tr, 100), data._subset(tr, 100)
    assert len(a) == 100 and a.indices == b.indices
