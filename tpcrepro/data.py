"""Data: ImageNet / any ImageFolder with DeiT's timm transforms, and two embedded sets.

- `scenes` (the smoke profile): scikit-learn's digits composited into 32x32
  RGB scenes over crops of scikit-learn's sample photographs, among fragments
  of other digits; a fresh scene per image per epoch, a fixed validation set
  of held-out digits (tpcrepro/scenes.py).
- `digits`: scikit-learn's handwritten digits (1797 real 8x8 scans),
  upsampled to 16x16, with a fixed stratified 1437/360 train/val split.

Neither needs a download.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Subset

from tpcrepro.errors import UserError
from tpcrepro.recipe import AugCfg, DataCfg, ModelCfg

DIGITS_SIZE = 16
DIGITS_VAL = 360
DATA_ENV = "TPCREPRO_DATA"


# ---------------------------------------------------------------- digits

class DigitsDataset(Dataset):
    """scikit-learn digits as [1, 16, 16] float tensors in [-1, 1]; fixed stratified split."""

    def __init__(self, split: str, translate: int = 0):
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split

        digits = load_digits()
        images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0  # [1797, 1, 8, 8]
        images = F.interpolate(images, size=(DIGITS_SIZE, DIGITS_SIZE), mode="bilinear", align_corners=False)
        labels = torch.tensor(digits.target, dtype=torch.long)
        idx_train, idx_val = train_test_split(
            list(range(len(labels))), test_size=DIGITS_VAL, stratify=digits.target, random_state=0
        )
        idx = idx_train if split == "train" else idx_val
        self.images = (images[idx] - 0.5) / 0.5
        self.labels = labels[idx]
        self.translate = translate if split == "train" else 0
        self.classes = [str(i) for i in range(10)]

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        x = self.images[i]
        if self.translate:
            t = self.translate
            dx, dy = torch.randint(-t, t + 1, (2,)).tolist()
            x = torch.roll(F.pad(x, (t, t, t, t), value=-1.0), shifts=(dy, dx), dims=(1, 2))[:, t:-t, t:-t]
        return x, self.labels[i]


# ---------------------------------------------------------------- ImageFolder

class Unreadable(str):
    """What SafeImageFolder returns for an image it cannot read: the file's path."""


class SafeImageFolder(Dataset):
    """torchvision ImageFolder that returns Unreadable(path) for an unreadable image instead of raising."""

    def __init__(self, root: Path, transform: Callable):
        from torchvision.datasets import ImageFolder

        try:
            self.inner = ImageFolder(str(root), transform=transform)
        except FileNotFoundError as e:
            msg = str(e).split(". ")[0]
            raise UserError(f"{root}: {msg}; every class folder needs at least one image (remove empty ones)") from None
        except PermissionError as e:
            raise UserError(f"cannot read {e.filename or root}: permission denied; fix the permissions") from None
        self.classes = self.inner.classes

    def __len__(self) -> int:
        return len(self.inner)

    def __getitem__(self, i: int):
        try:
            return self.inner[i]
        except (OSError, ValueError, SyntaxError):  # PIL's errors for truncated/corrupt files
            return Unreadable(self.inner.samples[i][0])


def collate_skip(batch: list):
    """Drop samples that failed to load; return (images, targets, paths of the skipped ones)."""
    bad = [str(b) for b in batch if b is None or isinstance(b, Unreadable)]
    good = [b for b in batch if not (b is None or isinstance(b, Unreadable))]
    if not good:
        return None, None, bad
    x, y = torch.utils.data.default_collate(good)
    return x, y, bad


EMBEDDED = ("digits", "scenes")  # data sets generated from what ships inside scikit-learn: no directory


def resolve_root(cfg: DataCfg, override: Optional[str] = None) -> Optional[Path]:
    """The data directory of an ImageFolder data set (None for an embedded one); a missing one is a UserError."""
    if cfg.dataset in EMBEDDED:
        return None
    root = override or cfg.root or os.environ.get(DATA_ENV)
    if not root:
        raise UserError(
            f"no data directory for dataset '{cfg.dataset}': pass --data /path/to/imagenet "
            f"(an ImageFolder with train/ and val/) or set {DATA_ENV}"
        )
    path = Path(os.path.expandvars(os.path.expanduser(root)))
    if not path.is_dir():
        raise UserError(f"data directory {path} does not exist; pass --data with the folder that holds train/ and val/")
    for split in ("train", "val"):
        if not (path / split).is_dir():
            raise UserError(f"data directory {path} has no '{split}/' folder; it needs train/ and val/ in ImageFolder layout")
        if not os.access(path / split, os.R_OK | os.X_OK):
            raise UserError(f"cannot read {path / split}: permission denied; fix the permissions")
    return path


def image_transform(model_cfg: ModelCfg, data_cfg: DataCfg, train: bool, mean=None, std=None):
    """timm's DeiT transforms; mean/std default to ImageNet's (what DeiT and Swin use)."""
    from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, create_transform

    mean, std = mean or IMAGENET_DEFAULT_MEAN, std or IMAGENET_DEFAULT_STD
    aug = data_cfg.aug
    if not train:
        return create_transform(
            model_cfg.img_size, is_training=False, interpolation=data_cfg.interpolation,
            mean=mean, std=std, crop_pct=data_cfg.crop_pct,
        )
    return create_transform(
        model_cfg.img_size, is_training=True, auto_augment=aug.auto_augment, color_jitter=aug.color_jitter,
        hflip=aug.hflip, re_prob=aug.re_prob, re_mode=aug.re_mode, interpolation=data_cfg.interpolation,
        mean=mean, std=std,
    )


# ---------------------------------------------------------------- public

@dataclass
class Datasets:
    train: Dataset
    val: Dataset
    num_classes: int


def _subset(ds: Dataset, n: Optional[int]) -> Dataset:
    if n is None or n >= len(ds):
        return ds
    g = torch.Generator().manual_seed(0)
    idx = sorted(torch.randperm(len(ds), generator=g)[:n].tolist())
    return Subset(ds, idx)


def token_label_train(path: Path, data_cfg: DataCfg, model_cfg: ModelCfg, grid: tuple[int, int], classes: int,
                      mean=None, std=None):
    """The training set with dense targets (LV-ViT token labeling): crop and flip shared by image and map."""
    from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, create_transform
    from torchvision.datasets import ImageFolder
    from torchvision.transforms import Compose

    from tpcrepro.token_labeling import TokenLabelDataset

    aug = data_cfg.aug
    _, secondary, final = create_transform(
        model_cfg.img_size, is_training=True, auto_augment=aug.auto_augment, color_jitter=aug.color_jitter,
        hflip=0.0, re_prob=aug.re_prob, re_mode=aug.re_mode, interpolation=data_cfg.interpolation,
        mean=mean or IMAGENET_DEFAULT_MEAN, std=std or IMAGENET_DEFAULT_STD, separate=True)
    folder = ImageFolder(str(path))
    return TokenLabelDataset(folder, data_cfg.token_labels, grid, classes, model_cfg.img_size, hflip=aug.hflip,
                             rest=Compose([secondary, final]))


def build_datasets(data_cfg: DataCfg, model_cfg: ModelCfg, root: Optional[str] = None,
                   mean=None, std=None, token_grid: Optional[tuple[int, int]] = None, seed: int = 0) -> Datasets:
    """Train and val sets; with data.token_labels, train samples carry dense targets on token_grid.

    `seed` picks the training scenes of the `scenes` set (the validation scenes are the same for every seed).
    """
    if data_cfg.dataset in ("digits", "scenes"):
        if data_cfg.token_labels:
            raise UserError(f"the {data_cfg.dataset} set has no teacher score maps: remove data.token_labels")
        if data_cfg.dataset == "digits":
            train, val = DigitsDataset("train", data_cfg.aug.translate), DigitsDataset("val")
        else:
            from tpcrepro.scenes import ScenesDataset

            sc = data_cfg.scenes
            if (model_cfg.img_size, model_cfg.in_chans) != (sc.canvas, 3):
                raise UserError(f"the scenes are {sc.canvas}x{sc.canvas} RGB: set model.img_size={sc.canvas} "
                                f"and model.in_chans=3 (got {model_cfg.img_size}, {model_cfg.in_chans})")
            train, val = ScenesDataset("train", sc, seed), ScenesDataset("val", sc)
        n_cls = 10
    else:
        path = resolve_root(data_cfg, root)
        train = SafeImageFolder(path / "train", image_transform(model_cfg, data_cfg, True, mean, std))
        val = SafeImageFolder(path / "val", image_transform(model_cfg, data_cfg, False, mean, std))
        if train.classes != val.classes:
            raise UserError(f"{path}: train/ and val/ have different class folders; they must match")
        n_cls = len(train.classes)
        if data_cfg.token_labels:
            if token_grid is None:
                raise UserError("data.token_labels needs a model with patch tokens (LV-ViT); remove the key")
            train = token_label_train(path / "train", data_cfg, model_cfg, token_grid, n_cls, mean, std)
    if n_cls != model_cfg.num_classes:
        raise UserError(
            f"the data has {n_cls} classes but model.num_classes is {model_cfg.num_classes}; "
            f"set --set model.num_classes={n_cls}"
        )
    return Datasets(_subset(train, data_cfg.subset_train), _subset(val, data_cfg.subset_val), n_cls)


def set_epoch(ds: Dataset, epoch: int) -> None:
    """Tell a data set that draws per epoch (scenes) which epoch this is, through a Subset if any."""
    inner = ds.dataset if isinstance(ds, Subset) else ds
    if hasattr(inner, "set_epoch"):
        inner.set_epoch(epoch)


class ShardSampler(torch.utils.data.Sampler):
    """Every rank takes indices rank, rank+world, ...: no padding, so evaluation counts are exact."""

    def __init__(self, n: int, rank: int, world: int):
        self.idx = list(range(rank, n, world))

    def __iter__(self):
        return iter(self.idx)

    def __len__(self) -> int:
        return len(self.idx)


def train_loader(ds: Dataset, batch_size: int, workers: int, aug: AugCfg, seed: int,
                 rank: int = 0, world: int = 1) -> DataLoader:
    if aug.repeated_aug:
        from timm.data.distributed_sampler import RepeatAugSampler

        sampler = RepeatAugSampler(ds, num_replicas=world, rank=rank, shuffle=True)
    else:
        sampler = torch.utils.data.DistributedSampler(ds, num_replicas=world, rank=rank, shuffle=True, seed=seed)
    return DataLoader(
        ds, batch_size=batch_size, sampler=sampler, num_workers=workers, collate_fn=collate_skip,
        drop_last=len(ds) >= batch_size * world, pin_memory=torch.cuda.is_available(),
        persistent_workers=False,  # fresh workers each epoch draw their seeds from the reseeded main RNG: resumable
    )


def eval_loader(ds: Dataset, batch_size: int, workers: int, rank: int = 0, world: int = 1) -> DataLoader:
    return DataLoader(
        ds, batch_size=batch_size, sampler=ShardSampler(len(ds), rank, world), num_workers=workers,
        collate_fn=collate_skip, pin_memory=torch.cuda.is_available(),
    )


def mixup_fn(aug: AugCfg, num_classes: int):
    """timm's Mixup/CutMix with label smoothing, or None when both are off."""
    if aug.mixup <= 0 and aug.cutmix <= 0:
        return None
    from timm.data import Mixup

    return Mixup(
        mixup_alpha=aug.mixup, cutmix_alpha=aug.cutmix, prob=aug.mixup_prob, switch_prob=aug.switch_prob,
        mode="batch", label_smoothing=aug.smoothing, num_classes=num_classes,
    )
