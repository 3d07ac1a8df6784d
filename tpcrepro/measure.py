"""The `flops` and `throughput` commands: models by name, measured by one protocol each."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

from tpcrepro import flops, speed, weights
from tpcrepro.errors import UserError
from tpcrepro.models import api
from tpcrepro.recipe import ModelCfg


def _model(name: str, img_size: int, num_classes: int = 1000, in_chans: int = 3) -> torch.nn.Module:
    return weights.create(ModelCfg(name=name, img_size=img_size, num_classes=num_classes, in_chans=in_chans))


def count_macs(model: torch.nn.Module, input_shape: tuple, adaptive: bool, kappa: Optional[int] = None) -> dict:
    """Params and the static MACs of one image, by the right counter for the model.

    Adaptive models (per-image token counts): the all-tokens count from the
    analytic counter, as `macs_all_tokens` (their mean over images needs
    data: `adaptive_flops`). Fixed-schedule methods count themselves exactly,
    κ included (fvcore cannot see κ), cross-checked by fvcore when κ is off.
    Anything else: fvcore, with the analytic count beside it for plain ViTs.
    """
    out: dict = {"params": flops.count_params(model)}
    if adaptive:
        out.update(macs_all_tokens=model.macs_all_tokens(),
                   counter="analytic", note="all tokens computed; the mean over images needs a trained checkpoint")
        return out
    if isinstance(model, api.FixedSchedule):
        out.update(macs=model.macs(), counter="analytic", note="the method's fixed token schedule")
        if kappa is None:
            out["fvcore_macs"] = flops.fvcore_macs(model, input_shape)
        return out
    out.update(macs=flops.fvcore_macs(model, input_shape), counter="fvcore", note="all tokens kept (static count)")
    from timm.layers import PatchEmbed

    if isinstance(getattr(model, "patch_embed", None), PatchEmbed) and hasattr(model, "blocks"):  # a plain ViT
        dims = flops.ViTDims.of(model)
        out["analytic_macs"] = flops.vit_macs(dims, [dims.num_patches + model.num_prefix_tokens] * dims.depth)
    return out


def static_flops(name: str, img_size: int = 224, num_classes: int = 1000, in_chans: int = 3) -> dict:
    """`tpcrepro flops --model`: params and MACs of one image for a model by name."""
    model = _model(name, img_size, num_classes, in_chans)
    shape = (in_chans, img_size, img_size)
    out = {"model": name, "img_size": img_size, **count_macs(model, shape, api.is_adaptive(model))}
    if "macs_all_tokens" in out:  # without a checkpoint an adaptive model reports its all-tokens figure, and says so
        out["macs"] = out["macs_all_tokens"]
        out["note"] = "all tokens computed (no checkpoint given: pass --checkpoint for the mean over images)"
    return out


def adaptive_flops(checkpoint: str, data_root: Optional[str], device: Optional[str]) -> dict:
    """Mean over the evaluation images of each image's own MACs, for a trained adaptive model."""
    from tpcrepro import data as data_mod
    from tpcrepro import distributed
    from tpcrepro.models import method_kwargs
    from tpcrepro.recipe import load_recipe
    from tpcrepro.train import evaluate

    from tpcrepro import checkpoint as ckpt

    if not Path(checkpoint).is_file():
        raise UserError(f"no checkpoint at {checkpoint}; pass runs/<recipe>/<hash>/s<seed>/checkpoint.pt")
    state = ckpt.load(Path(checkpoint), fix="pass another checkpoint, or train the run again with --force")
    if "recipe" not in state or not isinstance(state.get("model"), dict):
        raise UserError(f"{checkpoint} is not a tpcrepro checkpoint (runs/<recipe>/<hash>/s<seed>/checkpoint.pt)")
    recipe = load_recipe(state["recipe"], tuple(state.get("overrides", ())))
    model = weights.create(recipe.model.__class__(**{**recipe.model.__dict__, "pretrained": None, "init_from": None}),
                           **method_kwargs(recipe))
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as e:  # torch lists every mismatch over many lines: name the first
        detail = " ".join(str(e).split("\n\t")[1:2]).strip() or str(e).splitlines()[0]
        if len(detail) > 100:
            detail = detail[:100].rsplit(", ", 1)[0] + ", ..."
        raise UserError(f"the weights in {checkpoint} do not fit {recipe.model.name} of recipe {recipe.id} "
                        f"({detail}); was the recipe changed since the run? rerun it or pass its own checkpoint") from None
    d = distributed.Dist(device=device or ("cuda" if torch.cuda.is_available() else "cpu"))
    ds = data_mod.build_datasets(recipe.data, recipe.model, data_root)
    loader = data_mod.eval_loader(ds.val, recipe.eval.batch_size, recipe.data.workers)
    res = evaluate(model.to(d.device), loader, d)
    m = recipe.model
    static = count_macs(model, (m.in_chans, m.img_size, m.img_size), True, recipe.stabilizer.kappa)
    return {"model": m.name, "recipe": recipe.id, "checkpoint": str(checkpoint), "params": static["params"],
            "macs": res["macs"], "macs_all_tokens": static["macs_all_tokens"], "counter": "analytic, mean over images",
            "n_images": res["n_val"], "top1": res["top1"],
            **{k: v for k, v in res.items() if k.startswith("tokens_")}}


def describe_flops(out: dict) -> str:
    if "n_images" in out:
        per_layer = " ".join(f"{v:.1f}" for v in out["tokens_n_q"])
        return (f"{out['model']} ({out['checkpoint']}): {out['params'] / 1e6:.3f} M params, "
                f"{out['macs'] / 1e9:.4f} G MACs mean over {out['n_images']} images "
                f"({out['macs'] / out['macs_all_tokens']:.3f} of all tokens); tokens computed per layer: {per_layer}")
    text = (f"{out['model']} @ {out['img_size']} px: {out['params'] / 1e6:.3f} M params, "
            f"{out['macs'] / 1e9:.3f} G MACs ({out['counter']}; {out['note']})")
    if "analytic_macs" in out:
        text += f", analytic {out['analytic_macs'] / 1e9:.3f} G"
    return text


def protocol(device: Optional[str], batch_size: Optional[int], precision: Optional[str], compile_: bool) -> speed.Protocol:
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("--device cuda but no CUDA device is visible; use --device cpu")
    over = {k: v for k, v in dict(batch_size=batch_size, precision=precision, compile=compile_).items() if v is not None}
    p = speed.Protocol(device=device, **over) if device.startswith("cuda") else speed.Protocol.cpu_default(**over)
    if p.precision not in ("bf16", "fp32"):
        raise UserError(f"--precision must be bf16 or fp32, got {p.precision!r}")
    return p


def throughput(names: list[str], device: Optional[str], batch_size: Optional[int], precision: Optional[str],
               img_size: int, compile_: bool, baseline: Optional[str]) -> list[dict]:
    """Time every model (and the baseline first) in one process by one protocol; ratios against the baseline."""
    p = protocol(device, batch_size, precision, compile_)
    order = list(dict.fromkeys(([baseline] if baseline else []) + names))
    models = {n: _model(n, img_size) for n in order}
    res = speed.compare(models, (3, img_size, img_size), p)
    outs = []
    for n in names:
        out = {"model": n, **res[n], "settings": speed.settings(p)}
        if baseline:
            out.update(baseline=baseline, baseline_images_per_sec=res[baseline]["images_per_sec"])
        else:
            out.pop("ratio")
        outs.append(out)
    return outs


def describe_throughput(out: dict) -> str:
    s = out["settings"]
    text = (f"{out['model']}: {out['images_per_sec']:.1f} images/s ({out['latency_ms']:.1f} ms per batch of "
            f"{s['batch_size']}, {s['precision']}) on {s['device_name']}")
    if "baseline" in out:
        text += f"; {out['ratio']:.2f}x {out['baseline']} ({out['baseline_images_per_sec']:.1f} images/s, same run)"
    return text


def bench_schedule(name: str, target_macs: float, kappa: Optional[int], spread: float, device: Optional[str],
                   batch_size: Optional[int], precision: Optional[str]) -> dict:
    """Benchmark mode: the dense backbone vs the TPC model at a fixed token schedule, in one run."""
    from tpcrepro.bench import compare_at_macs, compare_swin_at_macs
    from tpcrepro.models import lvvit, swin, vit

    known = vit.BACKBONE | lvvit.BACKBONE | swin.BACKBONE
    if name not in known:
        raise UserError(f"benchmark mode takes a TPC model ({', '.join(known)}), got '{name}'")
    p = protocol(device, batch_size, precision, False)
    import timm

    torch.manual_seed(0)
    backbone = timm.create_model(known[name])  # its default size, classes and channels
    img = backbone.patch_embed.img_size
    pe = backbone.patch_embed
    args = dict(num_classes=backbone.num_classes, img_size=img, in_chans=getattr(pe, "conv1", pe.proj).in_channels)
    if name in swin.BACKBONE:
        model = timm.create_model(name, **args)
        model.load_state_dict(backbone.state_dict())
        res = compare_swin_at_macs(model, backbone, target_macs, p, spread)
        res.update(removed_padded_ratio=float("nan"))
    else:
        model = timm.create_model(name, kappa=kappa, **args)
        model.load_state_dict(backbone.state_dict())
        res = compare_at_macs(model, backbone, target_macs, p, spread)
    return {"model": name, "backbone": known[name], "target_macs": target_macs, **res, "settings": speed.settings(p)}


def describe_bench_schedule(out: dict) -> str:
    s = out["settings"]
    if out["buckets"]:
        removed = f"removed, {out['buckets']} buckets"
        padded = f" | removed, padded to the batch max {out['removed_padded_ratio']:.2f}x"
    else:  # Swin: the MLP on the computed tokens, packed over the batch (no padding)
        removed, padded = "removed (norm2 + MLP on the computed tokens, packed)", ""
    return (f"{out['model']} at {out['macs'] / 1e9:.3f} G MACs (mean {out['mean_tokens']} tokens per layer, ±{out['spread']:.0%} "
            f"per image; benchmark mode, random weights) vs {out['backbone']} at {out['dense_macs'] / 1e9:.3f} G, "
            f"batch {s['batch_size']} {s['precision']} on {s['device_name']}:\n"
            f"  MACs ratio {out['macs_ratio']:.2f}x | {removed} {out['removed_ratio']:.2f}x "
            f"({out['removed_images_per_sec']:.1f} img/s){padded} | masked {out['masked_ratio']:.2f}x | dense "
            f"{out['dense_images_per_sec']:.1f} img/s")


def write_bench_record(out: dict) -> Path:
    """A record of a `throughput` or `bench` measurement: recipe 'bench/<model>', profile 'bench'."""
    from tpcrepro import records

    s = out["settings"]
    metrics = {k: v for k, v in out.items() if k not in ("settings", "model", "backbone", "baseline")}
    rec = records.new(f"bench/{out['model']}", "-", "bench", "throughput", metrics=metrics,
                      settings={**s, "backbone": out.get("backbone"), "baseline": out.get("baseline")},
                      device=s["device"])
    return records.write_record(rec)
