"""The on-disk format of a checkpoint: layout, manifest, verification, and reading it without executing it.

Layout of a run directory::

    <run>/checkpoints/step_<N>/   __<rank>_0.distcp ..., .metadata   DCP: each rank writes its own shards
                                  config.yaml     the resolved run config (text given by the caller)
                                  manifest.json   step, world size, time, torch version, sha256 of every file above
    <run>/checkpoints/latest      "step_<N>": the commit point

Why a SIGKILL at any moment never leaves something that looks like a checkpoint but is not: DCP writes into a hidden
``.tmp_step_<N>_<nonce>/``; once every rank's files are on disk (DCP's closing collective), rank 0 writes config.yaml
and then manifest.json, fsyncs them and the directory, renames it to ``step_<N>`` (atomic), fsyncs the parent, and
only then replaces ``latest`` (temp file + fsync + os.replace). Loading trusts ``latest`` and a manifest that
verifies; anything else is skipped with the reason logged. Hidden leftovers are removed by rank 0 at the next save.

Trust: torch 2.14's FileSystemReader reads ``.metadata`` with an unrestricted ``pickle.load``, and DCP's default load
planner reads non-tensor values with ``torch.load(weights_only=False)``: opening a crafted checkpoint would run its
code. Here ``.metadata`` is read once, its sha256 checked against the manifest, and unpickled by an unpickler that
only builds DCP's metadata classes; non-tensor values go through ``torch.load(weights_only=True)`` (tensors already
do). Python scalars in ``state["train"]`` are stored as 0-d tensors.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import pickle
import re
import secrets
import warnings
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta, TensorStorageMetadata

log = logging.getLogger(__name__)

CHECKPOINTS, LATEST, MANIFEST, CONFIG, METADATA = "checkpoints", "latest", "manifest.json", "config.yaml", ".metadata"
FORMAT = "dinospec-dcp/1"
_STEP_RE = re.compile(r"^step_(\d+)$")
_LEFTOVER_RE = re.compile(r"^\.(tmp|del)_step_\d+_[0-9a-f]+$|^\.latest\.[0-9a-f]+\.tmp$")
_ALWAYS_HASH_BYTES = 16 << 20  # files this small are hashed even by the quick verification
_FAILURES = (Exception, CheckpointException)  # DCP's CheckpointException derives from BaseException


class CheckpointError(RuntimeError):
    """A checkpoint cannot be written, found, trusted or loaded; the message says which and why."""


class NonFiniteCheckpoint(CheckpointError):
    """The state holds NaN/inf: it is never published."""


# ---------------------------------------------------------------------------------------------------------------
# reading without executing: restricted unpickling of DCP metadata and of non-tensor values

_METADATA_GLOBALS = {("torch.distributed.checkpoint.metadata", n) for n in (
    "Metadata", "MetadataIndex", "StorageMeta", "TensorProperties", "TensorStorageMetadata", "ChunkStorageMetadata",
    "BytesStorageMetadata", "_MEM_FORMAT_ENCODING")} | {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("torch", "Size"),
    ("torch.serialization", "_get_layout"), ("collections", "OrderedDict"),
    ("pathlib", "PosixPath"), ("pathlib", "PurePosixPath"), ("pathlib", "WindowsPath"), ("pathlib", "PureWindowsPath")}


class _MetadataUnpickler(pickle.Unpickler):
    """Builds DCP's metadata dataclasses, torch.Size and dtypes; refuses every other global (os.system, eval, ...)."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _METADATA_GLOBALS:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"global '{module}.{name}' is not allowed in DCP metadata")


class _VerifiedReader(FileSystemReader):
    """FileSystemReader whose `.metadata` must match the manifest's sha256 and is unpickled restrictively."""

    def __init__(self, path: str | os.PathLike, metadata_sha256: str | None):
        super().__init__(path)
        self._expected_sha256 = metadata_sha256

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        if kwargs.get("rank") is not None:
            raise CheckpointError("rank-local DCP metadata is not supported")
        path = Path(self.path) / METADATA
        data = path.read_bytes()
        if self._expected_sha256 is not None and hashlib.sha256(data).hexdigest() != self._expected_sha256:
            raise CheckpointError(f"{path}: sha256 differs from {MANIFEST} (tampered or corrupt): refused")
        try:
            metadata = _MetadataUnpickler(io.BytesIO(data)).load()
        except Exception as e:
            raise CheckpointError(f"{path}: refused to unpickle: {e}") from e
        if not isinstance(metadata, Metadata):
            raise CheckpointError(f"{path}: holds a {type(metadata).__name__}, not DCP Metadata")
        if metadata.storage_meta is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class _SafeLoadPlanner(DefaultLoadPlanner):
    """DefaultLoadPlanner, except that non-tensor values are read with torch.load(weights_only=True)."""

    def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:
        fqn = read_item.dest_index.fqn
        try:
            obj = torch.load(value, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            raise CheckpointError(f"non-tensor value {fqn!r} refused: {str(e).splitlines()[0]}") from e
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[fqn], obj)
        else:
            self.state_dict[fqn] = obj


def safe_torch_load(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> Any:
    """torch.load limited to tensors and plain containers: a pickle that would build other objects or call
    functions (os.system, ...) is refused with CheckpointError, never executed."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"{path}: refused: it holds more than tensors and plain containers "
                              f"({str(e).splitlines()[0]})") from e
    except (OSError, RuntimeError, EOFError) as e:
        raise CheckpointError(f"{path}: not readable by torch.load: {e}") from e


def _dcp(fn: Callable, *args: Any, **kwargs: Any) -> Any:
    """A DCP call without its warning about having no process group: this module's single-process mode."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        return fn(*args, **kwargs)


def _describe(e: BaseException) -> str:
    """DCP wraps each rank's exception with its traceback; the causes are what a log reader needs."""
    if isinstance(e, CheckpointException):
        return "; ".join(f"rank {r}: {type(x[0]).__name__}: {x[0]}" for r, x in sorted(e.failures.items()))
    return f"{type(e).__name__}: {e}"


# ---------------------------------------------------------------------------------------------------------------
# files: durable writes, manifest

def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_durable(path: Path, text: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _replace_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    _write_durable(tmp, text)
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def _hash_all(paths: list[Path]) -> list[str]:
    """hashlib releases the GIL on large buffers: one thread per file (one file per rank) hashes in parallel."""
    with ThreadPoolExecutor(max_workers=max(1, min(8, len(paths)))) as pool:
        return list(pool.map(_sha256, paths))


def _write_manifest(ckpt: Path, step: int, world_size: int) -> None:
    paths = sorted(p for p in ckpt.iterdir() if p.name != MANIFEST)
    if any(not p.is_file() for p in paths):
        raise CheckpointError(f"{ckpt}: unexpected non-file entries {[p.name for p in paths if not p.is_file()]}")
    files = {p.name: {"bytes": p.stat().st_size, "sha256": h} for p, h in zip(paths, _hash_all(paths))}
    manifest = {"format": FORMAT, "step": step, "world_size": world_size,
                "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "torch_version": torch.__version__, "files": files}
    _write_durable(ckpt / MANIFEST, json.dumps(manifest, indent=1) + "\n")


def verify_checkpoint(ckpt: str | os.PathLike, deep: bool = True) -> dict[str, Any]:
    """The manifest of a complete, unmodified checkpoint directory; CheckpointError saying why not otherwise.
    deep=False checks every file's size but hashes only the small ones (config, metadata): a quick look."""
    ckpt = Path(ckpt)
    if not ckpt.is_dir():
        raise CheckpointError(f"{ckpt}: no such checkpoint directory")
    try:
        manifest = json.loads((ckpt / MANIFEST).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{ckpt}: no {MANIFEST} (an unfinished save, or not a dinospec checkpoint)") from None
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{ckpt}: unreadable {MANIFEST}: {e}") from e
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CheckpointError(f"{ckpt}: {MANIFEST} is not a {FORMAT} manifest")
    match = _STEP_RE.match(ckpt.name)
    if not isinstance(manifest.get("step"), int) or not isinstance(manifest.get("world_size"), int):
        raise CheckpointError(f"{ckpt}: {MANIFEST} has no integer step / world_size")
    if match and int(match.group(1)) != manifest["step"]:
        raise CheckpointError(f"{ckpt}: directory name says step {match.group(1)}, manifest {manifest.get('step')}")
    files = manifest.get("files")
    if not isinstance(files, dict) or METADATA not in files or CONFIG not in files:
        raise CheckpointError(f"{ckpt}: {MANIFEST} lists no {METADATA} / {CONFIG}")
    to_hash: list[tuple[Path, str]] = []
    for name, info in files.items():
        path = ckpt / name
        if Path(name).name != name or not isinstance(info, dict):
            raise CheckpointError(f"{ckpt}: malformed {MANIFEST} entry {name!r}")
        if not path.is_file():
            raise CheckpointError(f"{ckpt}: {name} is missing")
        size = path.stat().st_size
        if size != info.get("bytes"):
            raise CheckpointError(f"{ckpt}: {name} has {size} bytes, {MANIFEST} says {info.get('bytes')} (truncated?)")
        if deep or size <= _ALWAYS_HASH_BYTES:
            to_hash.append((path, str(info.get("sha256"))))
    for (path, expected), actual in zip(to_hash, _hash_all([p for p, _ in to_hash])):
        if actual != expected:
            raise CheckpointError(f"{path}: sha256 differs from {MANIFEST} (corrupt or modified)")
    return manifest


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A step directory as given, or the one that `latest` names in a run directory or its checkpoints/."""
    p = Path(path)
    if (p / MANIFEST).is_file() or (p / METADATA).is_file():
        return p
    for d in (p / CHECKPOINTS, p):
        if (d / LATEST).is_file():
            name = (d / LATEST).read_text(encoding="utf-8").strip()
            if not _STEP_RE.match(name):
                raise CheckpointError(f"{d / LATEST} holds {name[:40]!r}, not step_<N>")
            return d / name
    raise CheckpointError(f"{p}: not a checkpoint directory (no {MANIFEST}), nor a run directory with {LATEST}")



def load_model_state(ckpt_dir: str | Path, prefix: str = "") -> dict[str, torch.Tensor]:
    """Full (unsharded) CPU tensors saved under state["model"] whose keys start with `prefix`, prefix stripped.
    One process, no process group. ckpt_dir: a step directory, or a run directory (its `latest`)."""
    ckpt = resolve_checkpoint(ckpt_dir)
    manifest = verify_checkpoint(ckpt, deep=True)
    sha = manifest["files"][METADATA]["sha256"]
    metadata = _VerifiedReader(ckpt, sha).read_metadata()
    head = f"model.{prefix}"
    wanted = {fqn[len("model."):]: torch.empty(md.size, dtype=md.properties.dtype)
              for fqn, md in metadata.state_dict_metadata.items()
              if fqn.startswith(head) and isinstance(md, TensorStorageMetadata)}
    if not wanted:
        raise CheckpointError(f"{ckpt}: no tensors under {head!r}")
    try:
        _dcp(dcp.load, {"model": wanted}, storage_reader=_VerifiedReader(ckpt, sha), planner=_SafeLoadPlanner(),
             no_dist=True)
    except _FAILURES as e:
        raise CheckpointError(f"{ckpt}: {_describe(e)}") from e
    return {k[len(prefix):]: v for k, v in wanted.items()}
