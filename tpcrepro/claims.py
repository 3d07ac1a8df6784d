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
    """One recipe's current train records with per-image hits: hits [seeds, n], mean MACs, where from."""

    recipe: str
    hits: np.ndarray
    macs: Optional[float]
    source: str


def runs(recipe_id: str, latest: dict) -> tuple[Optional[Runs], str]:
    """(Runs, "") or (None, why not)."""
    from tpcrepro.train import unpack_correct

    current = load_recipe(recipe_id).hash
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
    return Runs(recipe_id, hits, statistics.fmean(macs) if macs else None,
                f"`{recipe_id}` s{seeds} @{current} ({commits})"), ""


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
    if any(r.hits.shape[1] != a.hits.shape[1] for r in have):
        row["missing"] = missing + ["records on different validation sets"]
        row["how"] = "—"
        return row
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
    iv = bootstrap.contrast([(1.0, a.hits), *[(-wi, r.hits) for wi, r in used]])
    row.update(macs=f"{_mmacs(a.macs)} / {_mmacs(peer_macs)}", diff=f"{iv.diff:+.2f}",
               interval=f"[{iv.lo:+.2f}, {iv.hi:+.2f}]", verdict=verdict(test, iv.lo, iv.hi, margin),
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


TEST_TEXT = {"greater": "a > b", "noninferior": "a ≥ b − {m}", "equivalent": "|a − b| < {m}"}


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
        "minus b's in points on the validation scenes, seeds pooled; the 95 % interval is a paired bootstrap over "
        f"the validation images ({bootstrap.N_BOOT} resamples, tpcrepro/bootstrap.py). The verdict is computed "
        "from the interval: `a > b` is supported when the whole interval is above 0 and contradicted when it is "
        f"below; `a ≥ b − m` and `|a − b| < m` use the margin m = {load_spec().get('margin', 1.0):g} point. "
        "Against a curve, b is the peer's top-1 read linearly at a's MACs between its two neighbouring points "
        "(outside its range: its nearest point). The interval covers the validation images' sampling noise; "
        "training noise between seeds shows as the ± of the tables. These are small-scale results on digits in "
        "scenes, not ImageNet results.",
        "",
        df.to_markdown(index=False, disable_numparse=True),
        "",
    ]
    return "\n".join(lines)


def write(out_dir: Optional[Path] = None, latest: Optional[dict] = None) -> Path:
    out_dir = out_dir or paths.results_dir() / "tables"
    latest = records.latest(records.load_records()) if latest is None else latest
    path = out_dir / "claims.md"
    records.atomic_write_text(path, render(latest))
    return path
