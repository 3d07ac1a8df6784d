"""LV-ViT's token labeling: dense per-token targets from a teacher's score maps, and MixToken.

A token-labeling training set pairs each image with a score map of the
teacher over the whole image (LV-ViT used NFNet-F6; its released maps keep
the top-k classes per position: a [2, k, h, w] tensor of values and class
indices). The random crop and flip of the image are applied to the map too
(RoI-align of the crop box onto the token grid), so token i's target is the
teacher's scores over the pixels that token i sees.

Loss (LV-ViT): soft cross-entropy of head(CLS) against the image label, plus
`weight` (0.5) × the mean over patch tokens of the soft cross-entropy of
aux_head(token) against its dense target. MixToken: a box on the token grid
is taken from the batch's flipped images after patch embedding; the image
label is mixed by the box's area, and the aux outputs inside the box are
swapped back, so each token's prediction meets its own image's map.

Data layout: for train/<class>/<name>.<ext>, the map is
<token_labels>/<class>/<name>.pt. RandAugment's geometric operations are not
mirrored on the map (photometric ones do not need it); LV-ViT mirrored them.
"""

from __future__ import annotations

import math
import random
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F

from tpcrepro.errors import UserError

Box = tuple[int, int, int, int]  # y0, y1, x0, x1 on the token grid


def rand_box(grid: tuple[int, int], lam: float, rng: Optional[random.Random] = None) -> tuple[Box, float]:
    """CutMix's box for mixing ratio lam on an h×w grid, and the lam its area gives (1 − area / h·w)."""
    rng = rng or random
    h, w = grid
    cut = math.sqrt(1.0 - lam)
    ch, cw = int(h * cut), int(w * cut)
    cy, cx = rng.randrange(h), rng.randrange(w)
    y0, y1 = max(cy - ch // 2, 0), min(cy + ch // 2, h)
    x0, x1 = max(cx - cw // 2, 0), min(cx + cw // 2, w)
    return (y0, y1, x0, x1), 1.0 - (y1 - y0) * (x1 - x0) / (h * w)


def swap_box(tokens: torch.Tensor, grid: tuple[int, int], box: Box) -> torch.Tensor:
    """Patch tokens [B, h·w, C] with the box taken from the flipped batch (its own inverse)."""
    b, n, c = tokens.shape
    y0, y1, x0, x1 = box
    t = tokens.reshape(b, grid[0], grid[1], c)
    out = t.clone()
    out[:, y0:y1, x0:x1] = t.flip(0)[:, y0:y1, x0:x1]
    return out.reshape(b, n, c)


def soft_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean over rows of −Σ target·log softmax(logits); logits and target [..., K]."""
    return -(target * F.log_softmax(logits.float(), dim=-1)).sum(-1).mean()


def token_label_loss(cls_logits: torch.Tensor, aux_tokens: torch.Tensor, target: torch.Tensor,
                     dense: torch.Tensor, weight: float = 0.5) -> torch.Tensor:
    """cls_logits [B, K], aux_tokens [B, N, K], target [B, K] (soft), dense [B, N, K] (soft)."""
    return soft_cross_entropy(cls_logits, target) + weight * soft_cross_entropy(aux_tokens, dense)


def one_hot(y: torch.Tensor, classes: int, smoothing: float = 0.0) -> torch.Tensor:
    off = smoothing / classes
    return torch.full((len(y), classes), off, device=y.device).scatter_(1, y[:, None], 1.0 - smoothing + off)


def mix_targets(y: torch.Tensor, classes: int, lam: float, smoothing: float) -> torch.Tensor:
    """The image-level target of a MixToken batch: lam of its own label, 1 − lam of the flipped batch's."""
    t = one_hot(y, classes, smoothing)
    return lam * t + (1.0 - lam) * t.flip(0)


def read_map(path: Path, classes: int) -> torch.Tensor:
    """A teacher score map [K, h, w]: a float [K, h, w] tensor, or LV-ViT's top-k [2, k, h, w] (values, indices)."""
    try:
        m = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise UserError(f"no token-label map {path}; data.token_labels must mirror train/ (<class>/<name>.pt)") from None
    except Exception as e:
        raise UserError(f"cannot read token-label map {path} ({type(e).__name__}); is it a torch tensor file?") from None
    if m.dim() == 4 and m.shape[0] == 2:  # top-k: scatter the values into a dense map
        values, idx = m[0].float(), m[1].long()
        dense = torch.zeros(classes, *values.shape[1:])
        return dense.scatter_(0, idx, values)
    if m.dim() == 3 and m.shape[0] == classes:
        return m.float()
    raise UserError(f"token-label map {path} has shape {tuple(m.shape)}; expected [{classes}, h, w] or [2, k, h, w]")


def crop_map(score: torch.Tensor, box: tuple[float, float, float, float], grid: tuple[int, int], flip: bool,
             size: tuple[int, int]) -> torch.Tensor:
    """The map under a crop: box (top, left, height, width) in pixels of an image of size (H, W). -> [h·w, K].

    Each token's target is the RoI-aligned average of the map over the pixels it covers, normalised to sum 1.
    """
    from torchvision.ops import roi_align

    k, mh, mw = score.shape
    top, left, h, w = box
    sy, sx = mh / size[0], mw / size[1]
    rois = torch.tensor([[0.0, left * sx, top * sy, (left + w) * sx, (top + h) * sy]])
    out = roi_align(score[None], rois, output_size=grid, aligned=True)[0]  # [K, gh, gw]
    if flip:
        out = out.flip(-1)
    out = out.flatten(1).t().clamp(min=0)
    return out / out.sum(-1, keepdim=True).clamp(min=1e-8)


class TokenLabelDataset(torch.utils.data.Dataset):
    """ImageFolder samples with their crop-aligned dense targets: (image, (label, dense [N, K])), or None if unreadable."""

    def __init__(self, folder, maps_root: str | Path, grid: tuple[int, int], classes: int, img_size: int,
                 scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), hflip: float = 0.5, rest=None):
        self.folder, self.maps_root, self.grid, self.classes = folder, Path(maps_root), grid, classes
        self.img_size, self.scale, self.ratio, self.hflip, self.rest = img_size, scale, ratio, hflip, rest
        if not self.maps_root.is_dir():
            raise UserError(f"data.token_labels {self.maps_root} is not a directory of score maps (<class>/<name>.pt)")

    def __len__(self) -> int:
        return len(self.folder.samples)

    def __getitem__(self, i: int):
        from PIL import Image
        from torchvision.transforms import RandomResizedCrop
        from torchvision.transforms import functional as TF

        path, label = self.folder.samples[i]
        try:
            img = Image.open(path).convert("RGB")
        except (OSError, ValueError, SyntaxError):
            from tpcrepro.data import Unreadable

            return Unreadable(path)
        size = (img.height, img.width)
        top, left, h, w = RandomResizedCrop.get_params(img, list(self.scale), list(self.ratio))
        flip = random.random() < self.hflip
        img = TF.resized_crop(img, top, left, h, w, [self.img_size, self.img_size],
                              TF.InterpolationMode.BICUBIC)
        if flip:
            img = TF.hflip(img)
        rel = Path(path).relative_to(self.folder.root).with_suffix(".pt")
        dense = crop_map(read_map(self.maps_root / rel, self.classes), (top, left, h, w), self.grid, flip, size)
        x = self.rest(img) if self.rest else TF.to_tensor(img)
        return x, (label, dense)
