"""The figures drawn from records, as PNG files under results/figures/.

- fig4: top-1 per epoch with and without the stabilizer (from the runs' metrics.jsonl).
- tradeoff: top-1 against MACs, one line per method with its budget knob swept.

The figures drawn over images from a model or the data (fig1, fig5, the
smoke scenes) are tpcrepro/tokenmaps.py; `draw` is the `figure` command.
"""

from __future__ import annotations

import io
import json
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Optional

import matplotlib

matplotlib.use("Agg")

import numpy as np
from matplotlib.figure import Figure

from tpcrepro import paths, records
from tpcrepro.errors import UserError
from tpcrepro.progress import log

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
DATA_NAME = {"smoke": "digits in 32×32 scenes, smoke ViT; not ImageNet", "paper": "ImageNet-1K"}

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
            value = row.get("curve_top1", row.get("top1"))  # the curve's images (eval.curve_size), else all
            if value is not None:
                curve[int(row["epoch"])] = float(value)
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
    drawn, missing, sizes = 0, [], set()
    for label, source in pairs:
        curves = (recipe_curves(source, profile, latest) if isinstance(source, str)
                  else [c for c in map(read_curve, source) if c])
        if isinstance(source, str):  # how many validation images the curve's points are on (eval.curve_size)
            sizes |= {r.metrics.get("history_n_val") for r in _train_records(source, profile, latest)}
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
    n = next(iter(sizes)) if len(sizes) == 1 and None not in sizes else None
    ax.set(xlabel="epoch", ylabel="val top-1 (%)" + (f", the first {n} validation images" if n else ""),
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


# ---------------------------------------------------------------- the `figure` command

FIGURES = ("fig1", "fig4", "fig5", "tradeoff", "samples")


def draw(name: str, recipes: Optional[Sequence[str]] = None, seed: int = 0, images: int = 4, profile: str = "smoke",
         data: Optional[str] = None, out: Optional[Path] = None) -> Path:
    """One figure by name, with the `figure` command's defaults: fig4 and tradeoff from the profile's records,
    fig1 and fig5 from the trained runs of `recipes` (seed `seed`) on their first `images` evaluation images,
    samples from a scenes recipe. Returns the PNG's path."""
    if name not in FIGURES:
        raise UserError(f"unknown figure '{name}'; choose one of {', '.join(FIGURES)}")
    if name == "fig4":
        return fig4(profile=profile, out=out)
    if name == "tradeoff":
        return tradeoff(profile=profile, out=out)
    from tpcrepro import tokenmaps

    if name == "samples":
        return tokenmaps.samples(out=out, recipe_id=(list(recipes or []) or ["smoke/vit"])[0])
    ids = list(recipes or (["smoke/tpc"] if name == "fig5" else ["smoke/vit", "smoke/tpc"]))
    x, display = tokenmaps.eval_images(ids[-1], images, data)
    models = {rid: tokenmaps.load_run_model(rid, seed) for rid in ids}
    if name == "fig5":
        return tokenmaps.fig5(models[ids[-1]], x, out, display=display)
    return tokenmaps.fig1(models, x, out, display=display)
