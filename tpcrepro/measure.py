"""The `flops` and `throughput` commands: models by name, measured by one protocol each."""

from __future__ import annotations

from typing import Optional

import torch

from tpcrepro import flops, speed, weights
from tpcrepro.errors import UserError
from tpcrepro.recipe import ModelCfg


def _model(name: str, img_size: int, num_classes: int = 1000, in_chans: int = 3) -> torch.nn.Module:
    return weights.create(ModelCfg(name=name, img_size=img_size, num_classes=num_classes, in_chans=in_chans))


def static_flops(name: str, img_size: int = 224, num_classes: int = 1000, in_chans: int = 3) -> dict:
    """Params and fvcore MACs at batch 1; for plain ViTs also the analytic count as a cross-check."""
    model = _model(name, img_size, num_classes, in_chans)
    out = {"model": name, "img_size": img_size, "params": flops.count_params(model),
           "macs": flops.fvcore_macs(model, (in_chans, img_size, img_size)), "counter": "fvcore",
           "note": "all tokens kept (static count)"}
    try:
        dims = flops.ViTDims.of(model)
        n = dims.num_patches + model.num_prefix_tokens
        out["analytic_macs"] = flops.vit_macs(dims, [n] * dims.depth)
    except AttributeError:
        pass  # not a plain ViT: fvcore only
    return out


def describe_flops(out: dict) -> str:
    text = f"{out['model']} @ {out['img_size']} px: {out['params'] / 1e6:.3f} M params, {out['macs'] / 1e9:.3f} G MACs (fvcore)"
    if "analytic_macs" in out:
        text += f", analytic {out['analytic_macs'] / 1e9:.3f} G"
    return text


def throughput(name: str, device: Optional[str], batch_size: Optional[int], precision: Optional[str],
               img_size: int, compile_: bool, baseline: Optional[str]) -> dict:
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("--device cuda but no CUDA device is visible; use --device cpu")
    over = {k: v for k, v in dict(batch_size=batch_size, precision=precision, compile=compile_).items() if v is not None}
    p = speed.Protocol(device=device, **over) if device.startswith("cuda") else speed.Protocol.cpu_default(**over)
    if p.precision not in ("bf16", "fp32"):
        raise UserError(f"--precision must be bf16 or fp32, got {p.precision!r}")
    names = [baseline, name] if baseline else [name]
    models = {n: _model(n, img_size) for n in dict.fromkeys(names)}
    res = speed.compare(models, (3, img_size, img_size), p)
    out = {"model": name, **res[name], "settings": speed.settings(p)}
    if baseline:
        out.update(baseline=baseline, baseline_images_per_sec=res[baseline]["images_per_sec"])
    else:
        out.pop("ratio")
    return out


def describe_throughput(out: dict) -> str:
    s = out["settings"]
    text = (f"{out['model']}: {out['images_per_sec']:.1f} images/s ({out['latency_ms']:.1f} ms per batch of "
            f"{s['batch_size']}, {s['precision']}) on {s['device_name']}")
    if "baseline" in out:
        text += f"; {out['ratio']:.2f}x {out['baseline']} ({out['baseline_images_per_sec']:.1f} images/s, same run)"
    return text
