"""Sharded, atomic, resumable checkpoints on torch.distributed.checkpoint (DCP): saving, retention, loading.

The same code serves one process, DDP and FSDP2 (DCP reshards on load, so a run resumes on another number of
ranks). What a checkpoint looks like on disk, how it is published atomically and read without unpickling code, is
dinospec/checkpoint_format.py.
"""

from __future__ import annotations

import logging
import os
import secrets
import shutil
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemWriter
from torch.distributed.checkpoint.metadata import TensorStorageMetadata
from torch.distributed.checkpoint.stateful import Stateful
from torch.distributed.tensor import DTensor

from dinospec.checkpoint_format import (
    CHECKPOINTS, CONFIG, LATEST, METADATA, _FAILURES, _LEFTOVER_RE, _STEP_RE, CheckpointError, NonFiniteCheckpoint,
    _dcp, _describe, _fsync_dir, _replace_atomic, _SafeLoadPlanner, _VerifiedReader, _write_durable, _write_manifest,
    resolve_checkpoint, verify_checkpoint,
)
from dinospec.checkpoint_format import load_model_state, safe_torch_load  # re-exported: part of this module's API

__all__ = ["Checkpointer", "CheckpointError", "NonFiniteCheckpoint", "load_model_state", "resolve_checkpoint",
           "safe_torch_load", "verify_checkpoint"]


log = logging.getLogger(__name__)
_PLAIN_LEAVES = (torch.Tensor, bool, int, float, str, bytes, type(None))


# ---------------------------------------------------------------------------------------------------------------
# state trees

def _plain(value: Any) -> Any:
    return value.state_dict() if isinstance(value, Stateful) else value


def _scalars_to_tensors(tree: Any) -> Any:
    """Python scalars -> 0-d tensors (nothing for DCP to pickle); tensors are passed through, not copied."""
    if isinstance(tree, Mapping):
        return {k: _scalars_to_tensors(v) for k, v in tree.items()}
    if isinstance(tree, bool):
        return torch.tensor(tree)
    if isinstance(tree, int):
        return torch.tensor(tree, dtype=torch.int64)
    if isinstance(tree, float):
        return torch.tensor(tree, dtype=torch.float64)
    return tree


def _leaves(tree: Any, key: str = "") -> Iterator[tuple[str, Any]]:
    """(dotted key as DCP names it, leaf) for every leaf of a nested dict / list state."""
    if isinstance(tree, Mapping):
        items: Any = tree.items()
    elif isinstance(tree, (list, tuple)):
        items = enumerate(tree)
    else:
        yield key, tree
        return
    for k, v in items:
        yield from _leaves(v, f"{key}.{k}" if key else str(k))


def _first_unplain(tree: Any) -> str | None:
    """A value the safe loader would refuse (anything but tensors, scalars, strings, None and containers of them)."""
    return next((f"{k} ({type(v).__name__})" for k, v in _leaves(tree) if not isinstance(v, _PLAIN_LEAVES)), None)


def _is_nonfinite(value: Any) -> bool:
    """NaN/inf in a floating tensor (DTensor: this rank's shard). The sum is non-finite whenever an element is, and
    40x faster than isfinite().all() on CPU (it is part of an async save's stall); a non-finite sum can also be
    overflow of finite values, so it gets the exact check."""
    if not isinstance(value, torch.Tensor) or not (value.is_floating_point() or value.is_complex()):
        return False
    local = value.to_local() if isinstance(value, DTensor) else value
    return not bool(torch.isfinite(local.sum())) and not bool(torch.isfinite(local).all())


def _saved_part(tree: Mapping, saved: Mapping[str, Any], prefix: str) -> tuple[dict, list[str]]:
    """The part of `tree` the checkpoint holds with the same shapes, and the keys it does not (left untouched)."""
    kept: dict[str, Any] = {}
    skipped: list[str] = []
    for k, v in tree.items():
        key = f"{prefix}.{k}"
        if isinstance(v, Mapping):
            sub, sub_skipped = _saved_part(v, saved, key)
            skipped += sub_skipped
            if sub:
                kept[k] = sub
        elif isinstance(v, torch.Tensor):
            md = saved.get(key)
            if not isinstance(md, TensorStorageMetadata):
                skipped.append(f"{key} (not saved)")
            elif tuple(md.size) != tuple(v.shape):
                skipped.append(f"{key} (saved {tuple(md.size)}, now {tuple(v.shape)})")
            else:
                kept[k] = v
        elif key in saved or any(s.startswith(key + ".") for s in saved):
            kept[k] = v
        else:
            skipped.append(f"{key} (not saved)")
    return kept, skipped


def _merge_loaded(current: Mapping, loaded: Mapping) -> dict:
    """`current` with the loaded values put in; python scalars keep their python type."""
    out = {}
    for k, v in current.items():
        if k not in loaded:
            out[k] = v
        elif isinstance(v, Mapping):
            out[k] = _merge_loaded(v, loaded[k])
        elif isinstance(v, (bool, int, float)) and isinstance(loaded[k], torch.Tensor):
            out[k] = type(v)(loaded[k].item())
        else:
            out[k] = loaded[k]
    return out


def _assign(target: dict, values: Mapping) -> None:
    for k, v in values.items():
        if isinstance(target.get(k), dict) and isinstance(v, Mapping):
            _assign(target[k], v)
        else:
            target[k] = v


def _prepare_train(train: Any, saved: Mapping[str, Any]) -> tuple[dict, Callable[[], list[str]]]:
    """state["train"] for dcp.load and the step that hands the loaded values back. Unlike model/optim, the train
    entry tolerates keys that the checkpoint lacks or shaped differently (per-rank RNG on another world size):
    they keep their current values and are reported."""
    current = _plain(train)
    kept, skipped = _saved_part(_scalars_to_tensors(current), saved, "train")

    def finish() -> list[str]:
        merged = _merge_loaded(current, kept)
        if isinstance(train, Stateful):
            train.load_state_dict(merged)
        else:
            _assign(train, merged)
        return skipped

    return kept, finish


# ---------------------------------------------------------------------------------------------------------------
# ranks

class _Ranks:
    """The checkpointer's own gloo group (created once, collectively), or one process without any group."""

    def __init__(self, process_group: dist.ProcessGroup | None):
        self.distributed = dist.is_available() and dist.is_initialized()
        self.group: dist.ProcessGroup | None = None
        self.rank, self.size = 0, 1
        if not self.distributed:
            if process_group is not None:
                raise ValueError("process_group given but torch.distributed is not initialised")
            return
        ranks = None if process_group is None else dist.get_process_group_ranks(process_group)
        self.group = dist.new_group(ranks=ranks, backend="gloo")
        self.rank, self.size = dist.get_rank(self.group), dist.get_world_size(self.group)

    def broadcast(self, obj: Any) -> Any:
        """rank 0's obj on every rank."""
        if not self.distributed:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, group=self.group, group_src=0)
        return box[0]

    def gather_errors(self, error: str | None) -> list[str]:
        """Every rank's error (None = fine) on every rank: all ranks take the same branch afterwards."""
        errors = [error]
        if self.distributed:
            errors = [None] * self.size
            dist.all_gather_object(errors, error, group=self.group)
        return [f"rank {r}: {e}" if self.size > 1 else e for r, e in enumerate(errors) if e]


# ---------------------------------------------------------------------------------------------------------------
# the checkpointer

class Checkpointer:
    """Saves and loads ``{"model": ..., "optim": ..., "train": ...}`` (Stateful objects or nested dicts of tensors)
    under ``<run_dir>/checkpoints``.

    With torch.distributed initialised, construction is collective (every rank of the default group calls it: it
    creates the checkpointer's gloo group) and so are save, wait and load; read_config and latest_step are local.
    keep_last / keep_every: after each publish, keep the newest `keep_last` steps (<= 0: all) and every step that is
    a multiple of `keep_every` (0: none); the step `latest` names is never deleted, nor steps newer than it.
    async_save: save() returns once the state is copied to CPU memory; files are written by a background thread
    over the dedicated gloo group (async_save on the default group deadlocks under FSDP2) and published by rank 0
    as soon as they are complete; wait() (or the next save/load) joins that work and raises its errors.
    """

    def __init__(self, run_dir: str | Path, keep_last: int = 3, keep_every: int = 0, async_save: bool = False,
                 process_group: dist.ProcessGroup | None = None):
        self.dir = Path(run_dir) / CHECKPOINTS
        self.keep_last, self.keep_every, self.async_save = keep_last, keep_every, async_save
        self._ranks = _Ranks(process_group)
        self._pending: Future | None = None
        self._executor: ThreadPoolExecutor | None = None
        self.last_load_skipped: list[str] = []
        """state["train"] keys the last load() left as they were (not in the checkpoint, or shaped differently)."""

    # -- save ---------------------------------------------------------------------------------------------------

    def save(self, step: int, state: dict[str, Any], config_yaml: str = "") -> Path:
        """Write `state` as step `step` and publish it (async: once written). Returns the step_<N> path."""
        self.wait()
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        tree = {k: _plain(v) for k, v in state.items()}
        if "train" in tree:
            tree["train"] = _scalars_to_tensors(tree["train"])
        unplain = _first_unplain(tree)
        if bad := self._ranks.gather_errors(unplain and f"{unplain} is not a tensor, scalar, string or container"):
            raise CheckpointError(f"step {step} not saved: {', '.join(bad)} (store objects by their state_dict())")
        bad = self._ranks.gather_errors(next((k for k, v in _leaves(tree) if _is_nonfinite(v)), None))
        if bad:
            raise NonFiniteCheckpoint(f"step {step} not saved: non-finite values in {', '.join(bad)}; "
                                      f"{self.dir / LATEST} still names the previous checkpoint")
        tmp = self._ranks.broadcast(self._begin(step) if self._ranks.rank == 0 else None)
        if tmp.startswith("error:"):
            raise CheckpointError(f"step {step} not saved: {tmp[6:]}")
        kwargs = dict(storage_writer=FileSystemWriter(tmp, sync_files=True), process_group=self._ranks.group,
                      no_dist=not self._ranks.distributed)
        if self.async_save:
            upload = _dcp(dcp.async_save, tree, **kwargs)
            if self._executor is None:
                self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint-publish")
            self._pending = self._executor.submit(self._complete_or_report, upload, step, Path(tmp), config_yaml)
        else:
            self._pending = Future()
            try:
                _dcp(dcp.save, tree, **kwargs)
                self._complete(None, step, Path(tmp), config_yaml)
                self._pending.set_result(None)
            except _FAILURES as e:  # raised on every rank by wait(), which all ranks reach
                self._pending.set_exception(e)
            self.wait()
        return self.dir / f"step_{step}"

    def wait(self) -> None:
        """Finish a pending save on every rank; CheckpointError (on all ranks) if any rank's part failed."""
        if self._pending is None:
            return
        pending, self._pending = self._pending, None
        error = None
        try:
            pending.result()
        except _FAILURES as e:
            error = _describe(e)
        failed = self._ranks.gather_errors(error)
        if failed:
            raise CheckpointError(f"checkpoint save failed, {self.dir / LATEST} unchanged: {'; '.join(failed)}")

    def close(self) -> None:
        self.wait()
        if self._executor is not None:
            self._executor.shutdown()
            self._executor = None

    def _begin(self, step: int) -> str:
        """Rank 0: a fresh hidden directory for DCP to write into (as "error: ..." on failure, for every rank)."""
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            self._remove_leftovers()
            tmp = self.dir / f".tmp_step_{step}_{secrets.token_hex(4)}"
            tmp.mkdir()
            return str(tmp)
        except OSError as e:
            return f"error: {e}"

    def _complete_or_report(self, upload: Future, step: int, tmp: Path, config_yaml: str) -> None:
        """An async save's background part: its failure is logged the moment it happens, first and naming the
        checkpoint (on a full disk the training loop's next write fails too, and that must not be the first word);
        wait() raises it on every rank."""
        try:
            self._complete(upload, step, tmp, config_yaml)
        except _FAILURES as e:
            previous = self._named_by_latest()
            log.error("checkpoint step %d could not be saved: %s; %s still names %s", step, _describe(e),
                      self.dir / LATEST, f"step_{previous}" if previous is not None else "no checkpoint")
            raise

    def _complete(self, upload: Future | None, step: int, tmp: Path, config_yaml: str) -> None:
        """After DCP's write, which ends once every rank's files are written; the publish is rank 0's alone."""
        if upload is not None:
            getattr(upload, "upload_completion", upload).result()  # an AsyncSaveResponse with some stagers
        if self._ranks.rank == 0:
            self._publish(step, tmp, config_yaml)

    def _publish(self, step: int, tmp: Path, config_yaml: str) -> None:
        _write_durable(tmp / CONFIG, config_yaml)
        _write_manifest(tmp, step, self._ranks.size)
        _fsync_dir(tmp)
        final = self.dir / f"step_{step}"
        displaced = None
        if final.exists():  # the same step saved again (a resumed run reaching it anew): the new one replaces it
            displaced = self.dir / f".del_step_{step}_{secrets.token_hex(4)}"
            os.rename(final, displaced)
        os.rename(tmp, final)
        _fsync_dir(self.dir)
        _replace_atomic(self.dir / LATEST, f"{final.name}\n")
        log.info("checkpoint step %d published: %s", step, final)
        try:
            if displaced is not None:
                shutil.rmtree(displaced)
            self._apply_retention(step)
        except OSError as e:  # the checkpoint is published; a failed clean-up must not fail the save
            log.warning("checkpoint retention in %s failed: %s", self.dir, e)

    def _apply_retention(self, latest: int) -> None:
        older = [s for s in self._published_steps() if s < latest]
        keep = set(older[-(self.keep_last - 1):] if self.keep_last > 1 else []) if self.keep_last > 0 else set(older)
        if self.keep_every > 0:
            keep |= {s for s in older if s % self.keep_every == 0}
        for s in older:
            if s not in keep:
                doomed = self.dir / f".del_step_{s}_{secrets.token_hex(4)}"
                os.rename(self.dir / f"step_{s}", doomed)  # never a half-deleted step_<N> on a crash
                shutil.rmtree(doomed)

    def _remove_leftovers(self) -> None:
        """Rank 0, before a save: hidden directories and files of interrupted saves and deletions, nothing else."""
        for p in self.dir.iterdir():
            if _LEFTOVER_RE.match(p.name):
                log.info("removing leftover %s of an interrupted checkpoint save", p)
                shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()

    # -- find ---------------------------------------------------------------------------------------------------

    def _published_steps(self) -> list[int]:
        if not self.dir.is_dir():
            return []
        return sorted(int(m.group(1)) for p in self.dir.iterdir() if (m := _STEP_RE.match(p.name)) and p.is_dir())

    def _named_by_latest(self) -> int | None:
        try:
            text = (self.dir / LATEST).read_text(encoding="utf-8").strip()
        except FileNotFoundError:
            return None
        except (OSError, UnicodeDecodeError) as e:
            log.warning("%s unreadable (%s): trying the step directories", self.dir / LATEST, e)
            return None
        if not (m := _STEP_RE.match(text)):
            log.warning("%s holds %r, not step_<N>: trying the step directories", self.dir / LATEST, text[:40])
            return None
        return int(m.group(1))

    def candidates(self) -> list[Path]:
        """Checkpoints in the order load() tries them: the one `latest` names, then older step_<N> descending
        (without `latest`: all step_<N> descending). Steps newer than `latest` never finished publishing."""
        steps, named = self._published_steps(), self._named_by_latest()
        if named is not None:
            if named not in steps:
                log.warning("%s names step_%d, which does not exist: trying older ones", self.dir / LATEST, named)
            steps = [s for s in steps if s <= named]
        return [self.dir / f"step_{s}" for s in reversed(steps)]

    def latest_step(self) -> int | None:
        """The step load() would try first (not verified), or None when there is no checkpoint."""
        found = self.candidates()
        return int(found[0].name[len("step_"):]) if found else None

    def read_config(self, path: str | Path | None = None) -> str:
        """config.yaml of the checkpoint at `path`, or of the one load() would pick (quick verification: sizes and
        small files' hashes; load() also hashes the shards)."""
        if path is not None:
            ckpt = resolve_checkpoint(path)
            verify_checkpoint(ckpt, deep=False)
            return (ckpt / CONFIG).read_text(encoding="utf-8")
        for ckpt in self.candidates():
            try:
                verify_checkpoint(ckpt, deep=False)
                return (ckpt / CONFIG).read_text(encoding="utf-8")
            except CheckpointError as e:
                log.warning("checkpoint %s skipped: %s", ckpt, e)
        raise CheckpointError(f"no usable checkpoint in {self.dir}")

    # -- load ---------------------------------------------------------------------------------------------------

    def load(self, state: dict[str, Any], path: str | Path | None = None) -> int | None:
        """Load in place into `state` (dcp.load semantics: Stateful objects get load_state_dict, dict tensors are
        copied into). path None: `latest`, then older checkpoints when one fails (each failure logged with its
        reason); None when there is none at all, CheckpointError when none of them loads. An explicit `path` (a step
        directory, or a run directory whose `latest` is used) that fails raises CheckpointError."""
        self.wait()
        if path is not None:
            return self._load_one(resolve_checkpoint(path), state)
        found = self._ranks.broadcast([str(p) for p in self.candidates()] if self._ranks.rank == 0 else None)
        failures = []
        for ckpt in map(Path, found):
            try:
                return self._load_one(ckpt, state)
            except CheckpointError as e:
                log.warning("checkpoint %s not loaded: %s; trying the next older one", ckpt, e)
                failures.append(f"{ckpt.name}: {e}")
        if failures:
            raise CheckpointError(f"no checkpoint in {self.dir} could be loaded: " + " | ".join(failures))
        return None

    def _load_one(self, ckpt: Path, state: dict[str, Any]) -> int:
        manifest: Any = None
        if self._ranks.rank == 0:
            try:
                manifest = verify_checkpoint(ckpt, deep=True)
            except CheckpointError as e:
                manifest = f"error: {e}"
        manifest = self._ranks.broadcast(manifest)
        if isinstance(manifest, str):
            raise CheckpointError(manifest[len("error: "):])
        sha = manifest["files"][METADATA]["sha256"]
        load_state, finish, error = dict(state), None, None
        try:
            metadata = _VerifiedReader(ckpt, sha).read_metadata()
            if "train" in state:
                load_state["train"], finish = _prepare_train(state["train"], metadata.state_dict_metadata)
        except (CheckpointError, OSError) as e:
            error = str(e)
        if failed := self._ranks.gather_errors(error):
            raise CheckpointError("; ".join(failed))
        try:
            _dcp(dcp.load, load_state, storage_reader=_VerifiedReader(ckpt, sha), planner=_SafeLoadPlanner(),
                 process_group=self._ranks.group, no_dist=not self._ranks.distributed)
        except _FAILURES as e:  # DCP raises on every rank when any rank's read fails
            raise CheckpointError(f"{ckpt}: {_describe(e)}") from e
        self.last_load_skipped = finish() if finish is not None else []
        if self.last_load_skipped:
            log.warning("loaded %s; train keys left as they were: %s", ckpt, ", ".join(self.last_load_skipped))
        log.info("loaded checkpoint %s (step %d, saved by %d rank(s))", ckpt, manifest["step"], manifest["world_size"])
        return int(manifest["step"])
