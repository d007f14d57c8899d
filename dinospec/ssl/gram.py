"""Gram anchoring (DINOv3): keep the student's patch-to-patch similarity structure close to a Gram teacher's.

The loss compares Gram matrices (token-by-token dot products) of the student's and a frozen teacher's patch
features: ``mean((S S^T - T T^T)^2)``, per image (``img_level``) or over the whole batch flattened into one set of
tokens. Options, named after DINOv3's config keys (``gram.*``):

- ``normalized``: L2-normalise every token first (cosine similarities; norm floored at 1e-12).
- ``img_level``: one N x N Gram matrix per image; else one (BN x BN) matrix, cross-image similarities included.
- ``remove_neg``: negative similarities set to 0 in both matrices; ``remove_only_teacher_neg``: in the teacher's
  only. At most one of the two.
- ``tokens_used``: all | masked | unmasked: keep only the rows where the token mask is (not) set before the loss;
  the kept rows of all images form one set, so only without ``img_level``.

Computed in float32 whatever the input dtype (Gram entries of bf16 features lose too much); the teacher side is
detached (it is a frozen model's output). Checked against DINOv3's own values in tests/test_gram.py.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

TOKENS_USED = ("all", "masked", "unmasked")


class GramLoss(nn.Module):
    """Mean squared difference of the student's and the teacher's patch Gram matrices."""

    def __init__(self, normalized: bool = True, img_level: bool = False, remove_neg: bool = False,
                 remove_only_teacher_neg: bool = False, tokens_used: str = "all"):
        """Defaults: DINOv3's ssl_default_config (its Gram-anchoring recipes set img_level=True)."""
        super().__init__()
        if remove_neg and remove_only_teacher_neg:
            raise ValueError("gram: remove_neg and remove_only_teacher_neg are exclusive (set at most one)")
        if tokens_used not in TOKENS_USED:
            raise ValueError(f"gram: tokens_used {tokens_used!r} is not one of {TOKENS_USED}")
        if tokens_used != "all" and img_level:
            raise ValueError("gram: tokens_used masked/unmasked pools the kept tokens of all images: needs "
                             "img_level=false")
        self.normalized, self.img_level = normalized, img_level
        self.remove_neg, self.remove_only_teacher_neg = remove_neg, remove_only_teacher_neg
        self.tokens_used = tokens_used

    def extra_repr(self) -> str:
        return (f"normalized={self.normalized}, img_level={self.img_level}, remove_neg={self.remove_neg}, "
                f"remove_only_teacher_neg={self.remove_only_teacher_neg}, tokens_used={self.tokens_used}")

    def forward(self, student: Tensor, teacher: Tensor, token_mask: Tensor | None = None) -> Tensor:
        """student, teacher: (B, N, D) patch features on the same grid; token_mask (B, N) bool, True = masked
        (needed for tokens_used masked/unmasked). Returns a 0-dim float32 loss."""
        if student.shape != teacher.shape:
            raise ValueError(f"gram: student {tuple(student.shape)} and teacher {tuple(teacher.shape)} features "
                             f"differ; resize the teacher's patch grid first (resize_patch_grid)")
        s, t = student.float(), teacher.detach().float()
        if self.tokens_used != "all":
            if token_mask is None:
                raise ValueError(f"gram: tokens_used={self.tokens_used} needs the token mask")
            keep = token_mask if self.tokens_used == "masked" else ~token_mask
            s, t = s[keep], t[keep]  # (M, D)
        elif not self.img_level:
            s, t = s.flatten(0, -2), t.flatten(0, -2)  # (B*N, D): one Gram matrix over the batch
        if self.normalized:
            s, t = F.normalize(s, dim=-1, eps=1e-12), F.normalize(t, dim=-1, eps=1e-12)
        gram_s, gram_t = s @ s.transpose(-1, -2), t @ t.transpose(-1, -2)  # (B, N, N) or (M, M)
        if self.remove_neg or self.remove_only_teacher_neg:
            gram_t = gram_t.clamp(min=0)
        if self.remove_neg:
            gram_s = gram_s.clamp(min=0)
        return F.mse_loss(gram_s, gram_t)


def resize_patch_grid(tokens: Tensor, grid: tuple[int, int], size: tuple[int, int]) -> Tensor:
    """(B, h*w, D) patch tokens on an h x w grid -> (B, H*W, D) on `size` = (H, W), bicubic, no antialiasing,
    align_corners false: how a Gram teacher that saw larger crops is brought onto the student's grid."""
    b, n, d = tokens.shape
    h, w = grid
    if n != h * w:
        raise ValueError(f"{n} tokens are not a {h}x{w} grid")
    if (h, w) == tuple(size):
        return tokens
    x = tokens.transpose(1, 2).reshape(b, d, h, w)  # (B, D, h, w)
    x = F.interpolate(x.float(), size=size, mode="bicubic", align_corners=False, antialias=False).to(tokens.dtype)
    return x.flatten(2).transpose(1, 2)  # (B, H*W, D)
