"""Records + TableSpec -> pandas -> results/tables/<id>.md.

Two sections per table, never mixed: the paper's ImageNet-1K numbers beside
ours from the `paper` profile (with the difference), and our `smoke`-profile
numbers (digits, small ViT) in columns of their own, with the spread over
seeds. Every number of ours names the recipe, its hash, seeds and commit.
"""

from __future__ import annotations

import re

import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import pandas as pd

from tpcrepro import paths, records, tables
from tpcrepro.recipe import load_recipe

# table column key -> (record kinds tried in order, metric, scale). An adaptive model's MACs are the
# mean over evaluation images in its train record; a static model's come from its flops record.
METRIC_OF = {
    "top1": (("train",), "top1", 1.0),
    "top5": (("train",), "top5", 1.0),
    "params_m": (("flops",), "params", 1e-6),
    "gmacs": (("train", "flops"), "macs", 1e-9),
    "images_per_sec": (("throughput",), "images_per_sec", 1.0),
    "speed_ratio": (("throughput",), "ratio", 1.0),  # against the table's baseline, timed side by side
}
SMOKE_SCALE = {"gmacs": ("MACs (M)", 1e-6), "params_m": ("Params (M)", 1e-6)}
SMOKE_BASELINE = "smoke/vit"  # the smoke backbone: MACs ratios are against it
SMOKE_BACKBONES = {"swin_t": "a Swin of widths 32-256 (depths 1-1-4-1, window 4)",
                   "lvvit_s": "an LV-ViT of width 64 and depth 8 (convolutional stem, aux head)"}
SMOKE_NOTE = ("digits in 32×32 scenes (tpcrepro/scenes.py; 3,000 validation scenes), {backbone} pretrained once "
              "on the CPU and every row fine-tuned from it with the same budget; these numbers compare methods at "
              "small scale. They are not ImageNet results.")


def smoke_note(spec: tables.TableSpec) -> str:
    return SMOKE_NOTE.format(backbone=SMOKE_BACKBONES.get(spec.backbone, "a ViT of width 64 and depth 8"))


@dataclass(frozen=True)
class Ours:
    """Our numbers for one recipe and profile, aggregated over seeds."""

    values: dict  # column key -> list of floats (one per seed for train metrics)
    source: str
    stale: bool


def _fmt_hash_commit(recs: list[records.Record]) -> str:
    commits = sorted({r.environment.get("git_commit") or "?" for r in recs})
    return f"@{recs[0].recipe_hash} (git {','.join(commits)})"


def collect(recipe_id: str, profile: str, latest: records.Latest) -> Optional[Ours]:
    """Our numbers of a recipe: its current records, else the newest of older versions on the same data (stale)."""
    recipe = load_recipe(recipe_id)
    mine, stale = latest.current(recipe, profile)
    if profile == "paper":  # a CPU's images/s is no ImageNet-scale speed: kept in its record, not put beside the paper's
        mine = [r for r in mine if not (r.kind == "throughput" and str(r.settings.get("device", "")).startswith("cpu"))]
    if not mine:
        return None
    values: dict[str, list[float]] = {}
    for key, (kinds, metric, scale) in METRIC_OF.items():
        for kind in kinds:
            vals = [r.metrics[metric] * scale for r in mine if r.kind == kind and metric in r.metrics]
            if vals:
                values[key] = vals
                break
    seeds = sorted({r.seed for r in mine if r.kind == "train"})
    seed_txt = f" seeds {','.join(map(str, seeds))}" if seeds else ""
    return Ours(values=values, source=f"`{recipe_id}`{seed_txt} {_fmt_hash_commit(mine)}", stale=stale)


def fmt(vals: Optional[list], digits: int = 1) -> str:
    if not vals:
        return "—"
    mean = statistics.fmean(vals)
    if len(vals) == 1:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {statistics.stdev(vals):.{digits}f}"


def _paper_value(v) -> str:
    return "—" if v is None else str(v)


def paper_frame(spec: tables.TableSpec, latest: dict) -> tuple[pd.DataFrame, bool]:
    """The paper's numbers; with paper-profile records, ours and the difference beside them."""
    have_ours = False
    rows = []
    for row in spec.rows:
        ours = collect(row.recipes["paper"], "paper", latest) if "paper" in row.recipes else None
        have_ours |= ours is not None
        rows.append((row, ours))
    out = []
    for row, ours in rows:
        line = {"Model": row.label}
        for col in spec.columns:
            line[f"{col.header}"] = _paper_value(row.paper[col.key])
            if have_ours and col.key in METRIC_OF:
                vals = ours.values.get(col.key) if ours else None
                line[f"{col.header} (ours)"] = fmt(vals, 2 if col.key in ("gmacs",) else 1)
                p = row.paper[col.key]
                line[f"Δ {col.header}"] = f"{statistics.fmean(vals) - p:+.2f}" if vals and p is not None else ""
        if have_ours:
            line["Source (ours)"] = _source(row, ours, "paper")
        out.append(line)
    return pd.DataFrame(out), have_ours


def _source(row: tables.Row, ours: Optional[Ours], profile: str) -> str:
    if row.quoted:
        return "quoted from the paper (not implemented)"
    if profile not in row.recipes:
        return "no recipe yet"
    if ours is None:
        return f"not run (`{row.recipes[profile]}`)"
    return ours.source + (" **stale: recipe changed since**" if ours.stale else "")


def smoke_frame(spec: tables.TableSpec, latest: dict) -> Optional[pd.DataFrame]:
    """Our smoke-profile numbers, in columns of their own, with the MACs ratio to the table's baseline."""
    runnable = [r for r in spec.rows if "smoke" in r.recipes]
    if not runnable:
        return None
    base = spec.row(spec.baseline) if spec.baseline else None
    base_id = base.recipes["smoke"] if base and "smoke" in base.recipes else SMOKE_BASELINE
    base_ours = collect(base_id, "smoke", latest)
    base_macs = statistics.fmean(base_ours.values["gmacs"]) if base_ours and "gmacs" in base_ours.values else None
    out = []
    for row in runnable:
        ours = collect(row.recipes["smoke"], "smoke", latest)
        vals = ours.values if ours else {}
        line = {"Model (paper's label)": row.label}
        headers = {c.key: c.header for c in spec.columns if c.key in METRIC_OF}
        headers.setdefault("gmacs", "FLOPs (G)")  # MACs always: they are what an adaptive method trades
        for key, paper_header in headers.items():
            header, scale = SMOKE_SCALE.get(key, (paper_header, None))
            v = vals.get(key)
            if scale and v:
                v = [x / METRIC_OF[key][2] * scale for x in v]
            line[f"{header}, smoke"] = fmt(v, 2 if key in ("gmacs", "params_m") else 1)
        if base_macs:
            what = "backbone" if base is None or base.method == "baseline" else f"`{base_id}`"
            line[f"MACs ÷ {what}"] = f"{statistics.fmean(vals['gmacs']) / base_macs:.3f}" if "gmacs" in vals else "—"
        if "images_per_sec" in headers:
            line["Speed ÷ backbone (side by side, CPU)"] = fmt(vals.get("speed_ratio"), 2)
        line["Source"] = _source(row, ours, "smoke")
        out.append(line)
    return pd.DataFrame(out)


def render(spec: tables.TableSpec, latest: dict) -> str:
    num = spec.id.removeprefix("table")
    lines = [f"<!-- generated by `tpcrepro report` from results/records and {Path(spec.path).name}; do not edit -->"]
    if not spec.from_paper:
        lines += [f"# Beyond the paper: {spec.title}", ""]
        notes = [f"- {r.label}: {r.note}" for r in spec.rows if r.note]
        smoke = smoke_frame(spec, latest)
        lines += ["## Our runs at smoke scale (profile `smoke`)", "", f"{smoke_note(spec)} Mean ± standard deviation over seeds.", ""]
        lines += [smoke.to_markdown(index=False, disable_numparse=True) if smoke is not None else "No recipes.", ""]
        return "\n".join(lines + (["Notes:", *notes, ""] if notes else []))
    lines += [f"# Table {num}: {spec.title}", ""]
    paper_df, have_ours = paper_frame(spec, latest)
    lines += ["## ImageNet-1K: the paper" + (" and our `paper`-profile runs" if have_ours else ""), ""]
    lines += [paper_df.to_markdown(index=False, disable_numparse=True), ""]
    if not have_ours:
        lines += [f"No `paper`-profile run recorded yet: `tpcrepro run {spec.id} --profile paper --data /path/to/imagenet`.", ""]
    notes = [f"- {r.label}: {r.note}" for r in spec.rows if r.note and not r.quoted]
    quoted = [r.label for r in spec.rows if r.quoted]
    if quoted:
        notes.append(f"- Quoted from the paper, not implemented in tpcrepro: {', '.join(quoted)}.")
    if notes:
        lines += ["Notes:", *notes, ""]
    smoke = smoke_frame(spec, latest)
    if smoke is not None:
        lines += ["## Our runs at smoke scale (profile `smoke`)", "", f"{smoke_note(spec)} Mean ± standard deviation over seeds.",
                  "", smoke.to_markdown(index=False, disable_numparse=True), ""]
    return "\n".join(lines)


def write_all(out_dir: Optional[Path] = None, table_ids: Optional[list[str]] = None) -> list[Path]:
    out_dir = out_dir or paths.results_dir() / "tables"
    latest = records.newest()
    written = []
    for tid in table_ids or tables.list_tables():
        path = out_dir / f"{tid}.md"
        records.atomic_write_text(path, render(tables.load_table(tid), latest))
        written.append(path)
    from tpcrepro import speedtable

    for tid in table_ids or tables.list_tables():  # the speed grids, where a side-by-side comparison is recorded
        for profile in ("smoke", "paper"):
            text = speedtable.from_records(tid, profile, latest)
            if text is not None:
                path = out_dir / f"{tid}_speed_{profile}.md"
                records.atomic_write_text(path, text)
                written.append(path)
    if not table_ids:
        from tpcrepro import claims

        written.append(claims.write(out_dir, latest))
    return written


README_BLOCK = re.compile(r"(<!-- generated: (\w+) -->\n)(.*?)(<!-- /generated -->)", re.S)


def update_readme(path: Path) -> int:
    """Refill the README's generated blocks (<!-- generated: TABLE --> … <!-- /generated -->) with each table's
    smoke-scale frame, as `report` renders it. Returns how many blocks were filled."""
    latest = records.newest()
    text = path.read_text()
    count = 0

    def fill(m: re.Match) -> str:
        nonlocal count
        if m.group(2) == "speed":  # the bench records (tpcrepro bench), not a table
            from tpcrepro.benchreal import markdown

            count += 1
            return f"{m.group(1)}{markdown(records.load_records())}\n{m.group(4)}"
        if m.group(2) in ("claims", "calibration"):
            from tpcrepro import claims

            count += 1
            df = claims.summary_frame(latest) if m.group(2) == "claims" else claims.calibration_frame(latest)
            return f"{m.group(1)}{df.to_markdown(index=False, disable_numparse=True)}\n{m.group(4)}"
        spec = tables.load_table(m.group(2))
        frame = smoke_frame(spec, latest)
        body = frame.to_markdown(index=False, disable_numparse=True) if frame is not None else "(no smoke rows)"
        count += 1
        return f"{m.group(1)}{body}\n{m.group(4)}"

    records.atomic_write_text(path, README_BLOCK.sub(fill, text))
    return count
