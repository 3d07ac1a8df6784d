"""Create models by name and load pretrained weights (local file or timm's hub)."""

from __future__ import annotations

import os
from pathlib import Path

import timm
import torch

from tpcrepro import checkpoint
from tpcrepro.errors import UserError
from tpcrepro.recipe import ModelCfg

_STATE_KEYS = ("model_ema", "state_dict_ema", "model", "state_dict")


def create(cfg: ModelCfg, **method: object) -> torch.nn.Module:
    """timm.create_model from a recipe's model section, with `pretrained` weights applied.

    `method` holds the method's own arguments (e.g. tpc=TPCCfg, kappa=100).
    `pretrained: hub` loads timm's hub weights of `backbone` (or of the model
    itself), so an adaptive model starts from its backbone's released weights.
    """
    import tpcrepro.models  # noqa: F401  registers tpcrepro's models

    if cfg.name not in timm.list_models() and cfg.name.split(".")[0] not in timm.list_models():
        raise UserError(f"unknown model '{cfg.name}'; `tpcrepro models` lists the names timm and tpcrepro know")
    kwargs = dict(num_classes=cfg.num_classes, in_chans=cfg.in_chans, drop_path_rate=cfg.drop_path, **cfg.kwargs)
    if cfg.img_size is not None:
        kwargs["img_size"] = cfg.img_size
    model = timm.create_model(cfg.name, pretrained=False, **kwargs, **method)
    if cfg.pretrained == "hub":
        source = cfg.backbone or cfg.name
        try:
            hub = timm.create_model(source, pretrained=True, **kwargs)
        except Exception as e:  # network, hub or cache errors come in many types
            raise UserError(
                f"could not fetch '{source}' weights from timm's hub ({type(e).__name__}); "
                "download them where a network is reachable and pass model.pretrained=/path/to/checkpoint.pth"
            ) from None
        load_state(model, hub.state_dict(), source)
    elif cfg.pretrained:
        load_weights(model, cfg.pretrained)
    return model


def read_state_dict(path: str | Path) -> dict:
    """A state dict from a timm file, a DeiT-style {'model': ...} file or a tpcrepro checkpoint."""
    p = Path(os.path.expandvars(os.path.expanduser(str(path))))
    if "$" in str(p):
        raise UserError(f"pretrained weights {path}: set the environment variable it names "
                        "(e.g. export TPCREPRO_WEIGHTS=/path/to/weights) or pass model.pretrained=/path/to/file")
    if not p.is_file():
        raise UserError(
            f"pretrained weights {p} not found; pass model.pretrained=/path/to/file, or 'hub' where a network is reachable"
        )
    obj = checkpoint.safe_load(p, fix="download it again, or pass model.pretrained= another file", what="weights from ")
    if isinstance(obj, dict):
        for key in _STATE_KEYS:
            if isinstance(obj.get(key), dict) and obj[key]:
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not all(torch.is_tensor(v) for v in obj.values()):
        raise UserError(f"{p} holds no state dict (looked for keys {', '.join(_STATE_KEYS)} or a flat dict)")
    return {k.removeprefix("module."): v for k, v in obj.items()}


def load_weights(model: torch.nn.Module, path: str | Path) -> None:
    load_state(model, read_state_dict(path), path)


def load_state(model: torch.nn.Module, sd: dict, path: object) -> None:
    """Load strictly, except classifier heads of another size (those the model's cfg names), left as initialised."""
    own = model.state_dict()
    named = getattr(model, "pretrained_cfg", {}).get("classifier") or ()
    heads = ("head.", "fc.") + tuple(f"{c}." for c in ((named,) if isinstance(named, str) else named))
    dropped = [k for k, v in sd.items() if k in own and own[k].shape != v.shape and k.startswith(heads)]
    for k in dropped:
        sd.pop(k)
    wrong = [k for k, v in sd.items() if k in own and own[k].shape != v.shape]
    if wrong:
        raise UserError(f"weights in {path} do not fit {type(model).__name__}: '{wrong[0]}' is "
                        f"{tuple(sd[wrong[0]].shape)} there, {tuple(own[wrong[0]].shape)} here; check model.name")
    missing, unexpected = model.load_state_dict(sd, strict=False)
    new = tuple(getattr(model, "new_parameter_prefixes", ()))  # a method's own modules, absent from backbone weights
    missing = [k for k in missing if k not in dropped and not (new and k.startswith(new))]
    if missing or unexpected:
        what = f"missing {missing[:3]}" if missing else f"unexpected {unexpected[:3]}"
        raise UserError(f"weights in {path} do not fit {type(model).__name__}: {what}; check model.name")
