"""`dinospec eval knn|linear|seg`: evaluate a frozen backbone; a table on stdout, the numbers as JSON.

    dinospec eval knn    --backbone runs/demo/export                   # bundled Fashion-MNIST sample
    dinospec eval linear --backbone runs/demo --json linear.json       # a run dir: its latest teacher
    dinospec eval seg    --backbone runs/demo/export --train data/eval/tuxstamps_seg/train \
                         --val data/eval/tuxstamps_seg/val

Without --train/--val the bundled real data under data/eval/ is used (see data/eval/README.md). Each task extracts
features once per split and reuses them for every k / every lr of the grid.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

if TYPE_CHECKING:  # torch is imported once the arguments are checked (a refusal takes well under a second)
    from torch import nn

    from dinospec.eval.features import Features

EVAL_DATA = Path(__file__).resolve().parents[2] / "data" / "eval"
DEFAULT_SPLITS = {
    "knn": EVAL_DATA / "fashion_mnist",
    "linear": EVAL_DATA / "fashion_mnist",
    "seg": EVAL_DATA / "tuxstamps_seg",
}


def _extract(backbone: nn.Module, dataset: Any, opts: dict, desc: str, keep_patches: bool = False) -> Features:
    from dinospec.eval.features import extract_features

    return extract_features(backbone, dataset, keep_patches=keep_patches, desc=desc, **opts)


def eval_knn(backbone: nn.Module, train: str | Path, val: str | Path, *, ks: Sequence[int] | None = None,
             temperature: float | None = None, img_size: int = 224, **extract_opts: Any) -> dict:
    """Weighted k-NN top-1 (%) on [CLS] for every k (None: dinospec/eval/knn.py's defaults). extract_opts:
    batch_size, device, num_workers, progress."""
    from dinospec.eval.features import paired_image_folders
    from dinospec.eval.knn import DEFAULT_KS, DEFAULT_TEMPERATURE, knn_accuracy

    ks = DEFAULT_KS if ks is None else ks
    temperature = DEFAULT_TEMPERATURE if temperature is None else temperature

    train_set, val_set = paired_image_folders(train, val, img_size)
    tr = _extract(backbone, train_set, extract_opts, "train features")
    va = _extract(backbone, val_set, extract_opts, "val features")
    acc = knn_accuracy(tr.cls, tr.targets, va.cls, va.targets, ks, temperature)
    return {"top1_by_k": {str(k): 100.0 * a for k, a in acc.items()}, "temperature": temperature,
            "features": "cls (L2-normalised, cosine similarity)", "classes": train_set.classes,
            "num_train": len(tr.cls), "num_val": len(va.cls), "skipped_images": _skipped(tr, va)}


def eval_linear(backbone: nn.Module, train: str | Path, val: str | Path, *, img_size: int = 224,
                concat_patch_mean: bool = False, l2s: Sequence[float] | None = None,
                max_iter: int | None = None, holdout: float | None = None, seed: int = 0,
                **extract_opts: Any) -> dict:
    """Linear probe top-1 (%) on [CLS] (optionally concatenated with the mean patch token, as DINOv2); None:
    dinospec/eval/linear.py's defaults."""
    import torch

    from dinospec.eval.features import paired_image_folders
    from dinospec.eval.linear import DEFAULT_HOLDOUT, DEFAULT_L2S, DEFAULT_MAX_ITER, linear_probe

    l2s = DEFAULT_L2S if l2s is None else l2s
    max_iter = DEFAULT_MAX_ITER if max_iter is None else max_iter
    holdout = DEFAULT_HOLDOUT if holdout is None else holdout

    train_set, val_set = paired_image_folders(train, val, img_size)
    tr = _extract(backbone, train_set, extract_opts, "train features")
    va = _extract(backbone, val_set, extract_opts, "val features")
    if concat_patch_mean:
        tr_x, va_x = torch.cat([tr.cls, tr.patch_mean], dim=1), torch.cat([va.cls, va.patch_mean], dim=1)
    else:
        tr_x, va_x = tr.cls, va.cls
    result = linear_probe(tr_x, tr.targets, va_x, va.targets, l2s=l2s, max_iter=max_iter, holdout=holdout,
                          seed=seed)
    result["features"] = "cls + mean patch token" if concat_patch_mean else "cls"
    result["classes"] = train_set.classes
    result["skipped_images"] = _skipped(tr, va)
    return result


def eval_seg(backbone: nn.Module, train: str | Path, val: str | Path, *, img_size: int = 224,
             num_classes: int | None = None, lrs: Sequence[float] | None = None,
             steps: int | None = None, holdout: float | None = None, batchnorm: bool = True, seed: int = 0,
             **extract_opts: Any) -> dict:
    """Linear segmentation probe mIoU (%) on the last layer's patch features (masks: see SegmentationFolder)."""
    import torch

    from dinospec.eval.features import SegmentationFolder, read_class_names
    from dinospec.eval.segmentation import DEFAULT_LRS, DEFAULT_STEPS, IGNORE_INDEX, seg_probe

    lrs = DEFAULT_LRS if lrs is None else lrs
    steps = DEFAULT_STEPS if steps is None else steps
    holdout = 0.2 if holdout is None else holdout

    train_set, val_set = SegmentationFolder(train, img_size), SegmentationFolder(val, img_size)
    tr = _extract(backbone, train_set, extract_opts, "train features", keep_patches=True)
    va = _extract(backbone, val_set, extract_opts, "val features", keep_patches=True)
    names = read_class_names(train)
    if num_classes is None:
        if names:
            num_classes = len(names)
        else:
            labels = torch.cat([tr.targets.unique(), va.targets.unique()])
            num_classes = int(labels[labels != IGNORE_INDEX].max()) + 1
    if names and len(names) != num_classes:
        names = None
    result = seg_probe(tr.patches, tr.targets, va.patches, va.targets, num_classes, lrs=lrs, steps=steps,
                       holdout=holdout, batchnorm=batchnorm, seed=seed, class_names=names)
    result["skipped_images"] = _skipped(tr, va)
    return result


def _skipped(train: Features, val: Features) -> dict[str, list[str]]:
    """The unreadable images left out of each split ("path: reason"), as training skips them too."""
    return {"train": train.skipped, "val": val.skipped}


# ----------------------------------------------------------------------------------------------------------------
# command line


def _common(p: argparse.ArgumentParser, task: str) -> None:
    default = DEFAULT_SPLITS[task]
    p.add_argument("--backbone", required=True, metavar="DIR_OR_RUN",
                   help="an export dir (config.json + model.safetensors) or a run dir (its latest teacher)")
    p.add_argument("--train", default=str(default / "train"), metavar="PATH", help="training split (%(default)s)")
    p.add_argument("--val", default=str(default / "val"), metavar="PATH", help="validation split (%(default)s)")
    p.add_argument("--json", metavar="FILE", help="write the result as JSON to FILE ('-': print it instead of "
                                                   "the table)")
    p.add_argument("--batch-size", type=int, default=64, help="images per forward pass (%(default)s)")
    p.add_argument("--img-size", type=int, help="resize + centre-crop size, a multiple of the patch size "
                                                 "(default: the backbone's training size, 224 for DINOv2 models)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (%(default)s)")
    p.add_argument("--num-workers", type=int, default=0, help="data-loading worker processes (%(default)s)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    if task == "linear":
        p.add_argument("--l2", type=float, nargs="+",
                       help="the grid of L2 strengths on the mean cross-entropy (default: the probe's grid)")
        p.add_argument("--max-iter", type=int,
                       help="L-BFGS iteration cap per fit (default: the probe's)")
    if task == "seg":
        p.add_argument("--steps", type=int, help="optimiser steps per lr (default: the probe's)")
        p.add_argument("--lrs", type=float, nargs="+", help="the lr grid (default: the probe's)")
    if task in ("linear", "seg"):
        p.add_argument("--holdout", type=float,
                       help="fraction of train held out for model selection (0: choose on val, optimistic; "
                            "default: the probe's)")
        p.add_argument("--seed", type=int, default=0)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="eval_task", required=True, metavar="{knn,linear,seg}")
    p = sub.add_parser("knn", help="weighted k-NN on [CLS] (DINO protocol)")
    _common(p, "knn")
    # the probes' defaults live in their modules (imported with torch once the arguments are checked)
    p.add_argument("--k", type=int, nargs="+", help="neighbour counts (default: the probe's)")
    p.add_argument("--temperature", type=float, help="vote temperature (default: the probe's)")
    p = sub.add_parser("linear", help="linear classification probe on [CLS]")
    _common(p, "linear")
    p.add_argument("--concat-patch-mean", action="store_true", help="[CLS] + mean patch token, as DINOv2")
    p = sub.add_parser("seg", help="linear segmentation probe on patch features (mIoU)")
    _common(p, "seg")
    p.add_argument("--num-classes", type=int, help="default: from classes.txt, else the largest label + 1")
    p.add_argument("--no-batchnorm", action="store_true", help="a bare 1x1 conv head (no BatchNorm)")


def _rows(task: str, r: dict) -> list[tuple[str, str]]:
    if task == "knn":
        return [(f"k-NN top-1, k={k}", f"{v:.2f}%") for k, v in r["top1_by_k"].items()]
    metric = ("linear top-1", r["top1"]) if task == "linear" else ("mIoU", r["miou"])
    rows = [(metric[0], f"{metric[1]:.2f}%")]
    if task == "seg":
        rows += [("pixel accuracy", f"{r['pixel_accuracy']:.2f}%")]
        rows += [(f"  IoU {name}", "absent" if v is None else f"{v:.2f}%") for name, v in r["per_class_iou"].items()]
    knob = "l2" if task == "linear" else "lr"
    key = "selection_top1_by_l2" if task == "linear" else "selection_miou_by_lr"
    rows += [(f"best {knob}", f"{r['best_' + knob]:g}"), ("selection", r["selection"])]
    rows += [(f"  {knob} {v_knob}", f"{v:.2f}%") for v_knob, v in r[key].items()]
    return rows


def format_table(report: dict) -> str:
    rows = [("backbone", report["backbone"]), ("train", f"{report['train']} ({report['results']['num_train']})"),
            ("val", f"{report['val']} ({report['results']['num_val']})"), ("img size", str(report["img_size"]))]
    skipped = report["results"].get("skipped_images", {})
    if any(skipped.values()):
        rows.append(("skipped", ", ".join(f"{len(v)} unreadable {k} image(s)" for k, v in skipped.items() if v)))
    rows += _rows(report["task"], report["results"])
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def _missing_path(args: argparse.Namespace) -> str | None:
    """What the command would fail on first, checked before torch is imported."""
    if not Path(args.backbone).exists():
        return (f"--backbone {args.backbone} does not exist (expected an export dir with config.json, or a run "
                f"dir with checkpoints/)")
    for name in ("train", "val"):
        if not Path(getattr(args, name)).is_dir():
            return f"--{name} {getattr(args, name)} is not a folder"
    return None


def run(args: argparse.Namespace) -> int:
    if (problem := _missing_path(args)) is not None:
        print(f"dinospec eval: {problem}", file=sys.stderr)
        return 2
    from dinospec.eval.features import load_eval_backbone

    try:
        backbone = load_eval_backbone(args.backbone)
    except (FileNotFoundError, ValueError) as e:  # a missing path or an export that does not load
        print(f"dinospec eval: {e}", file=sys.stderr)
        return 2
    img_size = args.img_size or getattr(backbone, "img_size", 224)
    patch = getattr(backbone, "patch_size", 1)
    if img_size % patch:
        print(f"dinospec eval: --img-size {img_size} is not a multiple of the patch size {patch}", file=sys.stderr)
        return 2
    opts = dict(img_size=img_size, batch_size=args.batch_size, device=args.device,
                num_workers=args.num_workers, progress=not args.no_progress)
    task: str = args.eval_task
    tasks: dict[str, Callable[..., dict]] = {"knn": eval_knn, "linear": eval_linear, "seg": eval_seg}
    if task == "knn":
        opts.update(ks=args.k, temperature=args.temperature)
    else:
        opts.update(holdout=args.holdout, seed=args.seed)
        if task == "linear":
            opts.update(l2s=args.l2, max_iter=args.max_iter, concat_patch_mean=args.concat_patch_mean)
        else:
            opts.update(lrs=args.lrs, steps=args.steps, num_classes=args.num_classes,
                        batchnorm=not args.no_batchnorm)
    try:
        results = tasks[task](backbone, args.train, args.val, **opts)
    except (OSError, ValueError) as e:  # a missing split, an unreadable image, train/val classes that differ
        print(f"dinospec eval: {e}", file=sys.stderr)
        return 2
    report = {"task": task, "backbone": str(args.backbone), "train": str(args.train), "val": str(args.val),
              "img_size": img_size, "results": results}
    if args.json == "-":
        print(json.dumps(_clean(report), indent=2))
        return 0
    print(format_table(report))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(_clean(report), indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


def _clean(obj: Any) -> Any:
    """JSON has no NaN: a NaN becomes null."""
    if isinstance(obj, float) and math.isnan(obj):
        return None
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    return obj
