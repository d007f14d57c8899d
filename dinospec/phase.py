"""A new training phase that starts from another run's checkpoint (`train.init_from`): DINOv3's high-resolution
adaptation, or any continuation whose crops, schedules or losses differ from the run it continues.

Unlike a resume, the new phase is a new run: its own directory, step 0, fresh optimizer and schedules. Unlike
`student.pretrained_weights` (a backbone only, heads fresh), it carries everything the model holds: student and EMA
teacher, both backbones and heads, and the loss centres, so the DINO / iBOT targets go on where the run stopped. A
learned pos_embed is resized to the new global crop size the way the model resizes it at runtime; with RoPE nothing
depends on the crop size. The model itself (architecture, spec, heads) must be the same.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from dinospec.config import ConfigError, flat_keys

log = logging.getLogger("dinospec")

# student keys a new phase may change: they do not change the parameters (regularisation, runtime, init source)
PHASE_FREE_STUDENT_KEYS = ("drop_path_rate", "drop_path_mode", "attn_backend", "pretrained_weights",
                           "rope_shift_coords", "rope_jitter_coords", "rope_rescale_coords")
MODEL_PREFIXES = ("student.", "spec.", "dino.head_", "ibot.head_", "ibot.separate_head")


def check_same_model(source_yaml: str, cfg: DictConfig, source: str) -> None:
    """ConfigError naming the keys when the source run's model (architecture, spec, heads) differs from cfg's."""
    old = flat_keys(OmegaConf.to_container(OmegaConf.create(source_yaml)))
    new = flat_keys(OmegaConf.to_container(cfg))
    free = tuple(f"student.{k}" for k in PHASE_FREE_STUDENT_KEYS)
    bad = sorted(k for k in set(old) | set(new) if k.startswith(MODEL_PREFIXES) and not k.startswith(free)
                 and old.get(k) != new.get(k))
    if bad:
        detail = ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in bad[:6])
        raise ConfigError(f"train.init_from {source}: its model differs ({detail}); a new phase continues the same "
                          f"model (for other weights use student.pretrained_weights)")


def init_from_run(meta: Any, cfg: DictConfig, path: str | Path) -> Path:
    """Load student, teacher, heads and loss centres of the checkpoint at `path` (a step directory, or a run
    directory: its latest) into the unwrapped SSLMetaArch `meta`; return the checkpoint directory used."""
    from dinospec.checkpoint import load_model_state, resolve_checkpoint
    from dinospec.weights import resize_pos_embed

    ckpt = resolve_checkpoint(path)
    check_same_model((ckpt / "config.yaml").read_text(), cfg, str(path))
    state = load_model_state(ckpt)
    for name, part in (("student", meta.student), ("teacher", meta.teacher)):
        pos = state.get(f"{name}.backbone.pos_embed")
        if pos is not None and pos.shape != part.backbone.pos_embed.shape:  # learned, another crop size
            state[f"{name}.backbone.pos_embed"] = resize_pos_embed(pos, part.backbone)
    meta.load_state_dict(state, strict=True)
    log.info("new phase initialised from %s (student, teacher, heads, loss centres)", ckpt)
    return ckpt
