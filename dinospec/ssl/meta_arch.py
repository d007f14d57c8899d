"""Student and EMA teacher around one backbone config, and the DINOv2 loss assembly (DINO + iBOT + KoLeo).

The student is one module whose single forward runs every crop through backbone and heads: DDP and FSDP2 then see
one forward and one backward per step. The teacher is a frozen copy updated by EMA; it sees the global crops only,
without drop-path, and gives the targets (centred by an EMA centre or by Sinkhorn-Knopp).
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor, nn

from dinospec.models.heads import DINOHead
from dinospec.models.vit import VisionTransformer, build_backbone
from dinospec.ssl.diagnostics import dino_diagnostics
from dinospec.ssl.gram_teacher import GramAnchor
from dinospec.ssl.losses import DINOLoss, IBOTPatchLoss, KoLeoLoss


def _heads(cfg: Any, dim: int) -> dict[str, nn.Module]:
    d, i = cfg.dino, cfg.ibot
    heads = {"dino_head": DINOHead(dim, d.head_n_prototypes, d.head_hidden_dim, d.head_bottleneck_dim,
                                   d.head_nlayers)}
    if i.separate_head:
        heads["ibot_head"] = DINOHead(dim, i.head_n_prototypes, i.head_hidden_dim, i.head_bottleneck_dim,
                                      i.head_nlayers)
    return heads


class Student(nn.Module):
    """Backbone + heads; forward(global crops, local crops, masks) gives everything the losses need."""

    def __init__(self, backbone: VisionTransformer, heads: dict[str, nn.Module]):
        super().__init__()
        self.backbone = backbone
        self.dino_head = heads["dino_head"]
        self.ibot_head = heads.get("ibot_head")

    def forward(self, global_crops: Tensor, local_crops: Tensor | None, masks: Tensor,
                mask_inputs: bool = True) -> dict[str, Tensor]:
        """mask_inputs=False (the teacher): the crops go in unmasked; logits are still taken at the masked tokens."""
        g = self.backbone.forward_features(global_crops, masks if mask_inputs else None)
        cls_g = g["x_norm_clstoken"]  # (2B, D)
        patches = g["x_norm_patchtokens"].flatten(0, 1)  # (2B*N, D)
        masked = patches[masks.flatten()]  # (M, D) student tokens at masked positions
        cls_l = self.backbone.forward_features(local_crops)["x_norm_clstoken"] if local_crops is not None else None
        n_g, n_l = cls_g.shape[0], 0 if cls_l is None else cls_l.shape[0]
        if self.ibot_head is None:  # shared head: one call over all tokens
            tokens = torch.cat([cls_g] + ([cls_l] if cls_l is not None else []) + [masked])
            logits = self.dino_head(tokens)
            dino_g, dino_l, ibot = logits[:n_g], logits[n_g : n_g + n_l], logits[n_g + n_l :]
        else:
            dino = self.dino_head(torch.cat([cls_g, cls_l]) if cls_l is not None else cls_g)
            dino_g, dino_l, ibot = dino[:n_g], dino[n_g:], self.ibot_head(masked)
        return {"cls": cls_g, "dino_global": dino_g, "dino_local": dino_l if n_l else None, "ibot": ibot,
                "patch": g["x_norm_patchtokens"]}  # (2B, N, D): the Gram loss's student features

    def clip_parts(self) -> list[nn.Module]:
        """The parts whose gradients are clipped each on its own (backbone, heads), as DINOv2."""
        return [m for m in (self.backbone, self.dino_head, self.ibot_head) if m is not None]

    def members(self) -> list["Student"]:
        """The students this module trains (one here; several in a distillation run)."""
        return [self]


def build_teacher_backbone(cfg: Any, student: Any = None, spec: Any = None) -> nn.Module:
    """The teacher's backbone: the student's architecture at the global crop size, never dropping paths
    (student / spec: another student's sections than the run's main `student` / `spec`)."""
    student = cfg.student if student is None else student
    return build_backbone({**student, "drop_path_rate": 0.0}, cfg.spec if spec is None else spec,
                          img_size=cfg.crops.global_crops_size)


def build_student_pair(cfg: Any, student: Any = None, spec: Any = None) -> tuple[Student, Student]:
    """A student (backbone + heads) and its EMA teacher's module, randomly initialised (the teacher's weights are
    then copied from the student); student / spec: as build_teacher_backbone."""
    student_backbone = build_backbone(cfg.student if student is None else student,
                                      cfg.spec if spec is None else spec, img_size=cfg.crops.global_crops_size)
    teacher_backbone = build_teacher_backbone(cfg, student, spec)
    dim = student_backbone.embed_dim
    return Student(student_backbone, _heads(cfg, dim)), Student(teacher_backbone, _heads(cfg, dim))


class SSLMetaArch(nn.Module):
    """Holds student, teacher and the loss modules (whose centres are buffers, so they are checkpointed)."""

    unsaved_prefixes: tuple[str, ...] = ()
    """State keys a checkpoint leaves out (they are rebuilt from elsewhere when the run resumes)."""

    def __init__(self, cfg: Any):
        super().__init__()
        self.cfg = cfg
        self.student, self.teacher = self.build_students(cfg)
        self.teacher.load_state_dict(self.student.state_dict())
        self.teacher.requires_grad_(False)
        t = cfg.teacher
        self.dino_loss = DINOLoss(cfg.dino.head_n_prototypes, student_temp=t.student_temp,
                                  center_momentum=t.center_momentum)
        ibot_k = cfg.ibot.head_n_prototypes if cfg.ibot.separate_head else cfg.dino.head_n_prototypes
        self.ibot_loss = IBOTPatchLoss(ibot_k, student_temp=t.student_temp,
                                       center_momentum=t.center_momentum)
        self.koleo_loss = KoLeoLoss(scope=cfg.dino.koleo_scope)

    def check_loaded(self) -> None:
        """After a checkpoint is loaded: ConfigError if what it was trained against has changed (a plain run has
        nothing outside its checkpoint; a distillation run checks its teacher)."""

    @staticmethod
    def build_students(cfg: Any) -> tuple[Student, Student]:
        """The trainable student module and its EMA teacher's (whose weights are overwritten by the student's)."""
        return build_student_pair(cfg)

    @torch.no_grad()
    def teacher_targets(self, global_crops: Tensor, masks: Tensor,
                        temp: float) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        """Teacher probabilities for the DINO ([CLS]) and iBOT (masked patches) losses, and the teacher's outputs."""
        # through the module's own forward, so FSDP2 gathers the teacher's parameters as it does the student's
        out = self.teacher(global_crops, None, masks, mask_inputs=False)
        return (*self.targets_from_logits(out, temp), out)

    @torch.no_grad()
    def targets_from_logits(self, out: dict[str, Tensor], temp: float) -> tuple[Tensor, Tensor]:
        """DINO and iBOT target probabilities from a teacher's outputs, centred as teacher.centering says (a
        softmax centre is updated here, after use)."""
        cls_logits, patch_logits = out["dino_global"], out["ibot"]
        if self.cfg.teacher.centering == "sinkhorn_knopp":
            n_iter = self.cfg.teacher.sinkhorn_iterations
            return (self.dino_loss.sinkhorn_knopp_teacher(cls_logits, temp, n_iter),
                    self.ibot_loss.sinkhorn_knopp_teacher(patch_logits, temp, n_iter))
        dino_probs = self.dino_loss.softmax_center_teacher(cls_logits, temp)
        ibot_probs = self.ibot_loss.softmax_center_teacher(patch_logits, temp)
        self.dino_loss.update_center(cls_logits)
        self.ibot_loss.update_center(patch_logits)
        return dino_probs, ibot_probs

    def losses(self, batch: dict[str, Any], teacher_temp: float,
               student_forward: Callable[..., Any] | None = None,
               gram: GramAnchor | None = None, diagnostics: bool = True) -> dict[str, Tensor]:
        """All loss terms, their weighted total and (diagnostics=True, as at the trainer's log steps: they are read
        only there) the learning diagnostics (dinospec.ssl.diagnostics) for one batch (student_forward: the
        DDP-wrapped student; gram: the run's Gram anchor, whose term counts once its teacher has been taken). Only
        "loss" carries gradient."""
        cfg = self.cfg
        masks = batch["masks"]
        dino_t, ibot_t, teacher_out = self.teacher_targets(batch["global_crops"], masks, teacher_temp)
        outs = (student_forward or self.student)(batch["global_crops"], batch.get("local_crops"), masks)
        outs = outs if isinstance(outs, list) else [outs]  # a distillation run's module holds several students
        total, terms = None, {}
        for k, out in enumerate(outs):  # the main student's terms unsuffixed, student k's with _s<k>
            part, named = self.student_terms(out, dino_t, ibot_t, masks, suffix=f"_s{k}" if k else "")
            total, terms = part if total is None else total + part, {**terms, **named}
        if gram is not None and gram.active:
            terms["gram_loss"] = gram.loss(outs[0]["patch"], batch["global_crops"], masks)
            total = total + cfg.gram.loss_weight * terms["gram_loss"]
        if diagnostics:
            terms.update(dino_diagnostics(teacher_out["cls"], teacher_out["dino_global"], dino_t))
        return {"loss": total, **terms}

    def student_terms(self, out: dict[str, Tensor], dino_t: Tensor, ibot_t: Tensor, masks: Tensor,
                      suffix: str = "") -> tuple[Tensor, dict[str, Tensor]]:
        """One student's weighted DINO + iBOT + KoLeo total and its terms (named with `suffix`) against targets."""
        cfg = self.cfg
        terms = {"dino_loss": self.dino_loss(out["dino_global"], out["dino_local"], dino_t)}
        if cfg.ibot.loss_weight > 0:
            terms["ibot_loss"] = self.ibot_loss(out["ibot"], ibot_t, masks)
        if cfg.dino.koleo_loss_weight > 0:
            terms["koleo_loss"] = sum(self.koleo_loss(c) for c in out["cls"].chunk(2))
        total = cfg.dino.loss_weight * terms["dino_loss"]
        total = total + cfg.ibot.loss_weight * terms.get("ibot_loss", 0.0)
        total = total + cfg.dino.koleo_loss_weight * terms.get("koleo_loss", 0.0)
        return total, {k + suffix: v for k, v in terms.items()}

    @torch.no_grad()
    def update_teacher(self, momentum: float) -> None:
        """teacher <- momentum * teacher + (1 - momentum) * student, on local shards when sharded."""
        for part in (self.teacher, self.student):  # FSDP2 keeps a root unsharded after forward: shard it back
            if hasattr(part, "reshard"):
                part.reshard()
        t = [p for p in self.teacher.parameters()]
        s = [p.detach() for p in self.student.parameters()]
        torch._foreach_lerp_(t, s, 1.0 - momentum)
