"""Checks of a run's paths before anything is written, started or queued (torch-free, cheap on a login node).

`dinospec train` and `dinospec submit` call `check_run_paths` right after the config validates, so a missing data
folder or an unwritable run directory is one line and exit 2 within a second, instead of a traceback after
config.yaml was written (train) or a job that fails in SLURM half a minute later (submit). Only existence and
permissions are checked: indexing a data set can take minutes and is the trainer's job.
"""

from __future__ import annotations

import glob
import os
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from dinospec.config import ConfigError


def _check_data_path(path: str, kind: str, key: str) -> None:
    if glob.has_magic(path):
        if not glob.glob(path):
            raise ConfigError(f"config key '{key}' = {path!r} matches no files")
        return
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"config key '{key}' = {path!r} does not exist")
    if kind == "folder" and not p.is_dir():
        raise ConfigError(f"config key '{key}' = {path!r} is not a folder (kind folder)")
    if kind == "filelist" and not p.is_file():
        raise ConfigError(f"config key '{key}' = {path!r} is not a file list (kind filelist)")
    if not os.access(p, os.R_OK):
        raise ConfigError(f"config key '{key}' = {path!r} is not readable")
    if p.is_dir() and not _holds_a_file(p):
        raise ConfigError(f"config key '{key}' = {path!r} holds no files")


def _holds_a_file(folder: Path) -> bool:
    """Whether any non-hidden file lies under `folder` (stops at the first one: cheap on a large data set)."""
    for _, dirs, files in os.walk(folder):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        if any(not f.startswith(".") for f in files):
            return True
    return False


def check_writable_dir(path: str | Path, what: str) -> None:
    """`path` is a writable folder, or could be created as one (its nearest existing ancestor is writable)."""
    p = Path(path).absolute()
    if p.exists():
        if not p.is_dir():
            raise ConfigError(f"{what} {str(path)!r} exists and is not a folder")
        if not os.access(p, os.W_OK | os.X_OK):
            raise ConfigError(f"{what} {str(path)!r} is not writable")
        return
    parent = p.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"{what} {str(path)!r} cannot be created: {parent} is not a writable folder")


def check_run_paths(cfg: DictConfig, resume: str | None = None) -> None:
    """Every path the run will read exists and its output directory can be written; ConfigError naming the key."""
    if cfg.data.sources:  # a mixture replaces data.path
        for k, source in enumerate(cfg.data.sources):
            _check_data_path(str(source.path), source.kind, f"data.sources[{k}].path")
    else:
        _check_data_path(str(cfg.data.path), cfg.data.kind, "data.path")
    ev = cfg.evaluation
    if ev.knn_period_steps:
        for key in ("knn_train", "knn_val"):
            if not Path(ev[key]).is_dir():
                raise ConfigError(f"config key 'evaluation.{key}' = {ev[key]!r} is not a folder")
    weights = cfg.student.pretrained_weights
    if weights and not Path(weights).exists():
        raise ConfigError(f"config key 'student.pretrained_weights' = {weights!r} does not exist")
    sources = ["train.init_from"] + (["distill.teacher"] if OmegaConf.select(cfg, "distill.enabled") else [])
    for key in sources:  # a later phase submitted before its source run has finished
        source = OmegaConf.select(cfg, key)
        if source and not Path(source).exists():
            raise ConfigError(f"config key '{key}' = {source!r} does not exist")
    if resume not in (None, "auto", "never") and not Path(resume).exists():
        raise ConfigError(f"--resume {resume!r} does not exist")
    check_writable_dir(cfg.train.output_dir, "config key 'train.output_dir' =")
