"""Models registered with timm. Importing this package registers them."""

from __future__ import annotations

from tpcrepro.models import smoke  # noqa: F401  (registers vit_smoke_*)
from tpcrepro.models import vit  # noqa: F401  (registers tpc_deit_*, tpc_vit_smoke)

ADAPTIVE_PREFIXES = ("tpc_",)


def is_adaptive(name: str) -> bool:
    """Models whose MACs differ per image (reported as a mean over evaluation images)."""
    return name.startswith(ADAPTIVE_PREFIXES)


def method_kwargs(recipe) -> dict:
    """The recipe sections a model family takes as constructor arguments."""
    from tpcrepro.errors import UserError

    if recipe.model.name.startswith("tpc_"):
        return {"tpc": recipe.tpc, "kappa": recipe.stabilizer.kappa}
    if recipe.stabilizer.kappa is not None:
        raise UserError(f"stabilizer.kappa is set but {recipe.model.name} has no stabilizer; remove the key")
    return {}
