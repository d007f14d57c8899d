"""Where a run's numbers go: console progress (rank 0), `<run>/metrics.jsonl`, optionally wandb, and plots."""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any, Mapping

CONSOLE_KEYS = ("loss", "dino_loss", "ibot_loss", "koleo_loss", "lr", "mom", "img_s")


class MetricsLogger:
    """Rank 0 writes; other ranks construct it with enabled=False and every call is a no-op."""

    def __init__(self, run_dir: Path, enabled: bool, total_steps: int, start_step: int, progress: bool = True,
                 wandb_cfg: Mapping[str, Any] | None = None, config: Mapping[str, Any] | None = None):
        self.enabled = enabled
        self._file = None
        self._bar = None
        self._wandb = None
        if not enabled:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        drop_records_after(run_dir / "metrics.jsonl", start_step)
        self._file = open(run_dir / "metrics.jsonl", "a", encoding="utf-8")
        if progress:
            from tqdm import tqdm

            self._bar = tqdm(total=total_steps, initial=start_step, unit="it", dynamic_ncols=True, smoothing=0.1)
        if wandb_cfg and wandb_cfg.get("enabled"):
            self._wandb = _init_wandb(run_dir, wandb_cfg, config or {})

    def log(self, step: int, metrics: Mapping[str, Any]) -> None:
        if not self.enabled:
            return
        record = {"step": step, "time": round(time.time(), 3), **metrics}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._wandb is not None:
            self._wandb.log(dict(metrics), step=step)
        if self._bar is not None:
            shown = {k: _short(metrics[k]) for k in CONSOLE_KEYS if k in metrics}
            self._bar.set_postfix(shown, refresh=False)

    def advance(self, steps: int = 1) -> None:
        if self._bar is not None:
            self._bar.update(steps)

    def info(self, message: str) -> None:
        """A line on the console that does not break the progress bar."""
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(message)
        else:
            print(message, flush=True)

    def close(self) -> None:
        for closer in (self._bar, self._file):
            if closer is not None:
                closer.close()
        if self._wandb is not None:
            self._wandb.finish()
        self._bar = self._file = self._wandb = None


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

    keys = [k for k in ("loss", "dino_loss", "ibot_loss", "koleo_loss") if any(k in r for r in records)]
    knn_keys = sorted({k for r in records for k in r if k.startswith("knn_top1_")})
    panels = len(keys) + bool(knn_keys)
    fig, axes = plt.subplots(1, panels, figsize=(4 * panels, 3.2), squeeze=False)
    for ax, key in zip(axes[0], keys):
        pts = [(r["step"], r[key]) for r in records if key in r and math.isfinite(r[key])]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], lw=1.2)
        ax.set_title(key.replace("_", " "))
        ax.set_xlabel("step")
        ax.set_ylabel("value")
        ax.grid(alpha=0.3)
    if knn_keys:  # evaluation.knn_period_steps: accuracy of the teacher while it trains
        ax = axes[0][-1]
        for key in knn_keys:
            pts = [(r["step"], r[key]) for r in records if key in r]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", lw=1.2, label=key.split("_")[-1])
        ax.set_title("teacher k-NN top-1")
        ax.set_xlabel("step")
        ax.set_ylabel("accuracy (%)")
        ax.legend()
        ax.grid(alpha=0.3)
    fig.suptitle(f"training: {metrics_path.parent.name}")
    fig.tight_layout()
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png
