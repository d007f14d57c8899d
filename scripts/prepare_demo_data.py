"""Put the demo's real images in data/demo/ for `make demo` (no download).

- data/demo/fashion_mnist/: 4000 Fashion-MNIST training images (28x28 grey product photos, MIT licence), cut out of
  the sheet the repository carries (data/pretrain/fashion_mnist_train_20000-23999.png: train-file images 20000 to
  23999 in row-major order, 80 per row; none of them is in data/eval/fashion_mnist). The demo pretrains on them and
  measures k-NN on data/eval/fashion_mnist, so that learning shows on held-out images of the same domain.
- data/demo/skimage_*.jpg: scikit-image's CC0 / public-domain photographs (skimage/data/), longest side <= 512, for
  pretraining on photos (`data.path=data/demo`: the whole tree) and the analyses.
Each set comes with a README stating origin and licence. Running it again leaves existing files alone (--force
rewrites them).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import sys
from pathlib import Path

from PIL import Image

REPO = Path(__file__).resolve().parents[1]
MAX_SIDE = 512
FASHION_SHEET = REPO / "data" / "pretrain" / "fashion_mnist_train_20000-23999.png"
FASHION_FIRST_INDEX, FASHION_TILE, FASHION_COLUMNS = 20000, 28, 80

# file in skimage/data -> licence, as stated in the docstring of its skimage.data loader (scikit-image 0.26)
PHOTOS = {
    "astronaut.png": "public domain (NASA; 'no known copyright restrictions, released into the public domain')",
    "brick.png": "CC0 (CC0Textures, Bricks25)",
    "camera.png": "CC0 (photographer Lav Varshney)",
    "cell.png": "CC0",
    "chelsea.png": "CC0 (photographer Stefan van der Walt)",
    "clock_motion.png": "public domain (photographer Stefan van der Walt)",
    "coffee.png": "CC0 (photographer Rachel Michetti)",
    "coins.png": "no known copyright restrictions (Brooklyn Museum collection)",
    "grass.png": "CC0 (CC0Textures)",
    "gravel.png": "CC0 (CC0Textures, Gravel04)",
    "hubble_deep_field.jpg": "public domain (NASA)",
    "ihc.png": "no known copyright restrictions (CMMI immunohistochemistry image)",
    "microaneurysms.png": "CC0 (owner Andreas Maier)",
    "retina.jpg": "CC0 1.0 (Mikael Häggström, Wikimedia Commons)",
    "rocket.jpg": "public domain (SpaceX)",
    "text.png": "no known copyright restrictions, released into the public domain",
}


def skimage_data_dir() -> Path:
    spec = importlib.util.find_spec("skimage")
    if spec is None or spec.origin is None:
        sys.exit("scikit-image is not installed: it ships the demo photos. Install it with\n"
                 f"  {sys.executable} -m pip install scikit-image\n(or `make install`, which installs the dev extras)")
    return Path(spec.origin).parent / "data"


def write_readme(out: Path, version: str) -> None:
    lines = [
        "# data/demo — real photos for `make demo`",
        "",
        f"Written by scripts/prepare_demo_data.py from the scikit-image {version} wheel (`skimage/data/`),",
        f"resized so the longest side is <= {MAX_SIDE} px, saved as JPEG (quality 90).",
        "scikit-image is BSD-3-Clause; each image's licence, as its `skimage.data` docstring states:",
        "",
        "| file | licence |",
        "| --- | --- |",
        *(f"| skimage_{Path(name).stem}.jpg | {licence} |" for name, licence in PHOTOS.items()),
        "",
    ]
    (out / "README.md").write_text("\n".join(lines), encoding="utf-8")


def write_fashion_mnist(out: Path, force: bool) -> int:
    """Cut the sheet into one PNG per image (named by its index in the official train file); return the count."""
    out.mkdir(parents=True, exist_ok=True)
    with Image.open(FASHION_SHEET) as sheet:
        rows = sheet.height // FASHION_TILE
        count = rows * FASHION_COLUMNS
        if force or len(list(out.glob("*.png"))) != count:
            for i in range(count):
                r, c = divmod(i, FASHION_COLUMNS)
                box = (c * FASHION_TILE, r * FASHION_TILE, (c + 1) * FASHION_TILE, (r + 1) * FASHION_TILE)
                sheet.crop(box).save(out / f"train_{FASHION_FIRST_INDEX + i:05d}.png")
    (out / "README.md").write_text(
        "# data/demo/fashion_mnist — unlabelled pretraining images for `make demo`\n\n"
        f"Images {FASHION_FIRST_INDEX} to {FASHION_FIRST_INDEX + count - 1} of Fashion-MNIST's training file, cut by "
        "scripts/prepare_demo_data.py from data/pretrain/ (origin: Debian package dataset-fashion-mnist). "
        "Licence: MIT (Expat), Copyright 2017 Zalando SE; see data/eval/fashion_mnist/COPYRIGHT.dataset-fashion-mnist.\n",
        encoding="utf-8")
    return count


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default=str(REPO / "data" / "demo"))
    parser.add_argument("--force", action="store_true", help="rewrite images that already exist")
    args = parser.parse_args()
    source = skimage_data_dir()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    written, kept, missing = 0, 0, []
    for name in PHOTOS:
        target = out / f"skimage_{Path(name).stem}.jpg"
        if target.exists() and not args.force:
            kept += 1
            continue
        if not (source / name).is_file():
            missing.append(name)
            continue
        with Image.open(source / name) as img:
            img = img.convert("L" if img.mode in ("L", "I;16", "1") else "RGB")
            img.thumbnail((MAX_SIDE, MAX_SIDE), Image.Resampling.LANCZOS)
            img.save(target, quality=90)
        written += 1
    write_readme(out, importlib.metadata.version("scikit-image"))
    total = len(list(out.glob("skimage_*.jpg")))
    print(f"data/demo: wrote {written} image(s), kept {kept} already there; {total} photos in {out}")
    fashion = write_fashion_mnist(out / "fashion_mnist", args.force)
    print(f"data/demo/fashion_mnist: {fashion} Fashion-MNIST training images")
    if missing:
        print(f"not in this scikit-image wheel (skipped): {', '.join(missing)}")
    return 0 if total else 1


if __name__ == "__main__":
    raise SystemExit(main())
