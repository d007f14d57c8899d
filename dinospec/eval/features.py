"""Frozen-backbone features: image sets for evaluation, the backbone to evaluate, and one batched extraction pass.

Features are extracted once per data set and then reused by every probe (all k of the k-NN, the whole lr grid of
the linear probes), so the expensive part — the backbone forward — runs exactly once per image.

Preprocessing (every probe, every split): resize the shorter side to ``img_size`` (bicubic; nearest for masks),
centre-crop ``img_size`` x ``img_size``, ImageNet mean/std. Images are decoded as in training
(`dinospec.data.datasets.decode_image`: EXIF rotation, alpha over white, 16-bit grey scaled, any mode to RGB).

An image that cannot be read (truncated, empty, not an image) is skipped, as in training: each is logged once
with its path, and `Features.skipped` lists them, so a report can say how many were left out.
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torchvision.transforms.functional as TF
from PIL import Image
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, default_collate
from torchvision.datasets import ImageFolder
from torchvision.transforms import InterpolationMode
from tqdm import tqdm

from dinospec.data.augment import IMAGENET_MEAN, IMAGENET_STD
from dinospec.data.datasets import IMAGE_EXTENSIONS, BrokenImage, decode_image

MASK_EXTENSION = ".png"

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------------------------
# images


def open_rgb(path: str | Path) -> Image.Image:
    """Decode an image to RGB with training's decoder; a file that is not an image raises BrokenImage."""
    return decode_image(str(path), str(path))


def is_image(path: Path) -> bool:
    return path.suffix.lower().removeprefix(".") in IMAGE_EXTENSIONS


def resize_crop(img: Image.Image, size: int, interpolation: InterpolationMode) -> Image.Image:
    """Shorter side to `size`, then the centred size x size square."""
    return TF.center_crop(TF.resize(img, size, interpolation=interpolation), [size, size])


def to_normalized_tensor(img: Image.Image) -> Tensor:
    return TF.normalize(TF.to_tensor(img), IMAGENET_MEAN, IMAGENET_STD)  # (3, H, W)


def eval_transform(img_size: int) -> Callable[[Image.Image], Tensor]:
    def transform(img: Image.Image) -> Tensor:
        return to_normalized_tensor(resize_crop(img, img_size, InterpolationMode.BICUBIC))

    return transform


def image_folder(root: str | Path, img_size: int) -> ImageFolder:
    """A classification split laid out as ``root/<class>/<image>`` (torchvision's ImageFolder)."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {root} does not exist")
    return ImageFolder(str(root), transform=eval_transform(img_size), loader=open_rgb)


def paired_image_folders(train_dir: str | Path, val_dir: str | Path, img_size: int) -> tuple[ImageFolder,
                                                                                             ImageFolder]:
    """Train and val splits whose class folders match (ImageFolder numbers classes by sorted folder name)."""
    train, val = image_folder(train_dir, img_size), image_folder(val_dir, img_size)
    if train.classes != val.classes:
        only_train = sorted(set(train.classes) - set(val.classes))
        only_val = sorted(set(val.classes) - set(train.classes))
        raise ValueError(f"train and val class folders differ (only in train: {only_train}, only in val: "
                         f"{only_val}); class indices would not match")
    return train, val


def list_images(root: str | Path, max_images: int | None = None) -> list[Path]:
    """Image files under `root` (recursively), in sorted order, at most `max_images`."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {root} does not exist")
    files = sorted(p for p in root.rglob("*") if is_image(p) and p.is_file())
    if not files:
        raise FileNotFoundError(f"no images ({', '.join(sorted(IMAGE_EXTENSIONS))}) under {root}")
    return files[:max_images] if max_images else files


class ImageList(Dataset):
    """Unlabelled images (for the analyses): returns (image tensor, index)."""

    def __init__(self, files: Sequence[Path], img_size: int):
        self.files, self.transform = list(files), eval_transform(img_size)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        return self.transform(open_rgb(self.files[i])), i


class SegmentationFolder(Dataset):
    """(image, mask) pairs that share a file stem.

    Accepted layouts: ``root/<stem>.jpg`` beside ``root/<stem>.png`` (image: any non-PNG image extension, mask: the
    PNG), or ``root/images/<stem>.<ext>`` with ``root/masks/<stem>.png``. A mask is a single-channel PNG whose pixel
    values are class indices; 255 means "ignore". Images without a mask are an error (the set would silently shrink).
    """

    def __init__(self, root: str | Path, img_size: int):
        root = Path(root)
        if not root.is_dir():
            raise FileNotFoundError(f"segmentation folder {root} does not exist")
        img_dir, mask_dir = (root / "images", root / "masks") if (root / "images").is_dir() else (root, root)
        masks = {p.stem: p for p in mask_dir.iterdir() if p.suffix.lower() == MASK_EXTENSION}
        images = sorted(p for p in img_dir.iterdir() if is_image(p)
                        and not (img_dir == mask_dir and p.suffix.lower() == MASK_EXTENSION))
        missing = [p.name for p in images if p.stem not in masks]
        if missing:
            raise FileNotFoundError(f"{len(missing)} image(s) in {img_dir} have no mask {mask_dir}/<stem>.png, "
                                    f"e.g. {missing[:3]}")
        if not images:
            raise FileNotFoundError(f"no (image, mask) pairs in {root}: expected <stem>.jpg + <stem>.png, "
                                    f"or images/ + masks/")
        self.pairs = [(p, masks[p.stem]) for p in images]
        self.img_size = img_size

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        img_path, mask_path = self.pairs[i]
        img = resize_crop(open_rgb(img_path), self.img_size, InterpolationMode.BICUBIC)
        with Image.open(mask_path) as m:
            if m.mode not in ("L", "P", "I", "I;16"):
                raise ValueError(f"mask {mask_path} has mode {m.mode}: expected one channel of class indices")
            mask = resize_crop(m.copy(), self.img_size, InterpolationMode.NEAREST)
        return to_normalized_tensor(img), torch.as_tensor(TF.pil_to_tensor(mask)[0], dtype=torch.long)  # (H, W)


def read_class_names(root: str | Path) -> list[str] | None:
    """Class names from ``classes.txt`` (lines "<index> <name>") in `root` or its parent, if there is one."""
    for folder in (Path(root), Path(root).parent):
        path = folder / "classes.txt"
        if path.is_file():
            rows = [line.split(maxsplit=1) for line in path.read_text().splitlines() if line.strip()]
            return [name.strip() for _, name in sorted(rows, key=lambda r: int(r[0]))]
    return None


# ----------------------------------------------------------------------------------------------------------------
# the backbone


def resolve_device(device: str | None) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def load_eval_backbone(path: str | Path) -> nn.Module:
    """A frozen backbone from an export dir (config.json + model.safetensors) or from a run dir (latest teacher)."""
    path = Path(path)
    if (path / "config.json").is_file():
        from dinospec.export import load_backbone  # imported on use: the export module is only needed here

        return load_backbone(path)
    if (path / "checkpoints").is_dir():
        from dinospec.export import export_run, load_backbone

        with tempfile.TemporaryDirectory(prefix="dinospec-eval-") as tmp:
            export_run(path, tmp)
            return load_backbone(tmp)
    raise FileNotFoundError(f"--backbone {path}: expected an export dir (with config.json) or a run dir "
                            f"(with checkpoints/)")


# ----------------------------------------------------------------------------------------------------------------
# extraction


@dataclass
class Features:
    """What one pass over a data set yields; `targets` are class labels (N,) or masks (N, H, W)."""

    cls: Tensor  # (N, D) normalised [CLS]
    patch_mean: Tensor  # (N, D) mean of the normalised patch tokens
    targets: Tensor
    patches: Tensor | None = None  # (N, D, h, w) normalised patch tokens on their grid
    skipped: list[str] = field(default_factory=list)  # "path: reason" of each unreadable image left out


class _SkipUnreadable(Dataset):
    """Items of `dataset` as (item, None), or (None, "path: reason") for an image that cannot be read."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> tuple[Any, str | None]:
        try:
            return self.dataset[i], None
        except (BrokenImage, OSError, ValueError, SyntaxError) as e:  # PIL raises the last three for broken files
            return None, str(e)


def _collate_readable(batch: list[tuple[Any, str | None]]) -> tuple[Any, list[str]]:
    """The readable items collated as usual (None if there are none) and the reasons of the others."""
    items = [item for item, error in batch if error is None]
    return (default_collate(items) if items else None), [error for _, error in batch if error is not None]


@torch.no_grad()
def extract_features(backbone: nn.Module, dataset: Dataset, *, batch_size: int = 64, device: str | None = None,
                     num_workers: int = 0, keep_patches: bool = False, desc: str = "features",
                     progress: bool = True) -> Features:
    """One forward pass of the frozen backbone over `dataset` ((image, target) items); results on the CPU.

    `device`: None = where the backbone already is, "auto", "cpu", "cuda", ... The backbone is put in eval mode
    (and on `device`) for the pass, and its previous mode and device are restored, so a trainer can call this.
    """
    backbone_device = next(backbone.parameters()).device
    dev = backbone_device if device is None else resolve_device(device)
    was_training = backbone.training
    backbone.eval()
    backbone.to(dev)
    loader = DataLoader(_SkipUnreadable(dataset), batch_size=batch_size, shuffle=False, num_workers=num_workers,
                        collate_fn=_collate_readable)
    cls, means, targets, patches, skipped = [], [], [], [], []
    try:
        for batch, errors in tqdm(loader, desc=desc, disable=not progress, leave=False):
            for error in errors:  # each image once: the loader visits every index once
                skipped.append(error)
                log.warning("%s: skipping unreadable image %s; %d skipped so far", desc, error, len(skipped))
            if batch is None:
                continue
            images, target = batch
            out = backbone.forward_features(images.to(dev, non_blocking=True))
            tokens = out["x_norm_patchtokens"].float()  # (B, N, D)
            cls.append(out["x_norm_clstoken"].float().cpu())
            means.append(tokens.mean(dim=1).cpu())
            targets.append(torch.as_tensor(target))
            if keep_patches:
                b, n, d = tokens.shape
                h, w = images.shape[-2] // backbone.patch_size, images.shape[-1] // backbone.patch_size
                patches.append(tokens.transpose(1, 2).reshape(b, d, h, w).cpu())  # (B, N, D) -> (B, D, h, w)
    finally:
        backbone.to(backbone_device)
        backbone.train(was_training)
    if not cls:
        raise ValueError(f"{desc}: the data set is empty" + (f" ({len(skipped)} unreadable images)" if skipped else ""))
    return Features(torch.cat(cls), torch.cat(means), torch.cat(targets),
                    torch.cat(patches) if keep_patches else None, skipped)
