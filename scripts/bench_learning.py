"""Does pretraining learn? Pretrain on real images, probe the teacher on a held-out labelled split (a benchmark).

    apt-get install dataset-fashion-mnist          # Fashion-MNIST, 60k train + 10k test, as idx files (MIT)
    python scripts/bench_learning.py --out runs/bench_learning                     # ~30 min on 2 CPU cores
    python scripts/bench_learning.py --specs none paper norm_ls --seeds 0 1 2 --minutes 8   # the A/B

What one run measures, all on the full 10k test split of Fashion-MNIST (never seen in pretraining or selection):
- floors: weighted k-NN (k=20, cosine, as DINO) and a converged logistic regression on the raw pixels;
- the teacher backbone at step 0 (random init, same seed), at every saved checkpoint and at the end: k-NN on
  [CLS] and the linear probe (dinospec.eval.linear: L-BFGS to convergence, L2 chosen on held-out train) on
  [CLS] and on [CLS] + mean patch token;
- the in-training k-NN curve (evaluation.knn_period_steps) and the learning diagnostics, drawn in one PNG.
Pretraining sees the 60k train images without labels; the probes' memory / training split is the first
`--probe-train` train images (balanced classes). Results: <out>/results.json, <out>/learning.png and a Markdown
block (<out>/results.md) for BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import gzip
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from dinospec.config import load_config  # noqa: E402
from dinospec.eval.features import extract_features, image_folder  # noqa: E402
from dinospec.eval.knn import knn_accuracy  # noqa: E402
from dinospec.eval.linear import linear_probe  # noqa: E402

DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
CLASSES = ("t-shirt_top", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle_boot")
RECIPE = REPO / "configs" / "recipe" / "fashion_mnist.yaml"


# ----------------------------------------------------------------------------------------------------------------
# data


def read_idx(path: Path) -> np.ndarray:
    """An idx file (gzip or not) as a uint8 array: (N, 28, 28) images or (N,) labels."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def balanced_first(labels: np.ndarray, n: int) -> np.ndarray:
    """Indices of the first n // 10 images of every class, in file order."""
    per_class = n // len(CLASSES)
    return np.sort(np.concatenate([np.flatnonzero(labels == c)[:per_class] for c in range(len(CLASSES))]))


def write_folder(images: np.ndarray, labels: np.ndarray | None, indices: np.ndarray, root: Path) -> Path:
    """PNG files under root (root/<class>/ when labelled); written once, atomically (a .done marker)."""
    if (root / ".done").is_file():
        return root
    for i in indices:
        folder = root / CLASSES[labels[i]] if labels is not None else root / f"{i // 1000:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(images[i], mode="L").save(folder / f"{i:05d}.png")
    (root / ".done").write_text("complete\n")
    return root


def prepare(source: Path, work: Path, probe_train: int, knn_subset: int) -> dict[str, Path]:
    for name in ("train-images-idx3-ubyte.gz", "t10k-images-idx3-ubyte.gz"):
        if not (source / name).is_file():
            sys.exit(f"{source / name} not found: install Fashion-MNIST with `apt-get install dataset-fashion-mnist` "
                     f"(Debian/Ubuntu) or pass --source DIR holding the four idx(.gz) files")
    tr_x, tr_y = read_idx(source / "train-images-idx3-ubyte.gz"), read_idx(source / "train-labels-idx1-ubyte.gz")
    te_x, te_y = read_idx(source / "t10k-images-idx3-ubyte.gz"), read_idx(source / "t10k-labels-idx1-ubyte.gz")
    return {
        "pretrain": write_folder(tr_x, None, np.arange(len(tr_x)), work / "pretrain"),
        "probe_train": write_folder(tr_x, tr_y, balanced_first(tr_y, probe_train), work / f"probe_train_{probe_train}"),
        "test": write_folder(te_x, te_y, np.arange(len(te_x)), work / "test"),
        # the in-training k-NN curve: a smaller memory and query set, so it costs seconds
        "knn_train": write_folder(tr_x, tr_y, balanced_first(tr_y, knn_subset), work / f"knn_train_{knn_subset}"),
        "knn_val": write_folder(te_x, te_y, balanced_first(te_y, knn_subset // 2), work / f"knn_val_{knn_subset // 2}"),
    }


def pixels(folder: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """Raw pixels in [0, 1] (N, 784) and labels of a labelled folder, in ImageFolder's order."""
    ds = image_folder(folder, 28)
    x = np.stack([np.asarray(Image.open(p).convert("L"), dtype=np.float32).reshape(-1) / 255.0
                  for p, _ in ds.samples])
    return torch.from_numpy(x), torch.tensor(ds.targets)


# ----------------------------------------------------------------------------------------------------------------
# probes


def probe(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor) -> dict:
    knn = knn_accuracy(train_x, train_y, test_x, test_y, ks=(20,))[20]
    lin = linear_probe(train_x, train_y, test_x, test_y)
    return {"knn_top1": round(100.0 * knn, 2), "linear_top1": round(lin["top1"], 2), "linear_l2": lin["best_l2"]}


def raw_pixel_floors(folders: dict[str, Path], cache: Path) -> dict:
    """k-NN and logistic regression on the raw pixels (cached: 784 ill-conditioned features make L-BFGS slow)."""
    if cache.is_file():
        return json.loads(cache.read_text())
    tr_x, tr_y = pixels(folders["probe_train"])
    te_x, te_y = pixels(folders["test"])
    floors = probe(tr_x, tr_y, te_x, te_y)
    cache.write_text(json.dumps(floors) + "\n")
    return floors


def probe_backbone(backbone: torch.nn.Module, folders: dict[str, Path], img_size: int) -> dict:
    opts = dict(batch_size=256, device="cpu", progress=False)
    tr = extract_features(backbone, image_folder(folders["probe_train"], img_size), **opts)
    te = extract_features(backbone, image_folder(folders["test"], img_size), **opts)
    cls = probe(tr.cls, tr.targets, te.cls, te.targets)
    both = probe(torch.cat([tr.cls, tr.patch_mean], 1), tr.targets, torch.cat([te.cls, te.patch_mean], 1), te.targets)
    return {"cls": cls, "cls_patchmean": {"linear_top1": both["linear_top1"], "linear_l2": both["linear_l2"]}}


# ----------------------------------------------------------------------------------------------------------------
# one pretraining run


def run_config(folders: dict[str, Path], out: Path, spec: str, seed: int, steps: int, extra: list[str]) -> Any:
    overrides = [f"spec={spec}", f"train.seed={seed}", f"train.output_dir={out}", f"data.path={folders['pretrain']}",
                 f"evaluation.knn_train={folders['knn_train']}", f"evaluation.knn_val={folders['knn_val']}",
                 f"evaluation.knn_period_steps={max(1, steps // 8)}",
                 f"train.max_steps={steps}", "logging.progress=false", *extra]
    return load_config([RECIPE], overrides)


def pretrain_and_probe(folders: dict[str, Path], out: Path, spec: str, seed: int, steps: int,
                       extra: list[str]) -> dict:
    from dinospec.export import export_run, load_backbone
    from dinospec.ssl.meta_arch import SSLMetaArch
    from dinospec.trainer import train

    cfg = run_config(folders, out, spec, seed, steps, extra)
    img = cfg.crops.global_crops_size
    torch.manual_seed(cfg.train.seed)  # exactly the trainer's initial weights (trainer.train seeds the same way)
    init = SSLMetaArch(cfg).teacher.backbone
    result: dict[str, Any] = {"spec": spec, "seed": seed, "steps": steps, "step0": probe_backbone(init, folders, img)}
    del init
    print(f"[{spec} seed {seed}] step 0: {result['step0']}", flush=True)
    outcome = train(cfg)  # a run dir that already holds the last checkpoint resumes there: only the probes run again
    if outcome.status != "finished":  # preempted (SIGTERM): probing a partial run as the result would mislead
        sys.exit(f"[{spec} seed {seed}] stopped at step {outcome.step} of {steps} ({outcome.status}); rerun the same "
                 f"command to resume it")
    curve = {}
    for step_dir in sorted((out / "checkpoints").glob("step_*"), key=lambda p: int(p.name.split("_")[1])):
        step = int(step_dir.name.split("_")[1])
        export = out / "exports" / f"step_{step}"
        if not (export / "config.json").is_file():
            export_run(out, export, step=step)
        curve[step] = probe_backbone(load_backbone(export), folders, img)
        print(f"[{spec} seed {seed}] step {step}: {curve[step]}", flush=True)
    result["curve"] = curve
    result["final"] = curve[max(curve)]
    result["metrics"] = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line]
    times = [r["time"] for r in result["metrics"] if "time" in r]
    result["train_minutes"] = round((max(times) - min(times)) / 60, 2)  # step 1 to the last step, from the log
    return result


# ----------------------------------------------------------------------------------------------------------------
# report


def plot(results: list[dict], floors: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for r in results:
        label = f"{r['spec']} s{r['seed']}"
        steps = [0] + [int(s) for s in r["curve"]]
        points = [r["step0"]] + list(r["curve"].values())
        axes[0].plot(steps, [p["cls"]["knn_top1"] for p in points], marker="o", label=f"k-NN {label}")
        axes[0].plot(steps, [p["cls"]["linear_top1"] for p in points], marker="s", ls="--", label=f"linear {label}")
        m = [x for x in r["metrics"] if "dino_target_entropy" in x]
        axes[1].plot([x["step"] for x in m], [x["dino_loss"] for x in m], label=f"DINO loss {label}")
        axes[1].plot([x["step"] for x in m], [x["dino_target_entropy"] for x in m], ls=":",
                     label=f"target entropy {label}")
        axes[2].plot([x["step"] for x in m], [x["teacher_cls_cos"] for x in m], label=f"[CLS] cos {label}")
        axes[2].plot([x["step"] for x in m], [x["teacher_head_cos"] for x in m], ls=":", label=f"head cos {label}")
    for name, value, style in (("raw-pixel k-NN", floors["knn_top1"], "-."),
                               ("raw-pixel logistic", floors["linear_top1"], ":")):
        axes[0].axhline(value, color="grey", ls=style, label=name)
    if results:
        k = load_config([RECIPE]).dino.head_n_prototypes
        axes[1].axhline(float(np.log(k)), color="grey", ls="-.", label="ln K (uniform)")
    axes[0].set(title="Fashion-MNIST test (10k): teacher probes", xlabel="step", ylabel="top-1 %")
    axes[1].set(title="DINO [CLS] term and target entropy (nats)", xlabel="step")
    axes[2].set(title="teacher: mean pairwise cosine across images", xlabel="step")
    for ax in axes:
        ax.legend(fontsize=6)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def summarise(results: list[dict]) -> dict[str, dict[str, Any]]:
    """Mean and spread (sample std) over seeds per spec of the final probes."""
    out: dict[str, dict[str, Any]] = {}
    for spec in dict.fromkeys(r["spec"] for r in results):
        rs = [r for r in results if r["spec"] == spec]
        row: dict[str, Any] = {"seeds": [r["seed"] for r in rs]}
        for key, get in (("knn", lambda r: r["final"]["cls"]["knn_top1"]),
                         ("linear", lambda r: r["final"]["cls"]["linear_top1"]),
                         ("linear_cls_patchmean", lambda r: r["final"]["cls_patchmean"]["linear_top1"]),
                         ("step0_linear", lambda r: r["step0"]["cls"]["linear_top1"])):
            values = [get(r) for r in rs]
            row[key] = {"mean": round(statistics.fmean(values), 2),
                        "std": round(statistics.stdev(values), 2) if len(values) > 1 else None}
        out[spec] = row
    return out


def markdown(report: dict) -> str:
    f = report["floors"]
    lines = [f"Command: `{report['command']}` ({report['total_minutes']} min on this machine)", "",
             f"Floors on the 10k test split (probe train: {report['probe_train']} images): raw-pixel k-NN "
             f"{f['knn_top1']:.2f}%, raw-pixel logistic regression {f['linear_top1']:.2f}%.", "",
             "| spec | seed | steps | train min | k-NN step 0 | k-NN end | linear step 0 | linear end | "
             "linear [CLS]+patch end |", "|---|---|---|---|---|---|---|---|---|"]
    for r in report["runs"]:
        lines.append(f"| {r['spec']} | {r['seed']} | {r['steps']} | {r['train_minutes']} | "
                     f"{r['step0']['cls']['knn_top1']:.2f} | {r['final']['cls']['knn_top1']:.2f} | "
                     f"{r['step0']['cls']['linear_top1']:.2f} | {r['final']['cls']['linear_top1']:.2f} | "
                     f"{r['final']['cls_patchmean']['linear_top1']:.2f} |")
    if len(report["runs"]) > 1:
        lines += ["", "| spec | seeds | k-NN end (mean ± std) | linear end | linear [CLS]+patch end |",
                  "|---|---|---|---|---|"]
        for spec, row in report["summary"].items():
            def ms(d: dict) -> str:
                return f"{d['mean']:.2f}" + (f" ± {d['std']:.2f}" if d["std"] is not None else "")
            lines.append(f"| {spec} | {len(row['seeds'])} | {ms(row['knn'])} | {ms(row['linear'])} | "
                         f"{ms(row['linear_cls_patchmean'])} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--source", type=Path, default=DEBIAN_DIR, help="folder of the four Fashion-MNIST idx(.gz) files")
    p.add_argument("--work", type=Path, default=Path("/tmp/dinospec_fashion_mnist"), help="PNG folders (cached)")
    p.add_argument("--out", type=Path, default=REPO / "runs" / "bench_learning")
    p.add_argument("--specs", nargs="+", default=["paper"])
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--steps", type=int, default=None, help="pretraining steps per run (default: the recipe's)")
    p.add_argument("--probe-train", type=int, default=10000, help="train images the probes fit on (balanced)")
    p.add_argument("--knn-subset", type=int, default=2000, help="k-NN memory of the in-training curve")
    p.add_argument("overrides", nargs="*", help="config overrides for every run (key=value)")
    args = p.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    t0 = time.perf_counter()
    folders = prepare(args.source, args.work, args.probe_train, args.knn_subset)
    print(f"data ready in {time.perf_counter() - t0:.0f} s: {folders}", flush=True)
    recipe = load_config([RECIPE])
    steps = args.steps or recipe.optim.epochs * recipe.train.official_epoch_length  # shorter: schedules keep length
    results: list[dict] = []
    for seed in args.seeds:  # seeds outside: an interrupted A/B has every spec at the seeds it finished
        for spec in args.specs:
            out = args.out / f"{spec}_seed{seed}"
            results.append(pretrain_and_probe(folders, out, spec, seed, steps, args.overrides))
            report(args, results, folders, t0)  # after every run: an interrupted A/B keeps what it measured
    print(markdown(report(args, results, folders, t0)))


def report(args: argparse.Namespace, results: list[dict], folders: dict[str, Path], t0: float) -> dict:
    """results.json, learning.png and results.md under args.out, for the runs so far."""
    floors = raw_pixel_floors(folders, args.work / f"floors_{args.probe_train}.json")
    result = {"command": "python scripts/bench_learning.py " + " ".join(sys.argv[1:]),
              "total_minutes": round((time.perf_counter() - t0) / 60, 1), "probe_train": args.probe_train,
              "floors": floors, "runs": results, "summary": summarise(results)}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(result, indent=1) + "\n")
    plot(results, floors, args.out / "learning.png")
    (args.out / "results.md").write_text(markdown(result))
    return result


if __name__ == "__main__":
    main()
