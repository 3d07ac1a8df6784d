"""The paper's claims, tested at smoke scale: tables/claims/claims.yaml -> results/tables/claims.md.

Each claim is one or more comparisons of smoke-profile rows. A comparison's
top-1 difference and its 95 % interval come from the paired bootstrap over
validation images (tpcrepro/bootstrap.py), using only records of the current
recipe versions that kept per-image hits; its verdict is computed from the
interval by `verdict`. A comparison whose records are missing says which, and
gets no verdict.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import yaml

from tpcrepro import bootstrap, paths, records
from tpcrepro.errors import UserError
from tpcrepro.recipe import load_recipe

PROFILE = "smoke"
TESTS = ("greater", "noninferior", "equivalent")
SUPPORTED, CONTRADICTED, UNRESOLVED = "supported", "contradicted", "unresolved at this scale"


def verdict(test: str, lo: float, hi: float, margin: float) -> str:
    """The verdict a 95 % interval [lo, hi] of a − b (points) gives on the claim `test`."""
    if test == "greater":
        return SUPPORTED if lo > 0 else CONTRADICTED if hi < 0 else UNRESOLVED
    if test == "noninferior":
        return SUPPORTED if lo > -margin else CONTRADICTED if hi < -margin else UNRESOLVED
    if test == "equivalent":
        return SUPPORTED if -margin < lo and hi < margin else CONTRADICTED if lo > margin or hi < -margin else UNRESOLVED
    raise ValueError(f"unknown test {test!r}; use one of {', '.join(TESTS)}")


@dataclass(frozen=True)
class Runs:
    """One recipe's current train records with per-image hits: hits [seeds, n], mean MACs, where from, and the
    validation images' clusters (int [n]: the unit the bootstrap resamples; None: each image its own)."""

    recipe: str
    hits: np.ndarray
    macs: Optional[float]
    source: str
    clusters: Optional[np.ndarray] = None


def validation_clusters(recipe) -> Optional[np.ndarray]:
    """Each validation image's cluster for a recipe's data: the held-out digit of each scene (scenes); None else."""
    if recipe.data.dataset != "scenes":
        return None
    from tpcrepro.scenes import val_clusters

    return val_clusters(recipe.data.scenes)


def same_clusters(rows: list[Runs]) -> bool:
    """Whether the rows' validation images fall into the same clusters (None, each image its own, equals only None)."""
    return all(np.array_equal(r.clusters, rows[0].clusters) for r in rows)


def runs(recipe_id: str, latest: dict) -> tuple[Optional[Runs], str]:
    """(Runs, "") or (None, why not)."""
    from tpcrepro.train import unpack_correct

    recipe = load_recipe(recipe_id)
    current = recipe.hash
    mine = [r for k, r in sorted(latest.items(), key=lambda kv: str(kv[0]))
            if k[0] == recipe_id and k[1] == PROFILE and r.recipe_hash == current]
    train = [r for r in mine if r.kind == "train"]
    if not train:
        return None, f"`{recipe_id}` not run"
    with_hits = [r for r in train if "correct_top1" in r.metrics]
    if not with_hits:
        return None, f"`{recipe_id}` has no per-image hits (rerun it)"
    n = {r.metrics["n_val"] for r in with_hits}
    if len(n) > 1:
        return None, f"`{recipe_id}`'s records cover different validation sets ({sorted(n)})"
    hits = np.stack([unpack_correct(r.metrics["correct_top1"], r.metrics["n_val"]) for r in with_hits])
    macs = [r.metrics["macs"] for r in with_hits if "macs" in r.metrics]
    if not macs:  # a static model: its flops record
        macs = [r.metrics["macs"] for r in mine if r.kind == "flops" and "macs" in r.metrics]
    seeds = ",".join(str(r.seed) for r in with_hits)
    commits = ",".join(sorted({r.environment.get("git_commit") or "?" for r in with_hits}))
    clusters = validation_clusters(recipe)
    if clusters is not None and len(clusters) != hits.shape[1]:
        return None, f"`{recipe_id}`'s records cover {hits.shape[1]} validation images, its recipe {len(clusters)}"
    return Runs(recipe_id, hits, statistics.fmean(macs) if macs else None,
                f"`{recipe_id}` s{seeds} @{current} ({commits})", clusters), ""


def off_curve(v: str, a_macs: float, b_macs: float) -> str:
    """A curve read at another point than a's MACs (a outside its points): only the reading that a monotone curve
    (more MACs, no less top-1) cannot overturn stands: a beats a point that spends more, or loses to one that
    spends less. Anything else is unresolved until the curve reaches a's MACs."""
    if (v == SUPPORTED and b_macs >= a_macs) or (v == CONTRADICTED and b_macs <= a_macs):
        return v
    return f"{UNRESOLVED} (the curve's nearest point spends {'more' if b_macs > a_macs else 'fewer'} MACs)"


def _mmacs(x: Optional[float]) -> str:
    return "—" if x is None else f"{x / 1e6:.2f}"


def compare(cmp: dict, latest: dict, margin: float) -> dict:
    """One comparison -> a table row's cells (verdict only when every record it needs is there)."""
    test = cmp["test"]
    if test not in TESTS:
        raise UserError(f"claims: unknown test {test!r}; use one of {', '.join(TESTS)}")
    peers = cmp.get("curve") or cmp.get("best_of") or [cmp["b"]]
    a, why_a = runs(cmp["a"], latest)
    got = [runs(p, latest) for p in peers]
    have = [r for r, _ in got if r is not None]
    missing = [w for r, w in [(a, why_a), *got] if r is None]
    kind = "curve " if cmp.get("curve") else "best of " if cmp.get("best_of") else ""
    row = {"a": cmp["a"], "test": test, "missing": missing, "b": kind + ", ".join(f"`{p}`" for p in peers)}
    if a is None or not have or (not cmp.get("curve") and not cmp.get("best_of") and missing):
        row["how"] = "—"
        return row
    if any(r.hits.shape[1] != a.hits.shape[1] for r in have) or not same_clusters([a, *have]):
        row["missing"] = missing + ["records on different validation sets"]
        row["how"] = "—"
        return row
    how = ""
    if cmp.get("curve"):
        if a.macs is None or any(r.macs is None for r in have):
            row["missing"] = missing + ["MACs"]
            row["how"] = "—"
            return row
        w, how = bootstrap.interpolation_weights(a.macs, [r.macs for r in have])
        used = [(wi, r) for wi, r in zip(w, have) if wi > 0]
        peer_macs = sum(wi * r.macs for wi, r in used)
        row["b"] = " + ".join(f"{wi:.2f}·`{r.recipe}`" if wi < 1 else f"`{r.recipe}`" for wi, r in used)
        row["how"] = f"{how}, {len(have)} of {len(peers)} points"
    elif cmp.get("best_of"):
        best = max(have, key=lambda r: r.hits.mean())
        used, peer_macs = [(1.0, best)], best.macs
        row["b"] = f"best of {len(have)}: `{best.recipe}`"
        row["how"] = f"best by mean of {len(have)} of {len(peers)}"
    else:
        used, peer_macs = [(1.0, have[0])], have[0].macs
        row["b"] = f"`{have[0].recipe}`"
        row["how"] = "rows"
    iv = bootstrap.contrast([(1.0, a.hits), *[(-wi, r.hits) for wi, r in used]], clusters=a.clusters)
    v = verdict(test, iv.lo, iv.hi, margin)
    if cmp.get("curve") and how not in ("interpolated", "at the point"):  # read at other MACs than a's
        v = off_curve(v, a.macs, peer_macs)
    row.update(macs=f"{_mmacs(a.macs)} / {_mmacs(peer_macs)}", diff=f"{iv.diff:+.2f}",
               interval=f"[{iv.lo:+.2f}, {iv.hi:+.2f}]", verdict=v,
               sources="; ".join([a.source] + [r.source for _, r in used]))
    return row


def claims_path() -> Path:
    return paths.tables_dir() / "claims" / "claims.yaml"


def load_spec(path: Optional[Path] = None) -> dict:
    path = path or claims_path()
    spec = yaml.safe_load(Path(path).read_text())
    for c in spec["claims"]:
        for cmp in c["comparisons"]:
            if not {"a", "test"} <= set(cmp) or len({"b", "curve", "best_of"} & set(cmp)) != 1:
                raise UserError(f"{path}: claim '{c['id']}': each comparison needs a, test and one of b, curve, best_of")
    return spec


TEST_TEXT = {"greater": "a > b", "noninferior": "a ≥ b − {m}", "equivalent": "−{m} < a − b < {m}"}  # no "|": tables


def frame(latest: dict, spec: Optional[dict] = None):
    import pandas as pd

    spec = spec or load_spec()
    margin = float(spec.get("margin", 1.0))
    out = []
    for c in spec["claims"]:
        for cmp in c["comparisons"]:
            r = compare(cmp, latest, margin)
            out.append({
                "Claim of the paper": c["claim"],
                "a vs b": f"`{r['a']}` vs {r.get('b', '—')}",
                "Test": TEST_TEXT[r["test"]].format(m=f"{margin:g}"),
                "MACs (M), a / b": r.get("macs", "—"),
                "Δ top-1 (a − b)": r.get("diff", "—"),
                "95 % interval": r.get("interval", "—"),
                "Verdict": r.get("verdict", "no verdict: " + "; ".join(r["missing"])),
                "Read as": r["how"],
                "Records": r.get("sources", "—") + (f" (missing: {'; '.join(r['missing'])})"
                                                    if r["missing"] and "verdict" in r else ""),
            })
    return pd.DataFrame(out)


def summary_frame(latest: dict):
    """The README's short form: claim, comparison, difference, interval, verdict."""
    df = frame(latest)
    return df[["Claim of the paper", "a vs b", "MACs (M), a / b", "Δ top-1 (a − b)", "95 % interval", "Verdict"]]


def render(latest: dict) -> str:
    df = frame(latest)
    lines = [
        "<!-- generated by `tpcrepro report` from results/records and tables/claims/claims.yaml; do not edit -->",
        "# The paper's claims at smoke scale",
        "",
        "Each row compares two smoke-profile rows (`a` and `b`, the current recipe versions only). Δ is a's top-1 "
        "minus b's in points on the validation images, seeds pooled; the 95 % interval is a paired bootstrap over "
        "the held-out digits, each with all the validation scenes that show it (scenes of one glyph are not "
        f"independent: {bootstrap.N_BOOT} resamples, tpcrepro/bootstrap.py). The verdict is computed "
        "from the interval: `a > b` is supported when the whole interval is above 0 and contradicted when it is "
        f"below; `a ≥ b − m` and `−m < a − b < m` use the margin m = {load_spec().get('margin', 1.0):g} point. "
        "Against a curve, b is the peer's top-1 read linearly at a's MACs between its two neighbouring points "
        "(outside its range: its nearest point, and then only a verdict a curve that gains top-1 with MACs "
        "cannot overturn stands: a beating a point that spends more, or losing to one that spends less). "
        "The interval covers the validation images' sampling noise; "
        "training noise between seeds shows as the ± of the tables (rows of one seed: seed 0 only). Only train records that kept each validation "
        "image's hit count. These are small-scale results on the smoke data, not ImageNet results.",
        "",
        df.to_markdown(index=False, disable_numparse=True),
        "",
    ]
    return "\n".join(lines)


def write(out_dir: Optional[Path] = None, latest: Optional[dict] = None) -> Path:
    out_dir = out_dir or paths.results_dir() / "tables"
    latest = records.newest() if latest is None else latest
    path = out_dir / "claims.md"
    records.atomic_write_text(path, render(latest))
    return path


# ---------------------------------------------------------------- calibration of the smoke benchmark

BUDGET_MIN = {"table": 15.0, "all": 120.0}  # minutes on 2 CPU cores: one table from nothing, every smoke job
BUDGET_CORES = 2
README_MAIN = ("table3", 10.0)  # README's main command (`run table3 --profile smoke`): about 10 minutes, i.e. ≤ +10 %


def budget_rows() -> list[dict]:
    """Minutes to fill each table (and `all`) from nothing on 2 cores, one job per core, by the records' durations
    (what `run TARGET --dry-run` prints on such a machine); a target with jobs never run here gets no number."""
    from tpcrepro import runner, tables

    rows = []
    for target in [*tables.list_tables(), "all"]:
        try:
            plan = runner.plan_target(target, PROFILE)
        except UserError:  # no smoke row
            continue
        secs, unknown = runner.measured_seconds(plan.jobs, BUDGET_CORES)  # `run` on the budget's 2 cores
        # The paper's tables have one budget each and `all` its own; the tables beyond the paper (the ablation of
        # the readings, the trade-off curves) have none of their own: they count in `all`.
        limit = BUDGET_MIN["all"] if target == "all" else (
            BUDGET_MIN["table"] if target.startswith("table") else None)
        measured = f"{secs / 60:.1f} min" if not unknown else f"— ({len(unknown)} recipes not run yet)"
        met = "—" if unknown or limit is None else ("yes" if secs / 60 <= limit else "**no**")
        rows.append({"What": f"`tpcrepro run {target} --profile smoke` from nothing ({len(plan.jobs)} jobs)",
                     "Target": f"≤ {limit:.0f} min" if limit is not None else "none (beyond the paper; counts in `all`)",
                     "Measured": measured, "Met": met})
        if target == README_MAIN[0]:
            about, most = README_MAIN[1], 1.1 * README_MAIN[1]
            rows.append({"What": f"README's main command (`run {target}` above, its set-up aside)",
                         "Target": f"about {about:.0f} min (≤ {most:.0f})", "Measured": measured,
                         "Met": "—" if unknown else ("yes" if secs / 60 <= most else "**no**")})
    return rows


def _train_current(recipe_id: str, latest: dict) -> list:
    h = load_recipe(recipe_id).hash
    return [r for k, r in sorted(latest.items(), key=lambda kv: str(kv[0]))
            if k[0] == recipe_id and k[1] == PROFILE and k[2] == "train" and r.recipe_hash == h]


def _mean_sd(vals: list) -> str:
    if not vals:
        return "—"
    if len(vals) == 1:
        return f"{vals[0]:.1f} (1 seed)"
    return f"{statistics.fmean(vals):.1f} ± {statistics.stdev(vals):.1f} ({len(vals)} seeds)"


def coverage(recipe_id: str) -> tuple[str, str, float]:
    """(recipe, its data, the mean fraction of patch tokens the digit touches) on its validation set."""
    from tpcrepro.data import DigitsDataset
    from tpcrepro.scenes import ScenesDataset, token_coverage

    r = load_recipe(recipe_id)
    patch = int(r.model.kwargs.get("patch_size", 2))
    if r.data.dataset == "scenes":
        val = ScenesDataset("val", r.data.scenes)
        masks = np.stack([val.scene(i)[2] for i in range(len(val))])
        return recipe_id, f"{len(val)} scenes, patch {patch}", float(token_coverage(masks, patch).mean())
    ink = ((DigitsDataset("val").images[:, 0] + 1) / 2).numpy()  # the digit is the whole image: its ink
    return recipe_id, f"{len(ink)} digits, patch {patch}", float(token_coverage(ink, patch).mean())


# The benchmark's power is judged on two differences: at the nearest MACs of two methods, and against the peer
# whose seeds spread most (the widest interval of the main rows).
POWER_PAIRS = (("smoke/tpc", "curves/evit_keep05", "at the nearest MACs"),
               ("smoke/tpc", "smoke/dynamicvit", "against the peer whose seeds spread most"))


def calibration_frame(latest: dict):
    """The smoke benchmark's power, measured: each target, the value from the records or the generator, met or not."""
    import pandas as pd

    base = load_recipe("smoke/vit")
    vit = _train_current("smoke/vit", latest)
    top1 = [r.metrics["top1"] for r in vit]
    flops = [r for k, r in latest.items() if k[0] == "smoke/vit" and k[1] == PROFILE and k[2] == "flops"
             and r.recipe_hash == base.hash]
    macs = flops[0].metrics["macs"] / 1e6 if flops else None

    def met(ok: Optional[bool]) -> str:
        return "—" if ok is None else "yes" if ok else "**no**"

    rows = [
        {"What": "dense smoke ViT top-1 (`smoke/vit`)", "Target": "80-93 %", "Measured": _mean_sd(top1),
         "Met": met(80 <= statistics.fmean(top1) <= 93 if top1 else None)},
        {"What": "its spread over seeds", "Target": "sd ≤ 1 point, 3 seeds",
         "Measured": f"{statistics.stdev(top1):.2f} ({len(top1)} seeds)" if len(top1) > 1 else "—",
         "Met": met(statistics.stdev(top1) <= 1 and len(top1) >= 3 if len(top1) > 1 else None)},
        *[{"What": f"patch tokens the digit touches, `{rid}` ({what}, mean over the validation set)",
           "Target": "≤ 30 %", "Measured": f"{100 * cov:.1f} %", "Met": met(cov <= 0.30)}
          for rid, what, cov in (coverage("smoke/vit"),)],
        {"What": "smoke ViT MACs per image", "Target": "≈ 30 M", "Measured": f"{macs:.2f} M" if macs else "—",
         "Met": met(abs(macs - 30) <= 3 if macs else None)},
    ]
    for a_id, b_id, why in POWER_PAIRS:
        a, _ = runs(a_id, latest)
        b, _ = runs(b_id, latest)
        if a is not None and b is not None and same_clusters([a, b]):
            iv = bootstrap.difference(a.hits, b.hits, clusters=a.clusters)
            rows.append({"What": f"95 % interval of a difference between two methods, {why} (`{a_id}` − `{b_id}`, "
                                 "held-out digits resampled)", "Target": "± ≤ 1 point",
                         "Measured": f"±{iv.half_width:.2f} ({iv.diff:+.2f} [{iv.lo:+.2f}, {iv.hi:+.2f}])",
                         "Met": met(iv.half_width <= 1.0)})
    rows += budget_rows()
    return pd.DataFrame(rows)
