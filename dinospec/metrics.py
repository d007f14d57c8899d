"""Where a run's numbers go: console progress (rank 0), `<run>/metrics.jsonl`, optionally wandb, and plots."""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import Any, Mapping, TextIO

CONSOLE_KEYS = ("loss", "dino_loss", "ibot_loss", "koleo_loss", "lr", "mom", "img_s")
PLAIN_EVERY_S = 30.0  # a console that is not a terminal gets one progress line per this many seconds at most

log = logging.getLogger(__name__)


class MetricsLogger:
    """Rank 0 writes; other ranks construct it with enabled=False and every call is a no-op.

    Progress: a tqdm bar on a terminal; on anything else (a SLURM log file, `| tee`) one plain line per logged step
    at most every `plain_every_s` seconds, plus the first and the last, since a bar rewrites itself into a file
    hundreds of times. A metrics.jsonl that cannot be written (a full disk) is reported once and then skipped:
    the run's own failure (say, the checkpoint that could not be saved) is the error to report, not this one.
    """

    def __init__(self, run_dir: Path, enabled: bool, total_steps: int, start_step: int, progress: bool = True,
                 wandb_cfg: Mapping[str, Any] | None = None, config: Mapping[str, Any] | None = None,
                 console: TextIO | None = None, plain_every_s: float = PLAIN_EVERY_S):
        self.enabled = enabled
        self._file = None
        self._path = run_dir / "metrics.jsonl"
        self._bar = None
        self._wandb = None
        self._console = console if console is not None else sys.stdout
        self._plain = progress and not _isatty(self._console)
        self._plain_every_s = plain_every_s
        self._total, self._start = total_steps, start_step
        self._t0 = time.monotonic()
        self._last_line: float | None = None
        if not enabled:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        drop_records_after(self._path, start_step)
        self._file = open(self._path, "a", encoding="utf-8")
        if progress and not self._plain:
            from tqdm import tqdm

            self._bar = tqdm(total=total_steps, initial=start_step, unit="it", dynamic_ncols=True, smoothing=0.1,
                             file=self._console)
        if wandb_cfg and wandb_cfg.get("enabled"):
            self._wandb = _init_wandb(run_dir, wandb_cfg, config or {})

    def log(self, step: int, metrics: Mapping[str, Any]) -> None:
        if not self.enabled:
            return
        record = {"step": step, "time": round(time.time(), 3), **metrics}
        if self._file is not None:
            try:
                self._file.write(json.dumps(record) + "\n")
                self._file.flush()
            except OSError as e:
                log.error("cannot write %s (%s): metrics are no longer recorded there", self._path, e)
                self._drop_file()
        if self._wandb is not None:
            self._wandb.log(dict(metrics), step=step)
        shown = {k: _short(metrics[k]) for k in CONSOLE_KEYS if k in metrics}
        if self._bar is not None:
            self._bar.set_postfix(shown, refresh=False)
        elif self._plain:
            self._plain_line(step, shown)

    def _plain_line(self, step: int, shown: Mapping[str, Any]) -> None:
        now = time.monotonic()
        due = self._last_line is None or now - self._last_line >= self._plain_every_s or step >= self._total
        if not due:
            return
        self._last_line = now
        done, elapsed = step - self._start, now - self._t0
        eta = timedelta(seconds=round(elapsed / done * (self._total - step))) if done > 0 else "?"
        values = " ".join(f"{k} {v}" for k, v in shown.items())
        print(f"step {step}/{self._total} ({100 * step / max(self._total, 1):.1f}%) {values} "
              f"elapsed {timedelta(seconds=round(elapsed))} eta {eta}", file=self._console, flush=True)

    def advance(self, steps: int = 1) -> None:
        if self._bar is not None:
            self._bar.update(steps)

    def info(self, message: str) -> None:
        """A line on the console that does not break the progress bar."""
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(message, file=self._console)
        else:
            print(message, file=self._console, flush=True)

    def _drop_file(self) -> None:
        try:
            self._file.close()
        except OSError:  # the buffered bytes cannot be flushed either
            pass
        self._file = None

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        if self._file is not None:
            try:
                self._file.close()
            except OSError as e:
                log.error("cannot write %s (%s)", self._path, e)
        if self._wandb is not None:
            self._wandb.finish()
        self._bar = self._file = self._wandb = None


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # no isatty, or closed
        return False


def drop_records_after(path: Path, step: int) -> None:
    """Before a run (re)starts at `step`: drop the records of later steps, which an interrupted run logged after its
    last checkpoint and the resumed run will log again, and a line torn by a kill. Rewritten atomically."""
    if not path.exists():
        return
    kept, dropped = [], 0
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            keep = json.loads(line)["step"] <= step
        except (ValueError, KeyError, TypeError):
            keep = False
        if keep:
            kept.append(line)
        else:
            dropped += 1
    if dropped:
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(f"{line}\n" for line in kept), encoding="utf-8")
        os.replace(tmp, path)


def _short(v: Any) -> Any:
    return f"{v:.4g}" if isinstance(v, float) else v


def _init_wandb(run_dir: Path, cfg: Mapping[str, Any], config: Mapping[str, Any]) -> Any:
    import wandb

    os.environ.setdefault("WANDB_DIR", str(run_dir))
    return wandb.init(project=cfg.get("project"), entity=cfg.get("entity"), name=cfg.get("name") or run_dir.name,
                      mode=cfg.get("mode", "online"), dir=str(run_dir), config=dict(config), resume="allow",
                      id=_wandb_id(run_dir))


def _wandb_id(run_dir: Path) -> str:
    """A stable id per run dir, so a resumed run continues the same wandb run."""
    path = run_dir / "wandb_id.txt"
    if not path.exists():
        import uuid

        path.write_text(uuid.uuid4().hex[:12])
    return path.read_text().strip()


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """metrics.jsonl -> records, one per step (should a step appear twice, the last record wins)."""
    by_step: dict[int, dict[str, Any]] = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if line:
                rec = json.loads(line)
                by_step[rec["step"]] = rec
    return [by_step[s] for s in sorted(by_step)]


def plot_losses(metrics_path: Path, out_png: Path) -> Path | None:
    """The loss curves of a run as a PNG (total and each term), for a first look at whether it learns."""
    records = [r for r in read_metrics(metrics_path) if "loss" in r]
    if not records:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [k for k in ("loss", "dino_loss", "ibot_loss", "koleo_loss", "gram_loss") if any(k in r for r in records)]
    knn_keys = sorted({k for r in records for k in r if k.startswith("knn_top1_")})
    diagnostics = any("dino_target_entropy" in r for r in records)
    panels = len(keys) + bool(knn_keys) + 2 * diagnostics
    fig, axes = plt.subplots(1, panels, figsize=(4 * panels, 3.2), squeeze=False)
    ln_k = _ln_prototypes(metrics_path.parent / "config.yaml")

    def curve(ax: Any, key: str, **style: Any) -> None:
        pts = [(r["step"], r[key]) for r in records if key in r and r[key] is not None and math.isfinite(r[key])]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], lw=1.2, **style)

    def finish(ax: Any, title: str, ylabel: str) -> None:
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)

    panel = iter(axes[0])
    for key in keys:
        ax = next(panel)
        curve(ax, key)
        if key == "dino_loss" and ln_k is not None:
            ax.axhline(ln_k, color="grey", ls="--", lw=1, label="ln K")
        finish(ax, key.replace("_", " "), "value")
    if diagnostics:  # is image information reaching the targets? (dinospec/ssl/diagnostics.py)
        ax = next(panel)
        curve(ax, "dino_target_entropy", label="target entropy")
        if ln_k is not None:
            ax.axhline(ln_k, color="grey", ls="--", lw=1, label="ln K (uniform)")
        finish(ax, "teacher DINO targets", "nats")
        ax = next(panel)
        curve(ax, "teacher_cls_cos", label="backbone [CLS]")
        curve(ax, "teacher_head_cos", label="head output")
        finish(ax, "teacher: cosine across images", "mean pairwise cosine")
    if knn_keys:  # evaluation.knn_period_steps: accuracy of the teacher while it trains
        ax = next(panel)
        for key in knn_keys:
            curve(ax, key, marker="o", label=key.split("_")[-1])
        finish(ax, "teacher k-NN top-1", "accuracy (%)")
    fig.suptitle(f"training: {metrics_path.parent.name}")
    fig.tight_layout()
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png


def _ln_prototypes(config_path: Path) -> float | None:
    """ln K of the run's DINO head (the [CLS] loss and target entropy of uniform targets), if its config is there."""
    if not config_path.is_file():
        return None
    from omegaconf import OmegaConf

    k = OmegaConf.select(OmegaConf.load(config_path), "dino.head_n_prototypes")
    return math.log(k) if k else None
