"""The paper's figures as PNG files under results/figures/.

- fig1: CLS attention over the patches at each layer (ViT/DeiT or TPC).
- fig4: top-1 per epoch with and without the stabilizer (from the runs' metrics.jsonl).
- fig5: which tokens each TPC layer computes, pauses, restarts and halts.
- tradeoff: top-1 against MACs, one line per method with its budget knob swept.
"""

from __future__ import annotations

import io
import json
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import numpy as np
import torch
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from tpcrepro import paths, records
from tpcrepro.errors import UserError
from tpcrepro.progress import log

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

FIG4_PAIRS = {
    "smoke": [("w/o stabilizer", "smoke/tpc"), ("w/ stabilizer κ=33", "smoke/tpc_kappa100")],
    "paper": [("w/o stabilizer", "deit/tpc_deit_s_nostab"), ("w/ stabilizer κ=100", "deit/tpc_deit_s")],
}


def table_groups(table_id: str = "tradeoff", profile: str = "smoke") -> dict[str, list[str]]:
    """A table's rows grouped by method, in row order: {label: [recipe ids]} (tables/tradeoff.yaml by default)."""
    from tpcrepro import methods, tables

    groups: dict[str, list[str]] = {}
    for row in tables.load_table(table_id).rows:
        if profile in row.recipes:
            groups.setdefault(methods.label(row.method), []).append(row.recipes[profile])
    return groups


BASELINE = {"smoke": "smoke/vit", "paper": "deit/deit_s"}
AXIS_SPAN = 12.0  # top-1 points shown below the best point of a trade-off figure
DATA_NAME = {"smoke": "digits 16×16, smoke ViT; not ImageNet", "paper": "ImageNet-1K"}

Curve = dict[int, float]  # epoch (0-based) -> top-1


# ---------------------------------------------------------------- output

def default_out(name: str) -> Path:
    return paths.results_dir() / "figures" / f"{name}.png"


def save(fig: Figure, out: Path, dpi: int = 150) -> Path:
    """Render to PNG in memory, then write atomically."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    out = Path(out)
    records.atomic_write(out, lambda f: f.write(buf.getvalue()), binary=True)
    return out


# ---------------------------------------------------------------- records and runs

def _train_records(recipe_id: str, profile: str, latest: records.Latest) -> list[records.Record]:
    """The newest train record per seed: of the current recipe hash if any, else of older versions on the same data."""
    from tpcrepro.recipe import load_recipe

    if not latest.of(recipe_id, profile):
        return []
    mine, _ = latest.current(load_recipe(recipe_id), profile, kinds=("train",))
    return sorted(mine, key=lambda r: r.seed)


def read_curve(path: Path) -> Curve:
    """epoch -> val top-1 from a run's metrics.jsonl (a run directory or the file itself)."""
    path = Path(path)
    if path.is_dir():
        path = path / "metrics.jsonl"
    curve: Curve = {}
    for line in path.read_text().splitlines():
        if line.strip():
            row = json.loads(line)
            if "top1" in row:
                curve[int(row["epoch"])] = float(row["top1"])
    return curve


def _metrics_file(rec: records.Record) -> Path | None:
    """The record's run directory, else runs/<recipe>/<hash>/s<seed> here."""
    candidates = [Path(rec.settings["run_dir"])] if rec.settings.get("run_dir") else []
    candidates.append(paths.runs_dir() / rec.recipe / rec.recipe_hash / f"s{rec.seed}")
    return next((d / "metrics.jsonl" for d in candidates if (d / "metrics.jsonl").is_file()), None)


def recipe_curves(recipe_id: str, profile: str = "smoke", latest: dict | None = None) -> list[Curve]:
    """One curve per seed with a done train record and its metrics.jsonl on disk."""
    latest = records.newest() if latest is None else latest
    out = []
    for rec in _train_records(recipe_id, profile, latest):
        if rec.metrics.get("history_top1"):  # the record keeps the curve: no run directory needed
            out.append({i: float(v) for i, v in enumerate(rec.metrics["history_top1"]) if v is not None})
            continue
        f = _metrics_file(rec)
        if f is None:
            log(f"fig4: {recipe_id} seed {rec.seed}: no metrics.jsonl in {rec.settings.get('run_dir', 'runs/')}; skipped")
        else:
            out.append(read_curve(f))
    return [c for c in out if c]


# ---------------------------------------------------------------- figure 4

def fig4(pairs: Sequence[tuple[str, str | Sequence[Path]]] | None = None, profile: str = "smoke",
         out: Path | None = None) -> Path:
    """Val top-1 per epoch, one line per (label, source): the mean over seeds with a min–max band.

    source: a recipe id (its train records' run directories) or run directories / metrics.jsonl files.
    """
    pairs = FIG4_PAIRS[profile] if pairs is None else pairs
    latest = records.newest()
    fig = Figure(figsize=(6.0, 4.0))
    ax = fig.add_subplot()
    drawn, missing = 0, []
    for label, source in pairs:
        curves = (recipe_curves(source, profile, latest) if isinstance(source, str)
                  else [c for c in map(read_curve, source) if c])
        if not curves:
            missing.append(str(source))
            continue
        epochs = sorted(set().union(*curves))
        vals = [[c[e] for c in curves if e in c] for e in epochs]
        x = np.array(epochs) + 1
        line, = ax.plot(x, [statistics.fmean(v) for v in vals], label=f"{label} ({len(curves)} seeds)")
        if len(curves) > 1:
            ax.fill_between(x, [min(v) for v in vals], [max(v) for v in vals], color=line.get_color(), alpha=0.2)
        drawn += 1
    if missing:
        log(f"fig4: no curves for {', '.join(missing)}; skipped")
    if not drawn:
        raise UserError(f"fig4: no training curves found for {', '.join(missing)}; run the recipes first "
                        "(metrics.jsonl is read from each train record's run directory)")
    ax.set(xlabel="epoch", ylabel="val top-1 (%)",
           title=f"Top-1 during training ({profile}: {DATA_NAME.get(profile, profile)})")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, title="mean over seeds, band min–max", title_fontsize=8)
    return save(fig, out or default_out(f"fig4_{profile}"))


# ---------------------------------------------------------------- trade-off

def tradeoff(groups: Mapping[str, Sequence[str]] | None = None, profile: str = "smoke",
             out: Path | None = None, baseline: str | None = "default") -> Path:
    """Top-1 (mean ± sd over seeds) against MACs (mean ± sd), one line per method in its knob's order.

    MACs: an adaptive model's per-image mean from its train records, else the flops record; shown as a
    ratio to `baseline`'s MACs (default: the profile's backbone) when it has them, else absolute.
    """
    from tpcrepro.report import collect

    if groups is None and profile != "smoke":
        raise UserError(f"tradeoff: no default methods for the {profile} profile; pass groups {{label: [recipe ids]}}")
    groups = table_groups("tradeoff", profile) if groups is None else groups
    baseline = BASELINE.get(profile) if baseline == "default" else baseline
    latest = records.newest()
    base = collect(baseline, profile, latest) if baseline else None
    base_macs = statistics.fmean(base.values["gmacs"]) if base and "gmacs" in base.values else None
    unit, scale = ("M", 1e3) if profile == "smoke" else ("G", 1.0)
    fig = Figure(figsize=(7.5, 5.0))
    ax = fig.add_subplot()
    skipped, stale, drawn, means = [], [], 0, []
    for label, recipe_ids in groups.items():
        pts = []
        for rid in recipe_ids:
            ours = collect(rid, profile, latest)
            v = ours.values if ours else {}
            if not v.get("top1") or not v.get("gmacs"):
                skipped.append(rid)
                continue
            if ours.stale:
                stale.append(rid)
            macs = [m / base_macs if base_macs else m * scale for m in v["gmacs"]]
            pts.append((rid, macs, v["top1"]))
        if not pts:
            continue
        sd = lambda xs: statistics.stdev(xs) if len(xs) > 1 else 0.0  # noqa: E731
        ax.errorbar([statistics.fmean(m) for _, m, _ in pts], [statistics.fmean(t) for _, _, t in pts],
                    xerr=[sd(m) for _, m, _ in pts], yerr=[sd(t) for _, _, t in pts],
                    marker="o", ms=4, capsize=3, label=label)
        if len(pts) > 1:  # name the two ends of the sweep
            for rid, m, t in (pts[0], pts[-1]):
                ax.annotate(rid.split("/")[-1], (statistics.fmean(m), statistics.fmean(t)), fontsize=6,
                            xytext=(3, 3), textcoords="offset points")
        means += [(rid, statistics.fmean(m), statistics.fmean(t)) for rid, m, t in pts]
        drawn += len(pts)
    if skipped:
        log(f"tradeoff: no train record with top1 and macs for {', '.join(skipped)}; skipped")
    if stale:
        log(f"tradeoff: only records of an older recipe version for {', '.join(stale)}; drawn anyway")
    if not drawn:
        raise UserError(f"tradeoff: no {profile} records with top1 and MACs for any of {', '.join(skipped)}; "
                        "run the recipes (train and flops jobs) first")
    top = max(t for _, _, t in means)
    floor = top - AXIS_SPAN  # far-below points would flatten the others: clip them, with their value written
    below = [(rid, x, t) for rid, x, t in means if t < floor]
    if below:
        ax.set_ylim(floor - 1, top + 1)
        for rid, x, t in below:
            ax.annotate(f"{rid.split('/')[-1]}: {t:.1f} % ↓", (x, floor - 1), xytext=(0, 6), textcoords="offset points",
                        fontsize=7, ha="center", arrowprops=dict(arrowstyle="->", lw=0.8))
    xlabel = f"MACs ÷ {baseline}" if base_macs else f"MACs ({unit})"
    ax.set(xlabel=xlabel, ylabel="top-1 (%)",
           title=f"Accuracy against compute ({profile}: {DATA_NAME.get(profile, profile)})")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, title="mean ± sd over seeds", title_fontsize=8)
    return save(fig, out or default_out(f"tradeoff_{profile}"))


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

def samples(out: Path | None = None, recipe_id: str = "scenes/vit", n: int = 32, cols: int = 8) -> Path:
    """A grid of validation scenes of the recipe's data (tpcrepro/scenes.py), the digit's patch tokens outlined."""
    from matplotlib.patches import Rectangle

    from tpcrepro.recipe import load_recipe
    from tpcrepro.scenes import ScenesDataset, token_coverage

    r = load_recipe(recipe_id)
    if r.data.dataset != "scenes":
        raise UserError(f"{recipe_id} trains on '{r.data.dataset}', not on scenes; pick a scenes recipe (scenes/vit)")
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
