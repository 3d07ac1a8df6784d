"""Models registered with timm. Importing this package registers them.

Each behaves as any timm model (forward -> logits); the hooks the trainer and
the measuring code use are written down in tpcrepro.models.api.
"""

from __future__ import annotations

from tpcrepro.models.api import is_adaptive, stats_forward  # noqa: F401
from tpcrepro.models import smoke  # noqa: F401,E402  (registers vit_smoke_*)
from tpcrepro.models import vit  # noqa: F401  (registers tpc_deit_*, tpc_vit_smoke)
from tpcrepro.models import avit, dynamicvit, evit, tome  # noqa: F401,E402  (registers avit_*, dynamicvit_*, evit_*, tome_*)
from tpcrepro.models import lvvit  # noqa: F401,E402  (registers lvvit_*, tpc_lvvit_*, evit_lvvit_*)
from tpcrepro.models import swin  # noqa: F401,E402  (registers swin_smoke, tpc_swin_*)

# model-name prefix -> the recipe sections its constructor takes
METHOD_SECTIONS = {"tpc_": ("tpc",), "avit_": ("tpc",), "evit_": ("evit",), "dynamicvit_": ("dynamicvit",),
                   "tome_": ("tome",)}


def method_kwargs(recipe) -> dict:
    """The recipe sections a model family takes as constructor arguments."""
    from tpcrepro.errors import UserError

    for prefix, sections in METHOD_SECTIONS.items():
        if recipe.model.name.startswith(prefix):
            out = {**{s: getattr(recipe, s) for s in sections}, "kappa": recipe.stabilizer.kappa}
            if recipe.stabilizer.train_only:
                if prefix not in ("tpc_", "avit_") or recipe.model.name.startswith("tpc_swin"):
                    raise UserError(f"stabilizer.train_only is not supported by {recipe.model.name}; remove the key")
                out["kappa_train_only"] = True
            return out
    if recipe.stabilizer.kappa is not None:
        raise UserError(f"stabilizer.kappa is set but {recipe.model.name} has no stabilizer; remove the key")
    return {}
