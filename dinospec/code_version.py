"""Which code a run runs, and a frozen copy of it for SLURM jobs.

A requeued job starts again hours later and imports whatever is in its working directory then. So `dinospec
submit` snapshots the repository (submitit's RsyncSnapshot: a shallow clone of HEAD, then the working tree's
files as they are now: tracked ones with uncommitted edits, and untracked ones git does not ignore, since an edited
module may import a new one) into ``<run>/code/<time>-<commit>/`` and submits from there: every run of the job,
requeues included, imports that copy. Each writer of a run records `describe()`
(commit, dirty flag, where the code was imported from) in ``<run>/writers.jsonl`` (dinospec/run_lease.py).
"""

from __future__ import annotations

import shutil
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import dinospec

CODE_DIR = "code"


def source_root() -> Path:
    """The folder that holds the imported dinospec package (a repository checkout, a snapshot, or site-packages)."""
    return Path(dinospec.__file__).resolve().parent.parent


def _git(root: Path, *args: str) -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def describe(root: Path | None = None) -> dict[str, Any]:
    """{"commit", "dirty", "modified", "source"} of the code at `root` (default: the imported dinospec). Outside a
    git checkout: commit None and the package version."""
    root = source_root() if root is None else root
    commit = _git(root, "rev-parse", "HEAD") if (root / ".git").exists() else None
    if commit is None:
        return {"commit": None, "dirty": None, "version": dinospec.__dict__.get("__version__"), "source": str(root)}
    modified = (_git(root, "diff", "--name-only", "HEAD") or "").splitlines()  # tracked files, staged or not
    untracked = _untracked(root)
    return {"commit": commit, "dirty": bool(modified or untracked), "modified": modified[:50],
            "untracked": untracked[:50], "source": str(root)}


def _untracked(root: Path) -> list[str]:
    """Files git neither tracks nor ignores (new modules not committed yet)."""
    return [f for f in (_git(root, "ls-files", "--others", "--exclude-standard") or "").splitlines() if f]


def snapshot_available() -> str | None:
    """None when a snapshot can be taken here, else why not."""
    from submitit.helpers import RsyncSnapshot

    if not (source_root() / ".git").exists():
        return f"{source_root()} is not a git checkout"
    if not RsyncSnapshot.available():
        return "rsync is not installed"
    return None


@contextmanager
def snapshot(run_dir: Path) -> Iterator[Path]:
    """Copy the code into ``<run>/code/<time>-<commit>/`` and make it the working directory while the job is
    submitted (sbatch records it; SLURM starts every run of the job there). Removed again if submission fails."""
    from submitit.helpers import RsyncSnapshot

    root = source_root()
    commit = (_git(root, "rev-parse", "--short=10", "HEAD") or "nogit")
    target = Path(run_dir).absolute() / CODE_DIR / f"{time.strftime('%Y%m%d-%H%M%S')}-{commit}"
    ok = False
    try:
        # the shallow clone RsyncSnapshot would make, without git's progress lines on the user's terminal
        target.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run(["git", "clone", "--quiet", "--depth=2", f"file://{root}", str(target)], check=True,
                       capture_output=True, timeout=600)
        with RsyncSnapshot(target, root_dir=root, include=_untracked(root)):
            yield target
        ok = True
    finally:
        if not ok:
            shutil.rmtree(target, ignore_errors=True)
