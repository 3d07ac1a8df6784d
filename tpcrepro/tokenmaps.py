"""Figures drawn over images, as PNG files under results/figures/: what a model does with its tokens.

- fig1: CLS attention over the patches at each layer (ViT/DeiT or TPC).
- fig5: which tokens each TPC layer computes, pauses, restarts and halts.
- samples: a grid of the smoke scenes with the digit's patch tokens outlined.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from tpcrepro.errors import UserError
from tpcrepro.figures import default_out, save

# token state codes of token_states()
COMPUTED, RESTARTED, PAUSED, HALTED, GONE = range(5)
STATE_NAMES = ("computed", "restarted", "paused", "halted here", "halted before")
STATE_RGBA = (
    (0.0, 0.0, 0.0, 0.0),  # computed: the image shows through
    (0.90, 0.10, 0.10, 0.60),
    (1.00, 0.75, 0.00, 0.60),
    (0.15, 0.35, 0.95, 0.60),
    (0.85, 0.85, 0.85, 0.85),
)


# ---------------------------------------------------------------- models and images

def load_run_model(recipe_id: str, seed: int = 0, checkpoint: Path | None = None) -> torch.nn.Module:
    """A recipe's model with the weights of its run, in eval mode (see jobs.load_run_model)."""
    from tpcrepro import jobs

    return jobs.load_run_model(recipe_id, seed, checkpoint)


def digits_images(n: int = 4, split: str = "val") -> tuple[torch.Tensor, torch.Tensor]:
    """The first n digits of a split: (model input in [-1, 1], display in [0, 1]), each [n, 1, 16, 16]."""
    from tpcrepro.data import DigitsDataset

    x = DigitsDataset(split).images[:n].clone()
    return x, (x + 1) / 2


def eval_images(recipe_id: str, n: int, data: Optional[str] = None) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """The first n evaluation images of the recipe's data: (model input, display in [0, 1] or None)."""
    from tpcrepro.recipe import load_recipe

    r = load_recipe(recipe_id)
    if r.data.dataset == "digits":
        return digits_images(n)
    from tpcrepro import data as data_mod

    val = data_mod.build_datasets(r.data, r.model, data).val
    x = torch.stack([val[i][0] for i in range(min(n, len(val)))])
    return x, ((x + 1) / 2 if r.data.dataset == "scenes" else None)  # scenes are in [-1, 1]: show their colours


def _display(images: torch.Tensor, display: torch.Tensor | None) -> np.ndarray:
    """[B, H, W] or [B, H, W, 3] in [0, 1]; without `display`, each image min–max scaled."""
    d = (display if display is not None else images).detach().float().cpu()
    if display is None:
        lo = d.amin(dim=(1, 2, 3), keepdim=True)
        d = (d - lo) / (d.amax(dim=(1, 2, 3), keepdim=True) - lo).clamp(min=1e-8)
    d = d.clamp(0, 1)
    return d[:, 0].numpy() if d.shape[1] == 1 else d.permute(0, 2, 3, 1).numpy()


def _show(ax, img: np.ndarray) -> tuple[int, int]:
    h, w = img.shape[:2]
    ax.imshow(img, cmap="gray" if img.ndim == 2 else None, vmin=0, vmax=1, extent=(0, w, h, 0),
              interpolation="nearest")
    ax.set_xticks([]), ax.set_yticks([])
    return h, w


def _layers(depth: int, layers: Sequence[int] | None) -> list[int]:
    layers = list(range(depth)) if layers is None else list(layers)
    bad = [i for i in layers if not 0 <= i < depth]
    if bad:
        raise UserError(f"layers {bad} out of range: the model has {depth} blocks (0-based)")
    return layers


# ---------------------------------------------------------------- figure 5

def token_states(trace: Sequence[Mapping[str, torch.Tensor]]) -> torch.Tensor:
    """Per layer and token, one of COMPUTED, RESTARTED, PAUSED, HALTED, GONE. [L, B, N] long.

    trace: forward_masked's per-layer {computed, paused, halted} ([B, N] bool; halted = halted at that
    layer, CLS at index 0). Restarted = computed at l and paused at l − 1; a token that halts at the
    layer where it restarts is HALTED. Once an image's CLS has halted, its inference is over: every
    token of it is GONE in the later layers.
    """
    out = []
    was_paused: torch.Tensor | None = None
    done: torch.Tensor | None = None  # [B]: CLS halted at an earlier layer
    for t in trace:
        computed, paused, halted = (t[k].detach().bool().cpu() for k in ("computed", "paused", "halted"))
        c = torch.full(computed.shape, GONE, dtype=torch.long)
        c[computed] = COMPUTED
        if was_paused is not None:
            c[computed & was_paused] = RESTARTED
        c[paused] = PAUSED
        c[halted] = HALTED
        if done is not None:
            c[done] = GONE
            done = done | halted[:, 0]
        else:
            done = halted[:, 0].clone()
        was_paused = paused
        out.append(c)
    return torch.stack(out)


def _is_vit_controller(model: torch.nn.Module) -> bool:
    from tpcrepro.models.vit import TPCVisionTransformer

    return isinstance(model, TPCVisionTransformer)


@torch.no_grad()
def run_trace(model: torch.nn.Module, images: torch.Tensor) -> tuple[list[dict], torch.Tensor]:
    """forward_masked in eval mode: (per-layer trace, logits)."""
    if not _is_vit_controller(model):
        raise UserError(f"{type(model).__name__} has no token controller (forward_masked); pass a TPC or A-ViT model")
    was = model.training
    model.eval()
    trace: list[dict] = []
    try:
        logits = model.forward_masked(images, trace=trace)["logits"]
    finally:
        model.train(was)
    return trace, logits


def fig5(model: torch.nn.Module, images: torch.Tensor, out: Path | None = None,
         display: torch.Tensor | None = None, layers: Sequence[int] | None = None) -> Path:
    """Rows: images; columns: layers. Each patch tinted by its state there (computed tokens left clear).

    images: the model input [B, C, H, W]; display: the same images in [0, 1] for drawing (default:
    the input min–max scaled); layers: 0-based blocks to show (default all).
    """
    device = next(model.parameters()).device
    trace, logits = run_trace(model, images.to(device))
    codes = token_states(trace)[:, :, model.num_prefix_tokens:]  # [L, B, P]
    gh, gw = model.patch_embed.grid_size
    rgba = np.array(STATE_RGBA, dtype=np.float32)
    imgs = _display(images, display)
    cols = _layers(len(trace), layers)
    pred = logits.argmax(-1).tolist()
    fig = Figure(figsize=(1.3 * len(cols) + 0.4, 1.3 * len(imgs) + 0.8))
    axes = fig.subplots(len(imgs), len(cols), squeeze=False)
    for b, img in enumerate(imgs):
        for j, layer in enumerate(cols):
            ax = axes[b, j]
            h, w = _show(ax, img)
            ax.imshow(rgba[codes[layer, b].reshape(gh, gw).numpy()], extent=(0, w, h, 0), interpolation="nearest")
            if b == 0:
                ax.set_title(f"layer {layer + 1}", fontsize=8)
        axes[b, 0].set_ylabel(f"image {b}\npred {pred[b]}", fontsize=8)
    handles = [Patch(facecolor=c if c[3] else "white", edgecolor="black", label=n)
               for n, c in zip(STATE_NAMES, STATE_RGBA)]
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=8, frameon=False)
    fig.suptitle("Token states per layer (TPC, masked form)", fontsize=10)
    fig.subplots_adjust(bottom=0.45 / fig.get_figheight(), wspace=0.05, hspace=0.1)
    return save(fig, out or default_out("fig5"))


# ---------------------------------------------------------------- figure 1

def _cls_attention_at(blk: torch.nn.Module, x: torch.Tensor, valid: torch.Tensor | None,
                      kappa: int | None) -> torch.Tensor:
    """The CLS query's attention over all keys of block input x [B, N, C], averaged over heads. [B, N]."""
    from tpcrepro.models.blocks import heads
    from tpcrepro.models.stabilizer import nearest_keys

    n = x.shape[1]
    q, k, _ = heads(blk, blk.norm1(x))
    q = q[:, :, :1]  # [B, H, 1, D]; k [B, H, N, D]
    mask = None if valid is None else valid[:, None, None, :]
    if kappa is not None and kappa < n:
        mask = nearest_keys(q, k, kappa, mask)
    logits = (q.float() @ k.float().transpose(-2, -1)) * blk.attn.scale
    if mask is not None:
        logits = logits.masked_fill(~mask, float("-inf"))
    return logits.softmax(-1)[:, :, 0].mean(1)


@torch.no_grad()
def cls_attention(model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    """CLS attention over the patch keys at each block, averaged over heads. [L, B, P].

    A timm ViT/DeiT: dense attention on each block's input. A TPC model: on the token states of
    forward_masked, with only the keys available at that layer (computed, and paused ones if
    tpc.paused_as_kv; CLS always sees itself) and its top-κ stabilizer if set.
    """
    was = model.training
    model.eval()
    try:
        if _is_vit_controller(model):
            trace, _ = run_trace(model, images)
            inputs = [model._embed(images)] + [t["x"] for t in trace[:-1]]
            kappa = model.kappa
            available = [t["computed"] | (t["paused"] if model.tpc.paused_as_kv else torch.zeros_like(t["paused"]))
                         for t in trace]
        else:
            x = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(images))))
            inputs, kappa, available = [], None, None
            for blk in model.blocks:
                inputs.append(x)
                x = blk(x)
        maps = []
        for i, (blk, x) in enumerate(zip(model.blocks, inputs)):
            valid = None
            if available is not None:
                valid = available[i].clone()
                valid[:, 0] = True
            maps.append(_cls_attention_at(blk, x, valid, kappa)[:, model.num_prefix_tokens:])
    finally:
        model.train(was)
    return torch.stack(maps)


def fig1(model: torch.nn.Module | Mapping[str, torch.nn.Module], images: torch.Tensor,
         out: Path | None = None, display: torch.Tensor | None = None,
         layers: Sequence[int] | None = None) -> Path:
    """Rows: (model, image); columns: the image, then the CLS attention map of each layer over it.

    model: one model or {label: model} (e.g. a ViT and its TPC model, same patch grid); each map is
    scaled to its own maximum. images, display, layers: as for fig5.
    """
    models = dict(model) if isinstance(model, Mapping) else {type(model).__name__: model}
    imgs = _display(images, display)
    rows = []
    for label, m in models.items():
        device = next(m.parameters()).device
        att = cls_attention(m, images.to(device)).cpu()
        rows += [(label, b, att[:, b], tuple(m.patch_embed.grid_size)) for b in range(len(imgs))]
    cols = _layers(len(rows[0][2]), layers)
    fig = Figure(figsize=(1.3 * (len(cols) + 1) + 0.4, 1.3 * len(rows) + 0.5))
    axes = fig.subplots(len(rows), len(cols) + 1, squeeze=False)
    for r, (label, b, att, (gh, gw)) in enumerate(rows):
        h, w = _show(axes[r, 0], imgs[b])
        axes[r, 0].set_ylabel(f"{label}\nimage {b}", fontsize=7)
        for j, layer in enumerate(cols):
            ax = axes[r, j + 1]
            _show(ax, imgs[b])
            a = att[layer].reshape(gh, gw)
            ax.imshow((a / a.max().clamp(min=1e-12)).numpy(), cmap="jet", alpha=0.5, vmin=0, vmax=1,
                      extent=(0, w, h, 0), interpolation="nearest")
            if r == 0:
                ax.set_title(f"layer {layer + 1}", fontsize=8)
    axes[0, 0].set_title("image", fontsize=8)
    fig.suptitle("CLS attention over patches per layer (mean over heads)", fontsize=10)
    fig.subplots_adjust(wspace=0.05, hspace=0.1)
    return save(fig, out or default_out("fig1"))


# ---------------------------------------------------------------- the smoke data

def samples(out: Path | None = None, recipe_id: str = "smoke/vit", n: int = 32, cols: int = 8) -> Path:
    """A grid of validation scenes of the recipe's data (tpcrepro/scenes.py), the digit's patch tokens outlined."""
    from matplotlib.patches import Rectangle

    from tpcrepro.recipe import load_recipe
    from tpcrepro.scenes import ScenesDataset, token_coverage

    r = load_recipe(recipe_id)
    if r.data.dataset != "scenes":
        raise UserError(f"{recipe_id} trains on '{r.data.dataset}', not on scenes; pick a scenes recipe (smoke/vit)")
    patch = int(r.model.kwargs.get("patch_size", 4))
    ds = ScenesDataset("val", r.data.scenes)
    drawn = [ds.scene(i) for i in range(min(n, len(ds)))]
    rows = -(-len(drawn) // cols)
    fig = Figure(figsize=(1.6 * cols, 1.8 * rows))
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax, (img, label, mask) in zip(axes.flat, drawn):
        _show(ax, img.transpose(1, 2, 0))
        g = mask.shape[0] // patch
        touched = mask[: g * patch, : g * patch].reshape(g, patch, g, patch).max(axis=(1, 3)) > 0.25
        for py, px in zip(*np.nonzero(touched)):
            ax.add_patch(Rectangle((px * patch, py * patch), patch, patch, fill=False, lw=0.6, ec="white"))
        cov = token_coverage(mask[None], patch)[0]
        ax.set_title(f"{label}  ({100 * cov:.0f} % of tokens)", fontsize=7)
    for ax in list(axes.flat)[len(drawn):]:
        ax.axis("off")
    masks = np.stack([ds.scene(i)[2] for i in range(min(len(ds), 1000))])
    fig.suptitle(f"Validation scenes of {recipe_id} ({r.data.scenes.canvas}×{r.data.scenes.canvas}, patch {patch}): "
                 f"the digit touches {100 * token_coverage(masks, patch).mean():.1f} % of the patch tokens "
                 f"(mean of {len(masks)}; outlined)", fontsize=9)
    return save(fig, out or default_out("samples"))
