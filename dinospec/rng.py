"""Random number generator state as plain tensors, so a resumed run draws the same numbers as an uninterrupted one.

Why tensors only: checkpoints store nothing that has to be unpickled as an object (see dinospec.checkpoint); the
python / numpy generator states are tuples of integers and one optional float, which map exactly onto int64 and
float64 tensors.

RNG state is per rank. The caller stores each rank's dict under a rank-specific key (e.g.
``state["train"][f"rng_rank{rank}"]``, or one replicated (world_size, ...) tensor per entry). When a run resumes on
another number of ranks, a rank without a saved state must not invent one from another rank's: it gets a fresh
deterministic seed instead (``seed_all(base_seed + rank)``, or any function of step and rank), which changes the
random stream but keeps the run reproducible.
"""

from __future__ import annotations

import logging
import random
from typing import Mapping

import numpy as np
import torch

log = logging.getLogger(__name__)

_PYTHON_KEYS = ("python_version", "python_state", "python_has_gauss", "python_gauss")
_NUMPY_KEYS = ("numpy_keys", "numpy_pos", "numpy_has_gauss", "numpy_gauss")
_TORCH_KEYS = ("torch_cpu",)
_CUDA_KEY = "torch_cuda"


def capture_rng() -> dict[str, torch.Tensor]:
    """The state of python `random`, numpy's global generator, torch's CPU generator and, when CUDA is in use, the
    current CUDA device's generator; every value a CPU tensor (no NaN/inf: float slots hold 0.0 when unused)."""
    version, internal, gauss_next = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    if kind != "MT19937":
        raise ValueError(f"numpy global generator {kind!r} is not MT19937: cannot capture it")
    out = {
        "python_version": torch.tensor(version, dtype=torch.int64),
        "python_state": torch.tensor(internal, dtype=torch.int64),  # 624 words + position, all < 2**32
        "python_has_gauss": torch.tensor(gauss_next is not None),
        "python_gauss": torch.tensor(0.0 if gauss_next is None else gauss_next, dtype=torch.float64),
        "numpy_keys": torch.from_numpy(keys.astype(np.int64)),
        "numpy_pos": torch.tensor(int(pos), dtype=torch.int64),
        "numpy_has_gauss": torch.tensor(int(has_gauss), dtype=torch.int64),
        "numpy_gauss": torch.tensor(float(cached), dtype=torch.float64),
        "torch_cpu": torch.get_rng_state(),
    }
    # only an initialised CUDA context: querying it would otherwise create contexts nobody uses
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out[_CUDA_KEY] = torch.cuda.get_rng_state().cpu()
    return out


def restore_rng(state: Mapping[str, torch.Tensor]) -> None:
    """Inverse of capture_rng. A CUDA state saved on a GPU run is skipped (with a warning) on a machine without CUDA."""
    known = set(_PYTHON_KEYS + _NUMPY_KEYS + _TORCH_KEYS + (_CUDA_KEY,))
    missing = [k for k in _PYTHON_KEYS + _NUMPY_KEYS + _TORCH_KEYS if k not in state]
    unknown = sorted(set(state) - known)
    if missing or unknown:
        raise ValueError(f"not an RNG state from capture_rng: missing {missing}, unknown {unknown}")

    gauss = float(state["python_gauss"]) if bool(state["python_has_gauss"]) else None
    internal = tuple(int(v) for v in state["python_state"].tolist())
    random.setstate((int(state["python_version"]), internal, gauss))

    keys = state["numpy_keys"].cpu().numpy().astype(np.uint32)
    np.random.set_state(("MT19937", keys, int(state["numpy_pos"]), int(state["numpy_has_gauss"]),
                         float(state["numpy_gauss"])))

    torch.set_rng_state(state["torch_cpu"].cpu().to(torch.uint8))
    if _CUDA_KEY in state:
        if torch.cuda.is_available():
            torch.cuda.set_rng_state(state[_CUDA_KEY].cpu().to(torch.uint8))
        else:
            log.warning("checkpoint holds a CUDA RNG state but CUDA is not available here: not restored")


def seed_all(seed: int) -> None:
    """Seed python, numpy and torch (CPU and every CUDA device) from one integer: the fresh deterministic start of
    a rank that has no saved state."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
