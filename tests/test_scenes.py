"""Digits in scenes: deterministic, split-disjoint, sparse digits; the smoke recipes use them."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tpcrepro import data, scenes
from tpcrepro.recipe import load_recipe

SMALL = scenes.ScenesCfg(train_size=64, val_size=40)


def test_same_key_same_scene_other_key_other_scene():
    a, b = scenes.ScenesDataset("train", SMALL, seed=3), scenes.ScenesDataset("train", SMALL, seed=3)
    a.set_epoch(2), b.set_epoch(2)
    assert torch.equal(a[5][0], b[5][0]) and a[5][1] == b[5][1]  # (seed, epoch, index) fixes the scene
    assert torch.equal(b[5][0], b[5][0])  # order of access does not matter
    b.set_epoch(3)
    assert not torch.equal(a[5][0], b[5][0])  # a fresh scene every epoch
    c = scenes.ScenesDataset("train", SMALL, seed=4)
    c.set_epoch(2)
    assert not torch.equal(a[5][0], c[5][0])  # and every seed


def test_validation_is_fixed_and_independent_of_seed_and_epoch():
    v0, v1 = scenes.ScenesDataset("val", SMALL, seed=0), scenes.ScenesDataset("val", SMALL, seed=7)
    v1.set_epoch(5)
    assert all(torch.equal(v0[i][0], v1[i][0]) for i in range(5))
    x, y = v0[0]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and -1.0 <= x.min() and x.max() <= 1.0
    assert 0 <= y < 10


def test_held_out_digits_never_reach_training():
    train_idx, val_idx = scenes.digit_split()
    assert len(val_idx) == 360 and not set(train_idx) & set(val_idx)
    tr = scenes.assets("train", 32, 10, 14)
    va = scenes.assets("val", 32, 10, 14)
    g_tr, g_va = tr.glyphs[10].reshape(len(tr.labels), -1), va.glyphs[10].reshape(len(va.labels), -1)
    # no validation glyph equals a training glyph (sklearn's digits hold no exact duplicates across this split)
    d = ((g_va[:, None, :] - g_tr[None, :, :]) ** 2).sum(-1)
    assert d.min() > 0
    # validation scenes show held-out digit i mod 360: balanced classes
    ds = scenes.ScenesDataset("val", scenes.ScenesCfg(val_size=720))
    labels = [ds.scene(i)[1] for i in range(720)]
    assert labels[:360] == labels[360:] == va.labels.tolist()


def test_digit_mask_and_token_coverage():
    ds = scenes.ScenesDataset("val", scenes.ScenesCfg(val_size=200))
    masks = np.stack([ds.scene(i)[2] for i in range(200)])
    cov = scenes.token_coverage(masks, 4)
    assert cov.shape == (200,) and (cov > 0).all()  # every scene has its digit
    assert cov.mean() <= 0.30  # most tokens are background (the calibration's bound)
    full = np.ones((1, 32, 32), dtype=np.float32)
    assert scenes.token_coverage(full, 4)[0] == 1.0
    one = np.zeros((1, 32, 32), dtype=np.float32)
    one[0, 5, 5] = 1.0
    assert scenes.token_coverage(one, 4)[0] == 1 / 64


def test_bad_config_is_a_user_error(tmp_path):
    from tpcrepro.errors import UserError

    with pytest.raises(UserError, match="digit_min"):
        load_recipe("smoke/vit", ("data.scenes.digit_min=40",))
    r = load_recipe("smoke/vit", ("model.img_size=16",))
    with pytest.raises(UserError, match="img_size=32"):
        data.build_datasets(r.data, r.model)


def test_the_scenes_recipe_trains_on_scenes_and_sets_draw_per_epoch():
    r = load_recipe("smoke/vit", ("data.scenes.train_size=8", "data.scenes.val_size=4"))
    assert r.data.dataset == "scenes" and (r.model.img_size, r.model.in_chans) == (32, 3)
    ds = data.build_datasets(r.data, r.model, seed=1)
    assert len(ds.train) == 8 and len(ds.val) == 4
    first = ds.train[0][0]
    data.set_epoch(ds.train, 1)
    assert not torch.equal(first, ds.train[0][0])
    sub = torch.utils.data.Subset(ds.train, [0, 1])
    data.set_epoch(sub, 0)
    assert torch.equal(first, sub[0][0])  # through a Subset too
