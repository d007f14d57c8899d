"""A run's state as DCP `Stateful` objects: what dinospec.checkpoint.Checkpointer saves under "model", "optim" and
"train", sharded or not, and loads back so that a resumed run continues the same run."""

from __future__ import annotations

import json
import logging
from typing import Any

import torch
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_optimizer_state_dict,
                                                     set_model_state_dict, set_optimizer_state_dict)
from torch.distributed.checkpoint.stateful import Stateful

from dinospec import dist
from dinospec.data.broken import BrokenFiles
from dinospec.rng import capture_rng, restore_rng, seed_all

log = logging.getLogger("dinospec")


class ModelState(Stateful):
    """Student, teacher and loss centres as DCP state: full FQNs, sharded or not. Keys under the model's
    `unsaved_prefixes` (a distillation teacher, read again from its source) are left out, and only they may be
    missing when loading."""

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.unsaved = tuple(getattr(model, "unsaved_prefixes", ()))

    def state_dict(self) -> dict[str, Any]:
        state = get_model_state_dict(self.model)
        return {k: v for k, v in state.items() if not k.startswith(self.unsaved)} if self.unsaved else state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not self.unsaved:
            set_model_state_dict(self.model, state_dict, options=StateDictOptions(strict=True))
            return
        result = set_model_state_dict(self.model, state_dict, options=StateDictOptions(strict=False))
        wrong = [k for k in result.missing_keys if not k.startswith(self.unsaved)] + list(result.unexpected_keys)
        if wrong:
            raise RuntimeError(f"checkpoint and model differ in {len(wrong)} key(s), e.g. {sorted(wrong)[:4]}")


class OptimState(Stateful):
    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer):
        self.model, self.optimizer = model, optimizer

    def state_dict(self) -> dict[str, Any]:
        fresh = not self.optimizer.state  # no step taken yet (every step so far skipped as non-finite)
        state = get_optimizer_state_dict(self.model, self.optimizer)
        if fresh:  # torch made that state with a zero-lr step that counts: save, and keep, "no step taken"
            self.optimizer.state.clear()
            for per_param in state["state"].values():
                if "step" in per_param:
                    per_param["step"] = torch.zeros_like(per_param["step"])
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        set_optimizer_state_dict(self.model, self.optimizer, state_dict)


class Progress(Stateful):
    """Step, skip count, the run's broken files (the record its loader reports into: each counts once over resumes
    too; older checkpoints load with an empty one) and every rank's RNG: what makes a resumed run continue the same
    run (the data position follows from `step`: the loader is rebuilt there)."""

    def __init__(self, device: torch.device):
        self.step = 0
        self.nonfinite_skips = 0
        self.broken = BrokenFiles()
        self.device = device

    def state_dict(self) -> dict[str, Any]:
        self.broken.sync()  # every rank's reports merged: the same record on every rank
        out: dict[str, Any] = {"step": torch.tensor(self.step), "nonfinite_skips": torch.tensor(self.nonfinite_skips),
                               "world_size": torch.tensor(dist.world_size()),
                               "broken_files": json.dumps(self.broken.known, sort_keys=True)}
        for key, value in capture_rng().items():  # every rank's state in one replicated (W, ...) tensor
            # CPU: the default group serves it through gloo beside NCCL on GPU
            out[f"rng.{key}"] = dist.gather_stacked(value.cpu())
        return out

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.step = int(state_dict["step"])
        self.nonfinite_skips = int(state_dict["nonfinite_skips"])
        self.broken.known = json.loads(state_dict["broken_files"])
        if int(state_dict["world_size"]) == dist.world_size():
            # clone: torch.set_rng_state segfaults on a view at a non-zero storage offset (rank >= 1's row)
            restore_rng({k[4:]: v[dist.rank()].clone() for k, v in state_dict.items() if k.startswith("rng.")})
        else:  # another number of ranks: a fresh, deterministic stream per rank (data order does not depend on it)
            log.warning("resuming on %d ranks from a %d-rank checkpoint: RNG streams reseeded",
                        dist.world_size(), int(state_dict["world_size"]))
            seed_all(1_000_003 * self.step + dist.rank())
