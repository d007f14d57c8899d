"""Distillation (DINOv3): a frozen teacher backbone teaches one or several students with the DINO / iBOT objectives.

`DistillMetaArch` is an `SSLMetaArch` whose targets come from a frozen teacher instead of the EMA teacher:

* The frozen teacher (`distill.teacher`) is a backbone with DINO / iBOT heads, loaded from a dinospec run (its EMA
  teacher, trained heads and loss centres), a dinospec export dir, or DINOv2 / DINOv3 weights, with the source's
  own settings. An export or weights file has no heads: they are then frozen at a random init drawn from
  `train.seed`, so the targets are a sharpened random projection of the teacher's features (its [CLS] for DINO,
  its patch tokens for iBOT). That transfers what the features separate, not the clusters a trained head found; a
  run directory as the source gives the trained heads (the students' prototype counts must then be the teacher's).
  The teacher is never updated, runs without gradient in eval mode (no drop-path, no RoPE coordinate
  augmentation), replicated on every rank, once per step on the unmasked global crops.
* Its outputs are centred exactly as a normal run centres its EMA teacher's (`SSLMetaArch.targets_from_logits`:
  Sinkhorn-Knopp or the softmax centre, whose buffers are checkpointed).
* The students (the main `student` / `spec`, plus `distill.students`) are one module, `MultiStudent`: one forward
  runs each on the same crops and masks, so DDP / FSDP2 see one forward and one backward. Each student's DINO
  (global + local [CLS]), iBOT (masked patches) and KoLeo terms are summed; students share no parameter, so one
  optimizer and one backward give each the gradients of its own loss. Their gradients are clipped part by part.
* `.teacher` is the EMA of the students, updated as in any run: what `dinospec export` exports (`--student K`
  for an extra student) and what the periodic k-NN evaluates.

Checkpoints leave the frozen teacher out (its weights can be read again from the source; a distillation teacher
is typically much larger than the students) and keep a fingerprint of it: a resume whose source now holds other
weights is refused.
"""

from __future__ import annotations

import hashlib
import logging
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from dinospec.ssl.meta_arch import SSLMetaArch, Student, _heads, build_student_pair

log = logging.getLogger("dinospec")


def member_prefix(k: int) -> str:
    """Where student k's modules sit inside a run's `student` / `teacher` module: '' for the main one (the keys of
    a plain run), 'extra.<k-1>.' for distill.students[k-1]."""
    return "" if k == 0 else f"extra.{k - 1}."


class MultiStudent(Student):
    """Several students as one module: the main one at the top level (its keys are a plain run's), the others in
    `extra`. forward returns one output dict per student."""

    def __init__(self, students: list[Student]):
        main = students[0]
        heads = {"dino_head": main.dino_head, **({"ibot_head": main.ibot_head} if main.ibot_head is not None else {})}
        super().__init__(main.backbone, heads)
        self.extra = nn.ModuleList(students[1:])

    def forward(self, global_crops: Tensor, local_crops: Tensor | None, masks: Tensor,  # type: ignore[override]
                mask_inputs: bool = True) -> list[dict[str, Tensor]]:
        return [super().forward(global_crops, local_crops, masks, mask_inputs),
                *(s(global_crops, local_crops, masks, mask_inputs) for s in self.extra)]

    def members(self) -> list[Student]:
        """Each student as a plain Student (the main one as a view sharing this module's parameters)."""
        heads = {"dino_head": self.dino_head, **({"ibot_head": self.ibot_head} if self.ibot_head is not None else {})}
        return [Student(self.backbone, heads), *self.extra]

    def clip_parts(self) -> list[nn.Module]:
        return [part for member in self.members() for part in member.clip_parts()]


class FrozenTeacher(Student):
    """The distillation teacher: backbone and heads without gradient, always in eval mode."""

    def __init__(self, backbone: nn.Module, heads: dict[str, nn.Module]):
        super().__init__(backbone, heads)
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> "FrozenTeacher":
        return super().train(False)


def fingerprint(module: nn.Module, samples: int = 4096) -> Tensor:
    """SHA-256 (as 32 uint8) of every tensor's name, shape, dtype and up to `samples` evenly spaced values: cheap
    for any teacher size, and any other weights differ in it."""
    digest = hashlib.sha256()
    for name, t in module.state_dict().items():
        flat = t.detach().to("cpu").reshape(-1)
        picked = flat[:: max(1, flat.numel() // samples)].contiguous()
        digest.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        digest.update(picked.view(torch.uint8).numpy().tobytes())
    return torch.frombuffer(bytearray(digest.digest()), dtype=torch.uint8)


def _source_checkpoint(path: Path) -> Path | None:
    """The checkpoint directory when `path` is a dinospec run or step directory, else None (a run directory
    without a usable checkpoint raises CheckpointError)."""
    from dinospec.checkpoint import CheckpointError, resolve_checkpoint

    if not path.is_dir() or (path / "config.json").is_file():
        return None
    try:
        return resolve_checkpoint(path)
    except CheckpointError:
        if (path / "checkpoints").is_dir():
            raise
        return None


def _heads_from(state: dict[str, Tensor], src_cfg: Any, dim: int) -> dict[str, nn.Module]:
    """The source run's EMA-teacher heads, loaded from its checkpointed state (keys below `teacher.`)."""
    with torch.device("meta"):
        heads = _heads(src_cfg, dim)
    for name, head in heads.items():
        head.load_state_dict({k[len(name) + 1:]: v for k, v in state.items() if k.startswith(name + ".")},
                             strict=True, assign=True)
    return heads


def load_frozen_teacher(cfg: Any) -> tuple[FrozenTeacher, dict[str, Tensor], str]:
    """(frozen teacher, loss centres to start from ({} unless the source is a run), a one-line description) for the
    run config `cfg`. Draws nothing from the run's random stream."""
    from dinospec.checkpoint import CheckpointError, load_model_state
    from dinospec.config import ConfigError
    from dinospec.export import ExportError, backbone_from_state, backbone_from_weights, step_config
    from dinospec.weights import WeightsError

    path = Path(cfg.distill.teacher)
    try:
        ckpt = _source_checkpoint(path)
        if ckpt is not None:
            src = step_config(ckpt)
            state = load_model_state(ckpt, prefix="teacher.")  # the source's EMA teacher: backbone and heads
            state = {k: v for k, v in state.items() if not k.startswith("extra.")}
            backbone = backbone_from_state({k[9:]: v for k, v in state.items() if k.startswith("backbone.")},
                                           {**src.student, "drop_path_rate": 0.0}, src.spec,
                                           src.crops.global_crops_size, str(ckpt))
            heads = _heads_from(state, src, backbone.embed_dim)
            centres = {}
            if cfg.teacher.centering == "centering":  # the source's centres of this very teacher's logits
                centres = {k: v for k, v in load_model_state(ckpt).items() if k.endswith("_loss.center")}
            what = f"the EMA teacher of {ckpt} with its heads"
        else:
            backbone, _, family = backbone_from_weights(path)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(cfg.train.seed)
                heads = _heads(cfg, backbone.embed_dim)
            centres, what = {}, f"{path} ({family} weights; heads frozen at a random init, seed {cfg.train.seed})"
    except (ExportError, WeightsError, CheckpointError) as e:
        raise ConfigError(f"distill.teacher = {str(path)!r}: {e}") from None
    teacher = FrozenTeacher(backbone, heads)
    _check_fits(teacher, cfg)
    return teacher, centres, what


def _check_fits(teacher: FrozenTeacher, cfg: Any) -> None:
    """The students must predict the teacher's prototypes on the teacher's patch grid."""
    from dinospec.config import ConfigError

    if teacher.backbone.patch_size != cfg.student.patch_size:
        raise ConfigError(f"distill.teacher has patch size {teacher.backbone.patch_size} but student.patch_size = "
                          f"{cfg.student.patch_size}: the iBOT targets need one patch grid (set "
                          f"student.patch_size={teacher.backbone.patch_size})")
    dino_k = teacher.dino_head.last_layer.out_features
    ibot_k = (teacher.ibot_head or teacher.dino_head).last_layer.out_features
    want_ibot = cfg.ibot.head_n_prototypes if cfg.ibot.separate_head else cfg.dino.head_n_prototypes
    if dino_k != cfg.dino.head_n_prototypes or ibot_k != want_ibot:
        ibot_key = "ibot.head_n_prototypes" if cfg.ibot.separate_head else "dino.head_n_prototypes"
        raise ConfigError(f"distill.teacher's heads have {dino_k} DINO / {ibot_k} iBOT prototypes but the students "
                          f"{cfg.dino.head_n_prototypes} / {want_ibot}: set dino.head_n_prototypes={dino_k}"
                          f"{f' and {ibot_key}={ibot_k}' if ibot_k != dino_k or cfg.ibot.separate_head else ''}")


class DistillMetaArch(SSLMetaArch):
    """SSLMetaArch with several students and a frozen teacher giving the targets (see the module docstring)."""

    unsaved_prefixes = ("distill_teacher.",)

    def __init__(self, cfg: Any):
        super().__init__(cfg)
        teacher, centres, self.teacher_source = load_frozen_teacher(cfg)
        self.distill_teacher = teacher
        for name, value in centres.items():
            self.get_buffer(name).copy_(value)
        self.register_buffer("distill_fingerprint", fingerprint(teacher))
        self._source_fingerprint = self.distill_fingerprint.clone()
        self.autocast_dtype: torch.dtype | None = None
        """Set by the trainer when nothing else casts the teacher's forward (FSDP2 casts only the students)."""

    @staticmethod
    def build_students(cfg: Any) -> tuple[Student, Student]:
        from dinospec.config import distill_members

        pairs = [build_student_pair(cfg, student, spec) for student, spec in distill_members(cfg)]
        return MultiStudent([s for s, _ in pairs]), MultiStudent([t for _, t in pairs])

    def check_loaded(self) -> None:
        """After loading a checkpoint: ConfigError when distill.teacher now holds other weights than the run's."""
        from dinospec.config import ConfigError

        if not torch.equal(self.distill_fingerprint.cpu(), self._source_fingerprint):
            raise ConfigError(f"distill.teacher = {self.cfg.distill.teacher!r} holds other weights than the teacher "
                              f"this run was distilled from (fingerprints differ): point it at that teacher")

    @torch.no_grad()
    def teacher_targets(self, global_crops: Tensor, masks: Tensor,
                        temp: float) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        """The frozen teacher's DINO and iBOT targets on the unmasked global crops, and its outputs."""
        cast = torch.autocast(global_crops.device.type, dtype=self.autocast_dtype) \
            if self.autocast_dtype is not None else nullcontext()
        with cast:
            out = self.distill_teacher(global_crops, None, masks, mask_inputs=False)
        return (*self.targets_from_logits(out, temp), out)
