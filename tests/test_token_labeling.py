"""LV-ViT token labeling: dense targets aligned with the crop, MixToken, the loss, and a training run."""

from __future__ import annotations

import random

import pytest
import timm
import torch

import tpcrepro.models  # noqa: F401
from tpcrepro import token_labeling as tl
from tpcrepro.errors import UserError

from conftest import make_image_folder


def test_box_swap_is_its_own_inverse_and_lam_is_the_kept_area():
    (y0, y1, x0, x1), lam = tl.rand_box((8, 8), 0.6, random.Random(0))
    assert 0.0 <= lam <= 1.0 and abs(lam - (1 - (y1 - y0) * (x1 - x0) / 64)) < 1e-9
    t = torch.randn(4, 64, 5)
    mixed = tl.swap_box(t, (8, 8), (2, 5, 1, 4))
    assert torch.equal(tl.swap_box(mixed, (8, 8), (2, 5, 1, 4)), t)
    grid = mixed.reshape(4, 8, 8, 5)
    assert torch.equal(grid[0, 2:5, 1:4], t.reshape(4, 8, 8, 5)[3, 2:5, 1:4])  # the box comes from the flipped batch
    assert torch.equal(grid[0, 0], t.reshape(4, 8, 8, 5)[0, 0])


def test_mixed_targets_weigh_the_two_labels_by_area():
    y = torch.tensor([0, 1, 2])
    t = tl.mix_targets(y, 3, 0.75, 0.0)
    assert torch.allclose(t.sum(1), torch.ones(3))
    assert torch.allclose(t[0], torch.tensor([0.75, 0.0, 0.25]))


def test_crop_map_follows_the_crop_and_the_flip():
    score = torch.zeros(2, 8, 8)
    score[0, :, :4] = 1.0  # left half: class 0
    score[1, :, 4:] = 1.0  # right half: class 1
    full = tl.crop_map(score, (0, 0, 64, 64), (2, 2), False, (64, 64))  # [4, 2]
    assert full.argmax(1).tolist() == [0, 1, 0, 1]
    assert torch.allclose(full.sum(1), torch.ones(4))
    flipped = tl.crop_map(score, (0, 0, 64, 64), (2, 2), True, (64, 64))
    assert flipped.argmax(1).tolist() == [1, 0, 1, 0]
    left = tl.crop_map(score, (0, 0, 64, 32), (2, 2), False, (64, 64))  # the left half of the image only
    assert left.argmax(1).tolist() == [0, 0, 0, 0]


def test_topk_maps_scatter_into_dense_scores(tmp_path):
    values = torch.tensor([[[[0.7]]], [[[0.2]]]]).reshape(2, 1, 1)
    topk = torch.stack([torch.tensor([[[0.7]], [[0.2]]]), torch.tensor([[[3.0]], [[1.0]]])])  # [2, k=2, 1, 1]
    torch.save(topk, tmp_path / "m.pt")
    dense = tl.read_map(tmp_path / "m.pt", 5)
    assert dense.shape == (5, 1, 1) and dense[3, 0, 0] == pytest.approx(0.7) and dense[1, 0, 0] == pytest.approx(0.2)
    assert values.numel() == 2
    torch.save(torch.zeros(3, 3), tmp_path / "bad.pt")
    with pytest.raises(UserError, match="expected"):
        tl.read_map(tmp_path / "bad.pt", 5)
    with pytest.raises(UserError, match="no token-label map"):
        tl.read_map(tmp_path / "none.pt", 5)


@pytest.mark.parametrize("name", ["lvvit_smoke", "tpc_lvvit_smoke"])
def test_dense_outputs_unmix_the_box(name):
    torch.manual_seed(0)
    model = timm.create_model(name).eval()
    x = torch.randn(3, 1, 16, 16)
    with torch.no_grad():
        plain = model.forward_token_labels(x)
        empty = model.forward_token_labels(x, box=(0, 0, 0, 0))  # an empty box mixes nothing
        mixed = model.forward_token_labels(x, box=(0, 8, 0, 4))
        pred = model(x)
    assert plain["aux_tokens"].shape == (3, 64, 10)
    assert torch.allclose(plain["aux_tokens"], empty["aux_tokens"], atol=1e-6)
    assert torch.allclose(pred, plain["logits"] + 0.5 * plain["aux_tokens"].max(1).values, atol=1e-5)
    assert not torch.allclose(mixed["logits"], plain["logits"])


def test_token_labeling_trains_an_lvvit_end_to_end(tmp_path):
    from tpcrepro.jobs import run_job
    from tpcrepro.recipe import load_recipe

    root = make_image_folder(tmp_path / "data", per_class=4, size=32)
    maps = tmp_path / "maps"
    for c, cls in enumerate(("a", "b")):
        (maps / cls).mkdir(parents=True)
        for i in range(4):
            m = torch.zeros(2, 4, 4)
            m[c] = 1.0
            torch.save(m, maps / cls / f"{i}.pt")
    recipe = tmp_path / "tl.yaml"
    recipe.write_text(
        "profile: smoke\n"
        "model: {name: lvvit_smoke, num_classes: 2, img_size: 32, in_chans: 3}\n"
        f"data: {{dataset: folder, root: {root}, workers: 0, token_labels: {maps},\n"
        "       aug: {auto_augment: null, re_prob: 0.0, smoothing: 0.1}}\n"
        "train: {epochs: 2, batch_size: 4, warmup_epochs: 0, lr: 1.0e-3}\n"
        "eval: {batch_size: 8}\n"
    )
    rec = run_job(load_recipe(str(recipe)), "train", 0)
    assert rec.status == "done" and rec.metrics["epochs"] == 2
    assert rec.metrics["final_train_loss"] > 0
