"""`tpcrepro bench`: the real controller's speed, side by side with its ideal and its peers.

Given a MACs target, the gate centre β is set by bisection so that the
model's removed forward (the real controller: gates, TDR, halting, pausing,
packing) lands there on the calibration images: by default the timed batch
itself, or --calib N separate random images. Then, interleaved in one
process by speed.py's protocol: the dense backbone, the TPC removed form,
the same per-image counts replayed with nothing decided at run time (the
ideal removal), the masked form, and EViT / ToMe at their published
settings; at batch 1 and at the batch size given. Without --macs the gates
are the model's own (a trained run's). Every figure says its form.
"""

from __future__ import annotations

import hashlib
import math
import time
from pathlib import Path
from typing import Optional

import timm
import torch

from tpcrepro import bench, speed
from tpcrepro.errors import UserError


def backbones() -> dict[str, str]:
    """TPC-family model name -> its dense backbone's timm name."""
    from tpcrepro.models import lvvit, swin, vit
    from tpcrepro.models.registry import DEIT_NAMES, SMOKE_NAME

    avit = {f"avit_deit_{k}": DEIT_NAMES[k] for k in "ts"} | {"avit_vit_smoke": SMOKE_NAME}
    return vit.BACKBONE | avit | lvvit.BACKBONE | swin.BACKBONE


def _args(m: torch.nn.Module) -> dict:
    """The shape arguments that build another model of m's family on m's input and tokens (a recipe sets them)."""
    pe = m.patch_embed
    first = lambda v: v[0] if isinstance(v, (tuple, list)) else v  # noqa: E731
    return dict(num_classes=m.num_classes, img_size=first(pe.img_size), patch_size=first(pe.patch_size),
                in_chans=getattr(pe, "conv1", pe.proj).in_channels)


def build(name: str, kappa: Optional[int], checkpoint: Optional[str], run: Optional[str], seed: int = 0):
    """(TPC model, dense backbone on the same weights, peers, source) in eval mode."""
    import tpcrepro.models  # noqa: F401
    from tpcrepro import jobs, weights

    known = backbones()
    if run:
        from tpcrepro.recipe import load_recipe

        name = load_recipe(run).model.name
        model = jobs.load_run_model(run, seed, checkpoint)
        path = Path(checkpoint) if checkpoint else jobs.run_dir_for(load_recipe(run), seed) / "checkpoint.pt"
        digest = hashlib.sha256(path.read_bytes()).hexdigest()[:12]  # which weights: a run made on another CPU differs
        source = f"trained run {run} (seed {seed}, checkpoint sha256 {digest})"
    if name not in known:
        raise UserError(f"bench takes a TPC or A-ViT model ({', '.join(known)}), got '{name}'")
    if not run:
        torch.manual_seed(0)
        base = timm.create_model(known[name])
        model = timm.create_model(name, **_args(base), **({} if kappa is None else {"kappa": kappa}))
        model.load_state_dict(base.state_dict())
        source = "the backbone's initial weights (timm's init, seed 0)"
        if checkpoint:
            weights.load_weights(model, checkpoint)
            source = f"weights from {checkpoint}"
    backbone = timm.create_model(known[name], **_args(model))
    backbone.load_state_dict(model.state_dict(), strict=False)
    peers = {}
    for peer in bench.PEERS.get(known[name], ()):
        m = timm.create_model(peer, **_args(model))
        m.load_state_dict(backbone.state_dict(), strict=False)
        peers[peer.split("_")[0]] = m.eval()
    return model.eval(), backbone.eval(), peers, source


def images(n: int, shape: tuple, seed: int) -> torch.Tensor:
    return torch.randn(n, *shape, generator=torch.Generator().manual_seed(seed))


def val_images(recipe_id: str, n: int, data_root: Optional[str] = None) -> torch.Tensor:
    """The first n validation images of a recipe's data set, as the model sees them [n, C, H, W].

    A trained controller decides on what it sees: timed on noise it halts and pauses as it never does on its
    data, so a trained run is timed on its own validation images (prepared beforehand: no data pipeline)."""
    from tpcrepro import data
    from tpcrepro.recipe import load_recipe

    recipe = load_recipe(recipe_id)
    val = data.build_datasets(recipe.data, recipe.model, data_root, seed=0).val
    n = min(n, len(val))
    return torch.stack([val[i][0] for i in range(n)])


def timed_batches(b: int, run_id: Optional[str], shape: tuple) -> list[torch.Tensor]:
    """What a batch size is timed on: a trained run's first max(64, 4·b) validation images in batches of b,
    walked through in turn by every repeat; otherwise one batch of random images (seed 0)."""
    if not run_id:
        return [images(b, shape, 0)]
    x = val_images(run_id, max(64, 4 * b))
    return list(x[: len(x) // b * b].split(b)) or [x]


def run(name: str, target_macs: Optional[float], batch_sizes: list[int], p: speed.Protocol, kappa: Optional[int] = None,
        checkpoint: Optional[str] = None, run_id: Optional[str] = None, calib: Optional[int] = None,
        peers: bool = True) -> dict:
    """Calibrate (unless target_macs is None) and time every form at each batch size. One dict per batch in "runs"."""
    model, backbone, peer_models, source = build(name, kappa, checkpoint, run_id)
    model, backbone = model.to(p.device), backbone.to(p.device)
    shape = (_args(model)["in_chans"], *backbone.patch_embed.img_size)
    name = model.default_cfg.get("architecture", name) if run_id else name
    out = {"model": name, "run": run_id, "backbone_name": backbones()[name], "target_macs": target_macs, "source": source,
           "mode": "real controller", "runs": []}
    fixed = None
    if target_macs is not None and calib:
        with torch.inference_mode(), speed._autocast(p):
            fixed = bench.calibrate_beta(model, images(calib, shape, 1).to(p.device), target_macs)
        out["calibration"] = {"images": calib, "seed": 1, **fixed}
    for b in batch_sizes:
        xs = [t.to(p.device) for t in timed_batches(b, run_id, shape)]
        cal = None
        if target_macs is not None and not calib:  # the timed batch is the calibration batch
            with torch.inference_mode(), speed._autocast(p):
                cal = {"images": b, "seed": 0, **bench.calibrate_beta(model, torch.cat(xs), target_macs)}
        steps = steps_for(backbone, xs[0], p)
        steps = -(-steps // len(xs)) * len(xs) if p.device == "cpu" else steps  # every batch equally often
        pb = speed.Protocol(**{**p.__dict__, "batch_size": b, "steps": steps})
        with speed._autocast(pb):
            res = bench.compare_real(model, backbone, xs, pb, peer_models if peers else None)
        out["runs"].append({"batch_size": b, "beta": model.tpc.beta, "calibration": cal or out.get("calibration"),
                            "images": "validation images of the run" if run_id else "random (seed 0)",
                            **res, "settings": speed.settings(pb)})
    return out


def steps_for(backbone: torch.nn.Module, x: torch.Tensor, p: speed.Protocol, segment_s: float = 0.3) -> int:
    """On a CPU, the steps per timed repeat that make a dense repeat last about `segment_s` (1 to 50; a timer
    read around one 3 ms forward is mostly noise, 5 forwards of 1.5 s waste minutes); elsewhere the protocol's."""
    if p.device != "cpu":
        return p.steps
    with torch.inference_mode():
        backbone(x)
        t0 = time.perf_counter()
        backbone(x)
        one = time.perf_counter() - t0
    return max(1, min(50, math.ceil(segment_s / max(one, 1e-6))))


def describe(out: dict) -> str:
    lines = [f"{out['model']} ({out['source']}) vs {out['backbone_name']}, real controller"
             + (f", gates set for {out['target_macs'] / 1e9:.3g} G MACs" if out["target_macs"] else ", its own gates")]
    for r in out["runs"]:
        s = r["settings"]
        peers = [k.removesuffix("_ratio") for k in r if k.endswith("_ratio") and not k.endswith("macs_ratio")
                 and k.removesuffix("_ratio") not in ("dense", "removed", "replayed", "masked", "grouped")]
        cells = " | ".join(f"{k} {r[f'{k}_ratio']:.2f}x (MACs {r[f'{k}_macs_ratio']:.2f}x)" for k in peers)
        lines.append(
            f"  batch {r['batch_size']} {s['precision']} on {s['device_name']}, β {r['beta']:.4g}: "
            f"MACs {r['macs'] / 1e9:.3f} G ({r['macs_ratio']:.2f}x fewer) | removed {r['removed_ratio']:.2f}x"
            f"{interval(r, 'removed')} | replayed {r['replayed_ratio']:.2f}x{interval(r, 'replayed')} | "
            + f"masked {r['masked_ratio']:.2f}x" + (f" | {cells}" if cells else "")
            + f" | dense {r['dense_images_per_sec']:.1f} img/s ({s['repeats']} repeats of {s['steps']} forward{'s' * (s['steps'] != 1)})")
    return "\n".join(lines)


def interval(r: dict, form: str) -> str:
    """' [lo, hi] (95 %)': the timing interval of a form's ratio, '' in records made before intervals were kept."""
    ci = r.get(f"{form}_ratio_ci")
    if not ci:
        return ""
    return f" [{ci[0]:.2f}, {ci[1]:.2f}] ({r[f'{form}_ratio_ci_level']:.0%})"


def verdict(rows: list[dict], need: float) -> str:
    """Whether a goal holds, from each row's timing interval (the point ratio where a record has none).

    holds: every row's interval lies at or above `need`; does not hold: every row's lies below it;
    otherwise unresolved (within the timing noise) or, where rows disagree outright, holds in part.
    """
    lo = [r.get("removed_ratio_ci", [r["removed_ratio"]] * 2)[0] for r in rows]
    hi = [r.get("removed_ratio_ci", [r["removed_ratio"]] * 2)[1] for r in rows]
    if all(v >= need for v in lo):
        return "holds"
    if all(v < need for v in hi):
        return "does not hold"
    if any(v >= need for v in lo):
        return "holds in part"
    return "unresolved: the timing interval straddles the goal"


def write_records(out: dict) -> list:
    """One bench record per batch size (recipe 'bench/<model>', profile 'bench', form 'real')."""
    from tpcrepro.measure import write_bench_record

    paths = []
    for r in out["runs"]:
        rec = {"model": out["model"], "backbone": out["backbone_name"], "mode": out["mode"], "source": out["source"],
               "run": out["run"], "target_macs": out["target_macs"], **{k: v for k, v in r.items() if k != "settings"},
               "settings": r["settings"]}
        paths.append(write_bench_record(rec))
    return paths


# ---------------------------------------------------------------- README block from the records

GOALS = (  # (model, batch predicate, minimum removed ratio, label); on the CPU, fp32
    ("tpc_deit_s", lambda b: b == 1, 1.35, "TPC-DeiT-S at 2.8 G, batch 1: ≥ 1.35× (stretch 1.5×)"),
    ("tpc_deit_s", lambda b: 16 <= b <= 32, 1.5, "TPC-DeiT-S at 2.8 G, batch 16-32: ≥ 1.5×"),
)


def real_rows(recs: list) -> list[dict]:
    """The newest real-controller bench record per (model, run, target, κ, batch, precision, device, threads)."""
    best: dict = {}
    for r in recs:
        m, s = r.metrics, r.settings
        if r.profile != "bench" or m.get("mode") != "real controller" or s.get("quick"):
            continue
        key = (r.recipe, m.get("run"), m.get("target_macs"), m.get("kappa"), m.get("batch_size"),
               s.get("precision"), s.get("device_name"), s.get("threads"))
        if key not in best or r.started_at > best[key].started_at:
            best[key] = r
    return [{**r.metrics, "model": r.recipe.removeprefix("bench/"), "settings": r.settings, "started_at": r.started_at}
            for r in best.values()]


def cpu_name(settings: dict) -> str:
    """The device's name without its core and thread counts (the table has them)."""
    return str(settings.get("device_name", "?")).split(" (")[0]


def markdown(recs: list) -> str:
    """The speed table (real and replayed side by side) and which goals hold, from the bench records."""
    rows = sorted(real_rows(recs), key=lambda r: (r["model"], r.get("run") or "", r["settings"]["threads"],
                                                  r["batch_size"], r.get("kappa") or 0))
    if not rows:
        return "(no real-controller bench records: `tpcrepro bench --model tpc_deit_s --macs 2.8e9`)"
    x = lambda r, k: f"{r[k]:.2f}×" if isinstance(r.get(k), (int, float)) else "–"  # noqa: E731
    lines = ["| model | gates | batch | device, threads | MACs (G) | MACs ÷ | TPC removed, real controller | "
             "the same counts replayed | TPC masked | EViT 0.7 | ToMe r 13 |",
             "|" + "---|" * 11]
    for r in rows:
        s = r["settings"]
        gates = f"set for {r['target_macs'] / 1e9:.3g} G" if r.get("target_macs") else f"trained ({r.get('run')})"
        if r.get("kappa"):
            gates += f", κ {r['kappa']}"
        peer = lambda k: (f"{r[f'{k}_ratio']:.2f}× (MACs {r[f'{k}_macs_ratio']:.2f}×)"  # noqa: E731
                          if f"{k}_ratio" in r else "–")
        lines.append(f"| {r['model']} | {gates} | {r['batch_size']} | {s['device_name']}, {s['precision']}, "
                     f"{s['threads']} | {r['macs'] / 1e9:.3f} | {r['macs_ratio']:.2f}× | {x(r, 'removed_ratio')}"
                     f"{interval(r, 'removed')} | {x(r, 'replayed_ratio')}{interval(r, 'replayed')} | "
                     f"{x(r, 'masked_ratio')} | {peer('evit')} | "
                     f"{peer('tome')} |")
    lines += ["", "Every ratio is the median over repeats of the ratio to the dense backbone timed beside it "
              "(interleaved, one process); [lo, hi] is a distribution-free interval for that median (its coverage in "
              "brackets). A goal holds when the interval lies at or above it, fails when below, else is unresolved; "
              "it is judged from the rows that have an interval where there are any. Goals:"]
    for model, batch_ok, need, label in GOALS:
        got = [r for r in rows if r["model"] == model and batch_ok(r["batch_size"]) and not r.get("run")
               and r.get("target_macs") and abs(r["target_macs"] - 2.8e9) < 1e7 and not r.get("kappa")]
        got = [r for r in got if r.get("removed_ratio_ci")] or got  # judged from the rows with a timing interval
        if not got:
            lines.append(f"- {label}: not measured")
            continue
        cells = ", ".join(f"{r['removed_ratio']:.2f}×{interval(r, 'removed')} (batch {r['batch_size']}, "
                          f"{r['settings']['threads']} thread{'s' * (r['settings']['threads'] > 1)}, "
                          f"{cpu_name(r['settings'])})" for r in got)
        lines.append(f"- {label}: {cells}: **{verdict(got, need)}**")
    trained = [r for r in rows if r.get("run")]
    trained = [r for r in trained if r.get("removed_ratio_ci")] or trained
    for batch in sorted({r["batch_size"] for r in trained}):  # one verdict per batch size: the goal names two
        at = [r for r in trained if r["batch_size"] == batch]
        cells = ", ".join(f"{r['run']}: {r['removed_ratio']:.2f}×{interval(r, 'removed')} "
                          f"({r['settings']['threads']} thread{'s' * (r['settings']['threads'] > 1)}, "
                          f"{cpu_name(r['settings'])})" for r in at)
        lines.append(f"- a trained smoke TPC not slower than its dense backbone, batch {batch}: {cells}: "
                     f"**{verdict(at, 1.0)}**")
    return "\n".join(lines)
