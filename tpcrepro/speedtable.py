"""Table 4's speed column by one protocol: every model of the table timed in one process, side by side.

The models are the table's rows (and ToMe, a modern reference the paper
does not have) at one profile. Each is the trained model of its run where
that run is finished here (so an adaptive model runs its own per-image
token counts, removed form), else:
- a fixed-schedule method (DeiT, EViT, DynamicViT at inference, ToMe):
  random weights, which time the same as trained ones;
- an adaptive method (TPC, A-ViT): benchmark mode, a fixed schedule at the
  MACs the paper prints for the row, scaled to the profile's backbone.
Every setting of the grid (precision × batch, eager; compiled at bf16 batch 256) is one
interleaved comparison; ratios are against the table's baseline measured in
that comparison. One `throughput` record per row holds the whole grid and,
as its headline, the first setting (bf16 batch 256 eager on a GPU, fp32 on
a CPU, where it is marked CPU).
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Optional

import torch

from tpcrepro import checkpoint, jobs, records, speed, tables
from tpcrepro.errors import UserError
from tpcrepro.models import api
from tpcrepro.progress import log
from tpcrepro.recipe import Recipe, load_recipe

EXTRA = {"table4": [("ToMe-S, r 13 (not in the paper)", {"paper": "deit/tome_deit_s", "smoke": "smoke/tome"})]}


@dataclass(frozen=True)
class Entry:
    label: str
    recipe: Recipe
    target_gmacs: Optional[float]  # benchmark mode's MACs (paper's print) when no trained run exists


def entries(table_id: str, profile: str) -> tuple[list[Entry], Entry]:
    """The models to time and the baseline among them."""
    spec = tables.load_table(table_id)
    if not spec.baseline or profile not in spec.row(spec.baseline).recipes:
        raise UserError(f"{table_id} has no baseline with a {profile} recipe to time the others against")
    base_row = spec.row(spec.baseline)
    base_paper = base_row.paper.get("gmacs")
    out, base = [], None
    for row in spec.rows:
        if profile not in row.recipes:
            continue
        e = Entry(row.label, load_recipe(row.recipes[profile]), row.paper.get("gmacs"))
        out.append(e)
        if row.id == spec.baseline:
            base = e
    for label, recipes in EXTRA.get(table_id, []):
        if profile in recipes:
            out.append(Entry(label, load_recipe(recipes[profile]), None))
    if profile != "paper" and base_paper:  # the paper's MACs as a fraction of its backbone's, on ours
        out = [replace(e, target_gmacs=e.target_gmacs / base_paper if e.target_gmacs else None) for e in out]
    return out, base


def _finished(recipe: Recipe, seed: int = 0) -> bool:
    path = jobs.run_dir_for(recipe, seed) / "checkpoint.pt"
    if not path.is_file():
        return False
    state = checkpoint.load(path)
    return state.get("epoch", 0) >= recipe.train.epochs and state.get("recipe_hash") == recipe.hash


def build(e: Entry, base_macs: float, batch: int) -> tuple[torch.nn.Module, str, Optional[float]]:
    """(module, source, benchmark MACs) for one entry: trained run, random weights, or benchmark mode."""
    from tpcrepro.bench import ScheduleRunner, schedule, uniform_count

    r = e.recipe
    if r.train.epochs > 0 and _finished(r):
        return jobs.load_run_model(r.id), "trained run (seed 0)", None
    model = jobs.static_model(r).eval()
    if not api.is_adaptive(model):
        return model, "random weights (fixed schedule)", None
    if not e.target_gmacs or not isinstance(model, api.ViTController):
        raise UserError(f"{r.id}: no finished run to time and no MACs to benchmark it at; train it first")
    target = e.target_gmacs * (1e9 if r.profile == "paper" else base_macs)
    dims = model.dims
    n = dims.num_patches + model.num_prefix_tokens
    mean = uniform_count(dims, n, target, model.kappa)
    counts = schedule(batch, dims.depth, n, mean)
    return ScheduleRunner(model, counts, True, model.buckets), f"benchmark mode at {target / 1e9:.3g} G MACs", target


def grid(device: str, full: bool) -> list[speed.Protocol]:
    """The protocol settings: GPU bf16/fp32 × batch 256/1 eager, and bf16 batch 256 compiled; CPU fp32 batch 32 and 1."""
    if device.startswith("cuda"):
        settings = [(p, b, False) for p, b in itertools.product(("bf16", "fp32"), (256, 1))]
        settings += [("bf16", 256, True)] if full else []
        return [speed.Protocol(batch_size=b, precision=p, compile=c, device=device,
                               steps=30 if b > 1 else 100) for p, b, c in settings]
    # CPU: every repeat walks 64 images (batch 1) or 4 batches of 32 (timed_inputs); 9 repeats give the ratios an
    # interval (speed.median_interval)
    return [speed.Protocol.cpu_default(batch_size=b, steps=s, repeats=9) for b, s in ((32, 8), (1, 64))]


def timed_inputs(recipe: Recipe, batch: int) -> Optional[list[torch.Tensor]]:
    """What a setting is timed on: on an embedded data set (smoke) its validation images, max(64, 4·batch) of
    them in batches, which every repeat walks through (a trained controller decides on what it sees: on noise
    it halts and pauses as it never does on its data); elsewhere None (random images: no data set is needed)."""
    from tpcrepro.benchreal import timed_batches
    from tpcrepro.data import EMBEDDED

    if recipe.data.dataset not in EMBEDDED:
        return None
    m = recipe.model
    return timed_batches(batch, recipe.id, (m.in_chans, m.img_size, m.img_size))


def run(table_id: str = "table4", profile: str = "paper", device: Optional[str] = None, full: bool = True,
        write: bool = True) -> list[dict]:
    """Time the table's models side by side over the grid; write one record per model. Returns rows."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    items, base = entries(table_id, profile)
    base_model = jobs.static_model(base.recipe)
    base_macs = float(base_model.macs_all_tokens()) if api.is_adaptive(base_model) else 0.0
    if not base_macs:
        from tpcrepro import flops

        m = base.recipe.model
        base_macs = flops.fvcore_macs(base_model, (m.in_chans, m.img_size, m.img_size))
    results: dict[str, dict] = {e.recipe.id: {} for e in items}
    sources: dict[str, str] = {}
    started, t0 = records.now_iso(), time.perf_counter()
    for p in grid(device, full):
        models = {}
        for e in [base] + [e for e in items if e is not base]:
            module, source, _ = build(e, base_macs, p.batch_size)
            models[e.recipe.id] = module
            sources[e.recipe.id] = source
        m = base.recipe.model
        name = f"{p.precision} batch {p.batch_size} {'compiled' if p.compile else 'eager'}"
        log(f"timing {len(models)} models, {name} on {speed.settings(p)['device_name']}")
        try:
            timed = speed.compare(models, (m.in_chans, m.img_size, m.img_size), p, inputs=timed_inputs(base.recipe,
                                                                                                   p.batch_size))
        except Exception as e:  # torch.compile can fail on a model; the eager settings stand
            if not p.compile:
                raise
            log(f"[yellow]{name}: skipped[/] ({type(e).__name__}: {str(e).splitlines()[0][:120]})")
            continue
        for rid, res in timed.items():
            results[rid][name] = res
    first = next(iter(results[base.recipe.id]))
    rows = []
    for e in items:
        rid = e.recipe.id
        head = results[rid][first]
        row = {"label": e.label, "recipe": rid, "source": sources[rid], "images_per_sec": head["images_per_sec"],
               "ratio": head["ratio"], "latency_ms": head["latency_ms"], "grid": results[rid]}
        rows.append(row)
        if write:
            p0 = grid(device, full)[0]
            rec = records.new(
                rid, e.recipe.hash, profile, "throughput",
                metrics={k: row[k] for k in ("images_per_sec", "ratio", "latency_ms", "grid")},
                settings={**speed.settings(p0), "protocol": f"{table_id} side by side", "baseline": base.recipe.id,
                          "source": sources[rid], "headline": first, "cpu": not device.startswith("cuda")},
                overrides=e.recipe.overrides, device=device, started_at=started,
                duration_s=round(time.perf_counter() - t0, 3))
            records.write_record(rec)
    return rows


def markdown(rows: list[dict], device_name: str) -> str:
    """The whole grid: images/s and the ratio to the baseline, per model and setting."""
    def order(name: str) -> tuple:  # the grid's order: eager before compiled, bf16 before fp32, large batch first
        precision, _, batch, mode = name.split()
        return mode == "compiled", precision, -int(batch)

    names = sorted(rows[0]["grid"], key=order)
    head = "| Model | Source | " + " | ".join(names) + " |"
    lines = [f"Measured side by side on {device_name} (images/s, and × the baseline in the same comparison).", "",
             head, "|" + "---|" * (len(names) + 2)]
    for r in rows:
        cells = [f"{r['grid'][n]['images_per_sec']:.0f} ({r['grid'][n]['ratio']:.2f}×)" for n in names]
        lines.append(f"| {r['label']} | {r['source']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def from_records(table_id: str, profile: str, latest: Optional[records.Latest] = None) -> Optional[str]:
    """The grid as `measure` wrote it, rebuilt from the newest side-by-side records of the table's models (current
    recipe versions, all of one comparison: one device, one start), or None where they are not all there."""
    try:
        items, _ = entries(table_id, profile)
    except UserError:
        return None
    latest = latest or records.newest()
    found = [latest.current_record(e.recipe, "throughput", 0) for e in items]
    if any(rec is None or stale or "side by side" not in rec.settings.get("protocol", "") for rec, stale in found):
        return None
    recs = [rec for rec, _ in found]
    if len({(r.started_at, r.environment.get("device_name")) for r in recs}) != 1:
        return None  # rows of different comparisons: their ratios are not against one baseline measurement
    rows = [{"label": e.label, "source": r.settings.get("source", ""), "grid": r.metrics["grid"]}
            for e, r in zip(items, recs)]
    env = recs[0].environment
    return (f"# {table_id}: speed by one protocol ({profile} profile)\n\n"
            + markdown(rows, env.get("device_name", "?"))
            + f"\nRecords: `results/records/*__throughput__*`, started {recs[0].started_at}, "
              f"git {env.get('git_commit', '?')}.\n")


def is_done(table_id: str, profile: str) -> bool:
    """Whether every model of the table has a side-by-side throughput record of its current recipe version."""
    items, _ = entries(table_id, profile)
    latest = records.newest()
    found = [latest.current_record(e.recipe, "throughput", 0) for e in items]
    return all(rec is not None and not stale and "side by side" in rec.settings.get("protocol", "")
               for rec, stale in found)


def measure(table_id: str, profile: str, device: Optional[str] = None) -> Path:
    """run(), then the whole grid as results/tables/<table>_speed_<profile>.md. Returns its path."""
    from tpcrepro import paths

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    run(table_id, profile, device)
    path = paths.results_dir() / "tables" / f"{table_id}_speed_{profile}.md"
    text = from_records(table_id, profile)
    if text is None:
        raise UserError(f"{table_id}: the speed records just written are not all found under {paths.results_dir()}; "
                        "check $TPCREPRO_RESULTS")
    records.atomic_write_text(path, text)
    return path
