"""Multi-crop pipeline throughput on ONE worker: dinospec's augmentation vs DINOv2's own DataAugmentationDINO.

Both run in this process on the same decoded real images, torch limited to one thread (a DataLoader worker's
setting). Pipelines are timed in alternating order within each repetition so machine noise hits all of them alike;
the ratio reported is the median over repetitions of ours / theirs measured in the same repetition.

DINOv2's code is the PyPI package, installed apart from the project (it pins torch 2.0; only torchvision and PIL
are needed for this class):
    .venv/bin/python -m pip install --no-deps --target build/bench-dinov2 dinov2==0.0.1.dev2
    .venv/bin/python scripts/bench_data.py --images ../shared/data/photos
"""

from __future__ import annotations

import argparse
import importlib.util
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch
from PIL import Image
from torchvision.transforms.v2 import functional as TF

from dinospec.data.augment import MultiCropAugmentation
from dinospec.data.datasets import build_dataset, decode_image
from dinospec.data.loader import MultiCropSamples
from dinospec.data.masking import SampleMasker

REPO = Path(__file__).resolve().parents[1]


def load_dinov2_augmentation(dinov2_dir: Path):
    """DINOv2's DataAugmentationDINO: from an installed `dinov2`, else from `dinov2_dir` (pip --target folder),
    importing just its two data-transform files if the package's __init__ imports fail."""
    if str(dinov2_dir) not in sys.path and dinov2_dir.is_dir():
        sys.path.insert(0, str(dinov2_dir))
    try:
        from dinov2.data.augmentations import DataAugmentationDINO  # type: ignore[import-not-found]

        return DataAugmentationDINO
    except ImportError:
        pass
    data_dir = dinov2_dir / "dinov2" / "data"
    if not (data_dir / "augmentations.py").is_file():
        sys.exit(f"DINOv2's code not found; install it with\n  {sys.executable} -m pip install --no-deps "
                 f"--target {dinov2_dir} dinov2==0.0.1.dev2")
    package = type(sys)("dinov2_data_only")  # a stand-in package so the relative `.transforms` import resolves
    package.__path__ = [str(data_dir)]
    sys.modules["dinov2_data_only"] = package
    for name in ("transforms", "augmentations"):
        spec = importlib.util.spec_from_file_location(f"dinov2_data_only.{name}", data_dir / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
    return sys.modules["dinov2_data_only.augmentations"].DataAugmentationDINO


def time_once(fn: Callable[[int], object], count: int) -> float:
    start = time.perf_counter()
    for i in range(count):
        fn(i)
    return count / (time.perf_counter() - start)


def per_op_table(image: Image.Image, sizes: tuple[int, ...], reps: int) -> None:
    """Microseconds per op on one view: DINOv2's (torchvision on PIL images) vs ours (float tensors)."""
    from torchvision import transforms as T

    from dinospec.data import augment as ops

    def usec(fn: Callable[[], object]) -> float:
        fn()
        best = float("inf")
        for _ in range(reps):
            start = time.perf_counter()
            for _ in range(20):
                fn()
            best = min(best, (time.perf_counter() - start) / 20)
        return best * 1e6

    pixels = TF.pil_to_tensor(image)
    h, w = pixels.shape[-2:]
    box = (h // 8, w // 8, h * 3 // 4, w * 3 // 4)  # top, left, height, width
    normalize = T.Compose([T.ToTensor(), T.Normalize(ops.IMAGENET_MEAN, ops.IMAGENET_STD)])
    scale = 1 / torch.tensor(ops.IMAGENET_STD).view(3, 1, 1)
    shift = -torch.tensor(ops.IMAGENET_MEAN).view(3, 1, 1) * scale
    print(f"\nper op, microseconds per view (best of {reps}); dinov2 = torchvision ops on PIL, ours = float tensors")
    print(f"{'op':26s} " + " ".join(f"{'dinov2 ' + str(s):>11s} {'ours ' + str(s):>9s}" for s in sizes))
    rows: dict[str, list[float]] = {}
    for size in sizes:
        small = image.resize((size, size), Image.BICUBIC)
        x = TF.pil_to_tensor(small).float() / 255
        cases = {
            "resized crop (bicubic)": (
                lambda: TF.resized_crop(image, *box, [size, size], T.InterpolationMode.BICUBIC),
                lambda: TF.resized_crop(pixels, *box, [size, size], T.InterpolationMode.BICUBIC, antialias=True)),
            "brightness": (lambda: TF.adjust_brightness(small, 1.2), lambda: ops.adjust_brightness(x, 1.2)),
            "contrast": (lambda: TF.adjust_contrast(small, 1.2), lambda: ops.adjust_contrast(x, 1.2)),
            "saturation": (lambda: TF.adjust_saturation(small, 1.1), lambda: ops.adjust_saturation(x, 1.1)),
            "hue": (lambda: TF.adjust_hue(small, 0.05), lambda: ops.adjust_hue(x, 0.05)),
            "grayscale": (lambda: TF.rgb_to_grayscale(small, 3), lambda: ops.grayscale(x)),
            "gaussian blur k9": (lambda: T.GaussianBlur(9, 1.0)(small), lambda: ops.gaussian_blur(x, 1.0)),
            "solarize": (lambda: TF.solarize(small, 128), lambda: ops.solarize(x)),
            "to tensor + normalise": (lambda: normalize(small),
                                      lambda: torch.addcmul(shift, TF.pil_to_tensor(small).float().div_(255), scale)),
        }
        for name, (theirs_op, ours_op) in cases.items():
            rows.setdefault(name, []).extend([usec(theirs_op), usec(ours_op)])
    for name, values in rows.items():
        print(f"{name:26s} " + " ".join(f"{values[i]:11.0f} {values[i + 1]:9.0f}" for i in range(0, len(values), 2)))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", default=str(REPO.parent / "shared" / "data" / "photos"),
                        help="an image folder (real photos); default ../shared/data/photos")
    parser.add_argument("--dinov2-dir", default=str(REPO / "build" / "bench-dinov2"))
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--passes", type=int, default=2, help="passes over the images per repetition")
    parser.add_argument("--global-size", type=int, default=224)
    parser.add_argument("--local-size", type=int, default=98)
    parser.add_argument("--local-number", type=int, default=8)
    parser.add_argument("--ops", action="store_true", help="also print per-op timings (ours vs dinov2's)")
    args = parser.parse_args()
    torch.set_num_threads(1)

    DataAugmentationDINO = load_dinov2_augmentation(Path(args.dinov2_dir))
    dataset = build_dataset(args.images)
    images = [dataset.load(i) for i in range(len(dataset))]
    paths = [dataset.describe(i) for i in range(len(dataset))]
    n = len(images) * args.passes
    sides = [max(im.size) for im in images]
    print(f"{len(images)} images from {args.images} (longest side {min(sides)}..{max(sides)} px), "
          f"{args.passes} passes per repetition, {args.reps} repetitions, "
          f"1 torch thread; crops 2 x {args.global_size} + {args.local_number} x {args.local_size}")

    theirs = DataAugmentationDINO((0.32, 1.0), (0.05, 0.32), args.local_number, args.global_size, args.local_size)
    crops = dict(global_crops_size=args.global_size, local_crops_number=args.local_number,
                 local_crops_size=args.local_size)
    ours_upstream = MultiCropAugmentation(**crops, blur_probabilities="upstream")
    ours_intended = MultiCropAugmentation(**crops, blur_probabilities="intended")
    grid = args.global_size // 14
    samples = MultiCropSamples(dataset, ours_intended, SampleMasker((grid, grid), 0.5, (0.1, 0.5)), seed=0)

    def decoded_theirs(i: int) -> object:
        with Image.open(paths[i % len(paths)]) as img:  # DINOv2's decoder: PIL open + convert("RGB")
            return theirs(img.convert("RGB"))

    pipelines: dict[str, Callable[[int], object]] = {
        "dinov2 DataAugmentationDINO": lambda i: theirs(images[i % len(images)]),
        "dinospec, blur 'upstream' (same ops)": lambda i: ours_upstream(images[i % len(images)], random.Random(i)),
        "dinospec, blur 'intended'": lambda i: ours_intended(images[i % len(images)], random.Random(i)),
        "dinov2: decode + augment": decoded_theirs,
        "dinospec: decode + augment + masks": lambda i: samples[(0, i % len(images))],
        "(decode only, PIL)": lambda i: decode_image(paths[i % len(paths)], paths[i % len(paths)]),
    }
    names = list(pipelines)
    rates: dict[str, list[float]] = {name: [] for name in names}
    random.seed(0)
    torch.manual_seed(0)
    for name in names:  # warm-up
        time_once(pipelines[name], min(n, 8))
    for rep in range(args.reps):
        order = names[rep % len(names):] + names[:rep % len(names)]
        for name in order:
            rates[name].append(time_once(pipelines[name], n))

    base, base_decode = names[0], names[3]
    print(f"\n{'pipeline':40s} {'img/s (median)':>15s} {'min':>8s} {'max':>8s} {'ratio vs dinov2':>16s}")
    for name in names:
        reference = base_decode if "decode +" in name else base
        ratio = statistics.median(a / b for a, b in zip(rates[name], rates[reference]))
        ratio_text = "" if name in (base, base_decode) or name.startswith("(") else f"{ratio:.2f}x"
        print(f"{name:40s} {statistics.median(rates[name]):15.1f} {min(rates[name]):8.1f} {max(rates[name]):8.1f} "
              f"{ratio_text:>16s}")
    print("\nratio = median over repetitions of (ours / dinov2's) img/s measured in the same repetition")
    if args.ops:
        per_op_table(images[0], (args.global_size, args.local_size), args.reps)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
