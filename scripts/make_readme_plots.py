"""Regenerate the README's example analysis plots (docs/img/) from one backbone, with `dinospec analyze`'s code.

    python scripts/make_readme_plots.py runs/demo/export            # an export dir, or a run dir (latest teacher)
    python scripts/make_readme_plots.py runs/demo/export --images data/eval/photos --out docs/img

Writes docs/img/<plot>.png (the five plots of `dinospec analyze`) and prints a Markdown table of the per-block
numbers to paste next to them. The full numbers stay in a temporary analysis.json unless --keep-json is given.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

from dinospec.analysis import DEFAULT_IMAGES, PLOTS, analyze
from dinospec.eval.features import list_images, load_eval_backbone

REPO = Path(__file__).resolve().parents[1]


def markdown_table(res: dict) -> str:
    before, after = res["cosine"]["before_norm1"], res["cosine"]["after_norm1"]
    lines = ["| block | cos([CLS], patch) before norm1 | after | cos(patch, patch) before | after | "
             f"specialised channels (x{res['channels']['factor']:g}) | max/median patch norm |",
             "|---:|---:|---:|---:|---:|---:|---:|"]
    for i in range(res["depth"]):
        lines.append(f"| {i} | {before['cls_patch'][i]:.3f} | {after['cls_patch'][i]:.3f} | "
                     f"{before['patch_patch'][i]:.3f} | {after['patch_patch'][i]:.3f} | "
                     f"{res['channels']['specialisation_score'][i]:.1%} | "
                     f"{res['high_norm']['max_over_median'][i]:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("backbone", help="an export dir (config.json + model.safetensors) or a run dir")
    parser.add_argument("--images", default=str(DEFAULT_IMAGES), help="image folder (%(default)s)")
    parser.add_argument("--out", default=str(REPO / "docs" / "img"), help="where the PNGs go (%(default)s)")
    parser.add_argument("--max-images", type=int, default=64)
    parser.add_argument("--img-size", type=int, help="default: the backbone's training size")
    parser.add_argument("--pca-images", type=int, default=6)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--keep-json", action="store_true", help="also copy analysis.json into --out")
    args = parser.parse_args(argv)

    model = load_eval_backbone(args.backbone)
    img_size = args.img_size or model.img_size
    files = list_images(args.images, args.max_images)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="dinospec-readme-") as tmp:
        res = analyze(model, files, tmp, img_size=img_size, device=args.device, pca_images=args.pca_images)
        names = list(PLOTS) + (["analysis.json"] if args.keep_json else [])
        for name in names:
            shutil.copyfile(Path(tmp) / name, out / name)
    print(f"wrote {', '.join(names)} to {out} ({res['num_images']} images from {args.images})\n")
    print(markdown_table(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
