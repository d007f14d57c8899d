"""`dinospec analyze`: the paper's token-type analyses of a frozen backbone, as plots and one analysis.json.

    dinospec analyze --backbone runs/demo/export --images data/eval/photos --out runs/demo/analysis

What is measured: dinospec/analysis_measure.py; the plots: dinospec/analysis_plots.py. Both import torch, so this
module imports them only once the arguments are parsed (`--help` and argument errors take well under a second).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

if TYPE_CHECKING:
    from torch import nn

DEFAULT_IMAGES = Path(__file__).resolve().parents[1] / "data" / "eval" / "photos"
PLOTS = ("cosine_similarity.png", "channel_specialisation.png", "norm1_gain.png", "high_norm_tokens.png", "pca.png")


def analyze(model: nn.Module, files: Sequence[Path], out_dir: str | Path, **measure_opts: Any) -> dict[str, Any]:
    """Measure, write the five PNGs and analysis.json into out_dir; return the JSON object."""
    from dinospec.analysis_measure import measure
    from dinospec.analysis_plots import plot_channels, plot_cosine, plot_gains, plot_high_norm, plot_pca

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    results, pictures = measure(model, files, **measure_opts)
    for name, plot in zip(PLOTS, (plot_cosine, plot_channels, plot_gains, plot_high_norm)):
        plot(results, out / name)
    plot_pca(pictures, out / "pca.png")
    results["plots"] = list(PLOTS)
    (out / "analysis.json").write_text(json.dumps(results, indent=1) + "\n")
    return results


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--backbone", required=True, metavar="DIR_OR_RUN",
                        help="an export dir (config.json + model.safetensors) or a run dir (its latest teacher)")
    parser.add_argument("--images", default=str(DEFAULT_IMAGES), metavar="FOLDER",
                        help="images to analyse, searched recursively (%(default)s)")
    parser.add_argument("--out", required=True, metavar="DIR", help="where the PNGs and analysis.json go")
    parser.add_argument("--max-images", type=int, default=64, metavar="N", help="at most N images (%(default)s)")
    parser.add_argument("--img-size", type=int, help="resize + centre-crop size (default: the backbone's "
                                                      "training size)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda (%(default)s)")
    parser.add_argument("--factor", type=float, default=3.0,
                        help="a channel is specialised when one token type's mean |activation| exceeds the "
                             "other's by this factor (%(default)s)")
    parser.add_argument("--outlier-k", type=float, default=3.0,
                        help="a patch token is high-norm above this multiple of the median norm (%(default)s)")
    parser.add_argument("--pca-images", type=int, default=6, help="images shown in pca.png (%(default)s)")
    parser.add_argument("--no-progress", action="store_true")


def run(args: argparse.Namespace) -> int:
    from dinospec.eval.features import list_images, load_eval_backbone

    try:
        model = load_eval_backbone(args.backbone)
        files = list_images(args.images, args.max_images)
    except (FileNotFoundError, ValueError) as e:  # a missing path or an export that does not load
        print(f"dinospec analyze: {e}", file=sys.stderr)
        return 2
    img_size = args.img_size or model.img_size
    if img_size % model.patch_size:
        print(f"dinospec analyze: --img-size {img_size} is not a multiple of the patch size {model.patch_size}",
              file=sys.stderr)
        return 2
    res = analyze(model, files, args.out, img_size=img_size, batch_size=args.batch_size, device=args.device,
                  factor=args.factor, outlier_k=args.outlier_k, pca_images=args.pca_images,
                  progress=not args.no_progress)
    before, after = res["cosine"]["before_norm1"], res["cosine"]["after_norm1"]
    print(f"{'block':>5}  {'cls-patch before':>16}  {'after':>7}  {'patch-patch before':>18}  {'after':>7}  "
          f"{'specialised ch.':>15}  {'max/median norm':>15}")
    for i in range(res["depth"]):
        print(f"{i:>5}  {before['cls_patch'][i]:>16.3f}  {after['cls_patch'][i]:>7.3f}  "
              f"{before['patch_patch'][i]:>18.3f}  {after['patch_patch'][i]:>7.3f}  "
              f"{res['channels']['specialisation_score'][i]:>15.2f}  {res['high_norm']['max_over_median'][i]:>15.2f}")
    print(f"wrote {', '.join(res['plots'])} and analysis.json to {args.out} ({res['num_images']} images)")
    return 0
