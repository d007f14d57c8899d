"""Learning diagnostics: is image information reaching the DINO targets? And a collapse detector.

DINO's [CLS] term can sit at ln K from the first step with no error anywhere: when every image's teacher [CLS] is
the same vector (e.g. LayerScale 1e-5 on a shallow ViT, whose residual branches then barely touch the near-zero
[CLS] init), Sinkhorn-Knopp and centering both turn identical rows into exactly uniform targets, the student head
learns an image-independent output and the EMA teacher copies it: a fixed point with zero gradient. These numbers
show that state at a glance, from the teacher's own tensors of the step (no extra forward):

- ``dino_target_entropy``: mean entropy of the teacher's DINO targets, in nats; ln K means uniform (nothing to learn).
- ``teacher_logit_spread``: mean over prototypes of the std across images of the teacher's head logits; 0 means
  every image gets the same logits.
- ``teacher_head_cos`` / ``teacher_cls_cos``: mean pairwise cosine similarity across the images of one global crop
  of the head's outputs and of the backbone's [CLS]; 1 means one vector for all images.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def mean_pairwise_cosine(x: Tensor) -> Tensor:
    """Mean cosine similarity over the distinct pairs of rows of x (N, D); 0-dim, float32."""
    n = x.shape[0]
    if n < 2:
        return x.new_zeros((), dtype=torch.float32)
    z = F.normalize(x.float(), dim=-1)
    total = z.sum(dim=0).pow(2).sum()  # sum over all ordered pairs (i, j), the diagonal included
    diagonal = z.pow(2).sum()
    return (total - diagonal) / (n * (n - 1))


@torch.no_grad()
def dino_diagnostics(teacher_cls: Tensor, teacher_logits: Tensor, targets: Tensor) -> dict[str, Tensor]:
    """The numbers of the module docstring from the teacher's [CLS] (2B, D), head logits (2B, K), targets (2B, K).

    Cosines are taken within the first global crop (B images), so that the two crops of one image do not count as
    a pair. Returns 0-dim tensors (no host sync here; the caller reads them at log steps).
    """
    p = targets.float()
    entropy = -(p * p.clamp_min(1e-30).log()).sum(dim=-1).mean()
    first_crop = slice(0, max(1, teacher_cls.shape[0] // 2))
    logits = teacher_logits.float()
    spread = logits.std(dim=0).mean() if logits.shape[0] > 1 else logits.new_zeros(())
    return {
        "dino_target_entropy": entropy,
        "teacher_logit_spread": spread,
        "teacher_head_cos": mean_pairwise_cosine(teacher_logits[first_crop]),
        "teacher_cls_cos": mean_pairwise_cosine(teacher_cls[first_crop]),
    }


class CollapseDetector:
    """Warns once when the DINO targets have stayed within `tolerance` nats of uniform for `patience` steps.

    Fed at log steps only (it needs host values); a run that recovers (targets away from uniform) resets it.
    """

    def __init__(self, n_prototypes: int, patience_steps: int, tolerance: float = 1e-3):
        self.max_entropy = math.log(n_prototypes)
        self.patience_steps = patience_steps
        self.tolerance = tolerance
        self.uniform_since: int | None = None
        self.warned = False

    def update(self, step: int, target_entropy: float) -> str | None:
        """Record the entropy at `step`; return the warning (once) when the run looks collapsed."""
        if self.max_entropy - target_entropy > self.tolerance:
            self.uniform_since = None
            return None
        if self.uniform_since is None:
            self.uniform_since = step
        if self.warned or self.patience_steps <= 0 or step - self.uniform_since < self.patience_steps:
            return None
        self.warned = True
        return (f"the DINO targets have been uniform (entropy {target_entropy:.4f} vs ln K = {self.max_entropy:.4f}) "
                f"since step {self.uniform_since}: the teacher's [CLS] carries no image information, so the [CLS] "
                f"loss cannot learn. Likely cause: LayerScale or [CLS] init too small for this depth (every image "
                f"gives the same [CLS] at init); knobs: student.layerscale (CaiT: 0.1 up to depth 18), "
                f"teacher.momentum_teacher (lower for runs of a few thousand steps), teacher.warmup_teacher_temp_epochs; "
                f"see README 'Runs that learn at small scale'. Watch teacher_cls_cos (1.0 = one vector for all images).")
