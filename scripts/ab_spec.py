"""A/B of token-type specialization: pretrain vanilla (spec=none) and the paper's spec alike, then evaluate both.

For every spec and seed: `python -m dinospec.cli train --config CONFIG spec=SPEC train.seed=S train.max_steps=N`
in a fresh process (same data, same data order and augmentations: they derive from the seed alone), export the
teacher (dinospec.export.export_run), then k-NN top-1 on [CLS] (dinospec.eval, default data/eval/fashion_mnist) and
the linear segmentation probe mIoU on patch tokens (default data/eval/tuxstamps_seg). Random-init rows evaluate
the teacher as the trainer builds it at step 0 (same seed, no training), the floor every trained row must beat.
The lr / weight-decay / momentum schedules are fitted to --steps (official_epoch_length = steps / optim.epochs).

    .venv/bin/python scripts/prepare_demo_data.py      # data/demo, if missing
    .venv/bin/python scripts/ab_spec.py --steps 200 --seeds 0,1 --data ../shared/data/tuxstamps/train --out runs/ab_spec

Prints a table (spec | init | params | k-NN top-1 k=10, 20 | seg mIoU | final loss | train s) and writes
OUT/ab_spec.json. Initial weights differ between specs (their parameter sets differ), so one seed is one draw;
pass several --seeds to see the spread. At toy scale (a 6-block 64-wide ViT, minutes of CPU) differences of a few
points are noise, not evidence for or against the paper.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parent.parent
EVAL = REPO / "data" / "eval"


def train_overrides(spec: str, seed: int, args: argparse.Namespace, run_dir: Path, epochs: int) -> list[str]:
    epoch_length = max(1, args.steps // epochs)  # every schedule (warmup, cosine, teacher temp) fits in --steps
    return [f"spec={spec}", f"train.seed={seed}", f"train.max_steps={args.steps}",
            f"train.official_epoch_length={epoch_length}", f"data.path={args.data}", f"train.output_dir={run_dir}",
            f"data.num_workers={args.workers}", f"checkpoint.period_steps={args.steps}", "logging.progress=false",
            "logging.plots=false", *args.override]


def train(spec: str, seed: int, args: argparse.Namespace, run_dir: Path, epochs: int) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "dinospec.cli", "train", "--no-resume", *[f"--config={c}" for c in args.config],
           *train_overrides(spec, seed, args, run_dir, epochs)]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "PYTHONUNBUFFERED": "1"}
    print(f"[{spec} seed {seed}] {' '.join(cmd[1:])}", flush=True)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if proc.returncode:
        raise RuntimeError(f"training {spec} (seed {seed}) failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    last = records[-1]
    return {"train_s": round(seconds, 1), "final_loss": last.get("loss"), "first_loss": records[0].get("loss"),
            "steps": last.get("step")}


def random_init_export(spec: str, seed: int, args: argparse.Namespace, out_dir: Path, epochs: int) -> Path:
    """The teacher backbone a run of this spec and seed starts from (the trainer seeds, then builds the model)."""
    from dinospec.config import load_config
    from dinospec.export import save_backbone
    from dinospec.ssl.meta_arch import SSLMetaArch

    cfg = load_config(args.config, train_overrides(spec, seed, args, out_dir, epochs))
    torch.manual_seed(cfg.train.seed)
    teacher = SSLMetaArch(cfg).teacher.backbone
    return save_backbone(teacher, out_dir, cfg.student, cfg.spec, source={"random_init": True, "seed": seed},
                         force=True)


def evaluate(export_dir: Path, args: argparse.Namespace) -> dict[str, Any]:
    from dinospec.eval.cli import eval_knn, eval_seg
    from dinospec.export import load_backbone

    backbone = load_backbone(export_dir)
    img = args.eval_img_size or backbone.img_size
    opts = dict(img_size=img, batch_size=64, device="cpu", progress=False)
    knn = eval_knn(backbone, args.knn_data / "train", args.knn_data / "val", ks=(10, 20), **opts)
    seg = eval_seg(backbone, args.seg_data / "train", args.seg_data / "val", **opts)
    return {"params": sum(p.numel() for p in backbone.parameters()), "eval_img_size": img,
            "knn_top1": knn["top1_by_k"], "seg_miou": seg["miou"], "seg_best_lr": seg["best_lr"]}


def table(rows: list[dict[str, Any]]) -> list[str]:
    lines = ["| spec | init | seed | params | k-NN top-1 k=10 | k-NN top-1 k=20 | seg mIoU | loss first -> last | "
             "train s |", "| --- | --- | ---: | ---: | ---: | ---: | ---: | --- | ---: |"]
    for r in rows:
        loss = f"{r['first_loss']:.3f} -> {r['final_loss']:.3f}" if r.get("final_loss") is not None else "-"
        lines.append(f"| {r['spec']} | {r['init']} | {r['seed']} | {r['params']:,} | {r['knn_top1']['10']:.1f} | "
                     f"{r['knn_top1']['20']:.1f} | {r['seg_miou']:.1f} | {loss} | {r.get('train_s', '-')} |")
    return lines


def means(rows: list[dict[str, Any]]) -> list[str]:
    """Mean and spread over seeds per (spec, init), when there are several seeds."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        groups.setdefault((r["spec"], r["init"]), []).append(r)
    if all(len(g) < 2 for g in groups.values()):
        return []
    lines = ["", "| spec | init | seeds | k-NN k=20 mean (min-max) | seg mIoU mean (min-max) |",
             "| --- | --- | ---: | --- | --- |"]
    for (spec, init), g in groups.items():
        knn, seg = [r["knn_top1"]["20"] for r in g], [r["seg_miou"] for r in g]
        lines.append(f"| {spec} | {init} | {len(g)} | {statistics.mean(knn):.1f} ({min(knn):.1f}-{max(knn):.1f}) | "
                     f"{statistics.mean(seg):.1f} ({min(seg):.1f}-{max(seg):.1f}) |")
    return lines


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", action="append", default=None, metavar="FILE",
                   help="training config(s) (default: configs/demo.yaml, a 6-block 64-wide ViT at 64 px)")
    p.add_argument("--specs", default="none,paper", help="spec presets to compare (%(default)s)")
    p.add_argument("--steps", type=int, default=200, help="training steps per run (%(default)s)")
    p.add_argument("--seeds", default="0,1", help="comma list of seeds (%(default)s)")
    p.add_argument("--data", default=str(REPO / "data" / "demo"),
                   help="pretraining images (%(default)s; more: ../shared/data/tuxstamps/train)")
    p.add_argument("--knn-data", type=Path, default=EVAL / "fashion_mnist", help="ImageFolder with train/ and val/")
    p.add_argument("--seg-data", type=Path, default=EVAL / "tuxstamps_seg", help="segmentation train/ and val/")
    p.add_argument("--eval-img-size", type=int, help="evaluation image size (default: the training crop size)")
    p.add_argument("--out", type=Path, default=REPO / "runs" / "ab_spec")
    p.add_argument("--threads", type=int, default=2, help="torch threads of each training process")
    p.add_argument("--workers", type=int, default=1, help="data-loading workers of each training process")
    p.add_argument("--no-random-init", dest="random_init", action="store_false", help="skip the random-init rows")
    p.add_argument("--force", action="store_true", help="replace run directories already in --out")
    p.add_argument("override", nargs="*", metavar="key=value", help="more training overrides for every run")
    args = p.parse_args()
    args.config = [str(Path(c).resolve()) for c in args.config or [REPO / "configs" / "demo.yaml"]]
    args.data, args.out = str(Path(args.data).resolve()), args.out.resolve()  # the trainings run in REPO
    if not Path(args.data).exists():
        p.error(f"--data {args.data} does not exist (data/demo: run scripts/prepare_demo_data.py first)")
    torch.set_num_threads(args.threads)

    from dinospec.config import load_config
    from dinospec.export import export_run

    epochs = load_config(args.config).optim.epochs
    rows: list[dict[str, Any]] = []
    for seed in [int(s) for s in args.seeds.split(",")]:
        for spec in args.specs.split(","):
            run_dir = args.out / f"{spec}_seed{seed}"
            if run_dir.exists():
                if not args.force:
                    p.error(f"{run_dir} exists: pass --force to replace it, or another --out")
                shutil.rmtree(run_dir)
            if args.random_init:
                export = random_init_export(spec, seed, args, run_dir / "export_init", epochs)
                rows.append({"spec": spec, "init": "random", "seed": seed, **evaluate(export, args)})
                print("  " + table(rows[-1:])[-1], flush=True)
            info = train(spec, seed, args, run_dir, epochs)
            export = export_run(run_dir, run_dir / "export", force=True)
            rows.append({"spec": spec, "init": f"trained {args.steps} steps", "seed": seed, **info,
                         **evaluate(export, args)})
            print("  " + table(rows[-1:])[-1], flush=True)
    lines = table(rows) + means(rows)
    print("\n".join(["", f"data {args.data}, config {', '.join(args.config)}, {args.steps} steps; k-NN on "
                         f"{args.knn_data}, seg on {args.seg_data}", *lines]))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "ab_spec.json").write_text(json.dumps(
        {"args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}, "rows": rows},
        indent=2) + "\n")
    print(f"wrote {args.out / 'ab_spec.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
