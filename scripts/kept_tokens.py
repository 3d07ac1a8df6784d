"""Which patch tokens a trained smoke DynamicViT keeps: those the digit touches against the rest.

    python scripts/kept_tokens.py RECIPE CHECKPOINT [CHECKPOINT ...] [--scenes 1000]

RECIPE builds the model (e.g. smoke/dynamicvit_stab); each CHECKPOINT is a run's
checkpoint.pt (runs/<recipe>/<hash>/s<seed>/). On the first --scenes validation
scenes it runs the removed form (as evaluation does), with the recipe's κ and
with dense attention, and prints the share of digit tokens (a pixel of the
digit's alpha > 0.25: scenes.digit_tokens, as the coverage counts) and of the other tokens
that survive the last pruning stage. A predictor that ignores content keeps the
same share of both; one that finds the digit keeps more of its tokens.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from tpcrepro import methods, weights
from tpcrepro.errors import UserError
from tpcrepro.recipe import load_recipe
from tpcrepro.scenes import ScenesDataset, digit_tokens


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("recipe")
    ap.add_argument("checkpoints", nargs="+")
    ap.add_argument("--scenes", type=int, default=1000)
    a = ap.parse_args()
    torch.set_num_threads(1)
    r = load_recipe(a.recipe)
    if r.model.name.split("_")[0] != "dynamicvit":
        raise SystemExit(f"error: {a.recipe} is not a DynamicViT recipe; pass one such as smoke/dynamicvit")
    ds = ScenesDataset("val", r.data.scenes)
    xs, masks = zip(*[(ds[i][0], ds.scene(i)[2]) for i in range(a.scenes)])
    x = torch.stack(xs)
    digit = torch.from_numpy(digit_tokens(np.stack(masks), r.model.kwargs.get("patch_size", 4))).reshape(len(x), -1)
    for path in a.checkpoints:
        if not Path(path).is_file():
            raise SystemExit(f"error: no checkpoint at {path}; pass a run's checkpoint.pt (runs/<recipe>/<hash>/s<seed>/)")
        model = weights.create(r.model, **methods.method_kwargs(r))
        try:
            model.load_state_dict(weights.read_state_dict(path))  # a run's checkpoint: its "model" entry
        except UserError as e:
            raise SystemExit(f"error: {e}") from None
        model.eval()
        for kappa in dict.fromkeys((model.kappa, None)):
            model.kappa = kappa
            with torch.no_grad():
                last = model.forward_removed(x)["kept_index"][-1]
            kept = torch.zeros_like(digit).scatter_(1, last, True)
            share = lambda m: 100.0 * (kept & m).sum().item() / m.sum().item()  # noqa: E731
            print(f"{path}  kappa {kappa}: digit tokens kept {share(digit):.1f} %, other tokens kept {share(~digit):.1f} %"
                  f" ({last.shape[1]} of {digit.shape[1]} kept)")


if __name__ == "__main__":
    main()
