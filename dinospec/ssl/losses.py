"""DINOv2's losses: teacher targets (softmax centering, Sinkhorn-Knopp), DINO [CLS] loss, iBOT patch loss, KoLeo.

Everything that needs the global batch (centre means, Sinkhorn sums, the global KoLeo batch) all-reduces over the
default process group when one is initialised, and runs alone without one. Counts are all-reduced too, so ranks
with different numbers of rows (masked patches) give exactly the result of one process holding all rows.
Teacher-side maths runs in float32 whatever the input dtype; student log-softmaxes too.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from dinospec import dist as checked  # collectives that check their group serves the tensors' device


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _all_reduce(t: Tensor, op: dist.ReduceOp.RedOpType = dist.ReduceOp.SUM) -> Tensor:
    if _distributed():
        checked.all_reduce(t, op=op)
    return t


# ----------------------------------------------------------------------------------------------------------------
# teacher targets


@torch.no_grad()
def softmax_center_teacher(teacher_logits: Tensor, center: Tensor, temp: float) -> Tensor:
    """softmax((logits - center) / temp): (..., K) probabilities, float32."""
    return F.softmax((teacher_logits.float() - center.float()) / temp, dim=-1)


@torch.no_grad()
def update_center(center: Tensor, teacher_logits: Tensor, momentum: float) -> Tensor:
    """EMA of the centre towards the mean teacher logit row over all ranks; updates `center` in place, returns it.

    The mean is sum-over-ranks / count-over-ranks (DINOv2 divides by rows x world size, the same when ranks hold
    equal rows). No rows anywhere (e.g. no masked patch in the whole batch) leaves the centre unchanged.
    """
    rows = teacher_logits.detach().float().reshape(-1, teacher_logits.shape[-1])  # (R, K)
    total = torch.cat([rows.sum(0), rows.new_tensor([rows.shape[0]])])  # K sums + the row count, one all-reduce
    _all_reduce(total)
    count = total[-1]
    batch_mean = (total[:-1] / count.clamp_min(1)).view_as(center).to(center.dtype)
    updated = center * momentum + batch_mean * (1.0 - momentum)
    center.copy_(torch.where(count > 0, updated, center))  # no host sync on the count
    return center


@torch.no_grad()
def sinkhorn_knopp_teacher(teacher_logits: Tensor, temp: float, n_iterations: int = 3) -> Tensor:
    """DINOv2's distributed Sinkhorn-Knopp: (R, K) logits -> (R, K) assignments whose rows each sum to 1.

    Q = exp(logits / temp) over the global batch of B rows is alternately scaled so that every prototype gets mass
    1/K and every row mass 1/B; sums over rows are all-reduced. B is the all-reduced row count. The global maximum is subtracted before exp (it cancels) so no logit scale overflows.
    """
    q = teacher_logits.detach().float()  # (R, K)
    num_rows, k = q.shape
    local_max = q.max() if q.numel() else q.new_tensor(float("-inf"))
    global_max = _all_reduce(local_max.clone(), dist.ReduceOp.MAX)
    b = _all_reduce(torch.as_tensor(num_rows, dtype=torch.float32, device=q.device).clone().reshape(()))
    # a rank without rows still joins every all-reduce below (empty tensors sum to 0), so no rank waits forever
    q = torch.exp((q - global_max) / temp)  # (R, K), a constant factor away from exp(logits / temp)
    tiny = torch.finfo(torch.float32).tiny
    q /= _all_reduce(q.sum()).clamp_min(tiny)
    for _ in range(n_iterations):
        prototype_mass = _all_reduce(q.sum(dim=0, keepdim=True))  # (1, K): each prototype should hold 1/K
        q /= prototype_mass.clamp_min(tiny) * k
        q /= q.sum(dim=1, keepdim=True).clamp_min(tiny) * b  # each row should hold 1/B
    return q * b


def _cross_entropy(teacher_probs: Tensor, student_log_probs: Tensor) -> Tensor:
    """-sum_k t_k log s_k over the last dim."""
    return -(teacher_probs * student_log_probs).sum(dim=-1)


class _CenteredLoss(nn.Module):
    """Shared by the DINO and iBOT losses: student temperature and a checkpointed EMA centre of teacher logits."""

    def __init__(self, out_dim: int, student_temp: float = 0.1, center_momentum: float = 0.9):
        super().__init__()
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.register_buffer("center", torch.zeros(1, out_dim))  # float32 whatever the model's dtype

    def softmax_center_teacher(self, teacher_logits: Tensor, temp: float) -> Tensor:
        return softmax_center_teacher(teacher_logits, self.center, temp)

    def update_center(self, teacher_logits: Tensor) -> None:
        update_center(self.center, teacher_logits, self.center_momentum)

    def sinkhorn_knopp_teacher(self, teacher_logits: Tensor, temp: float, n_iterations: int = 3) -> Tensor:
        return sinkhorn_knopp_teacher(teacher_logits, temp, n_iterations)

    def student_log_probs(self, student_logits: Tensor) -> Tensor:
        return F.log_softmax(student_logits.float() / self.student_temp, dim=-1)


class DINOLoss(_CenteredLoss):
    """Cross-entropy between teacher [CLS] targets and student [CLS] predictions over DINOv2's crop pairs.

    Pairs: each global crop's student against the *other* global crop's teacher (2 pairs), each local crop's student
    against both teacher globals (2L pairs). Each pair's CE is averaged over the batch; the pair losses are
    averaged over the 2 + 2L pairs. (DINOv2 divides by 3 instead of 2 when there are no local crops; here the
    divisor is always the true pair count.) Rows are crop-major: [crop0 of all B samples, crop1 of all B, ...].
    """

    def terms(self, student_global: Tensor, student_local: Tensor | None,
              teacher_probs: Tensor) -> tuple[Tensor, Tensor]:
        """(global-crop term, local-crop term), each already divided by the pair count: they sum to the loss."""
        two_b, k = teacher_probs.shape
        if two_b % 2 or student_global.shape != teacher_probs.shape:
            raise ValueError(f"DINOLoss wants student_global and teacher_probs of equal shape (2B, K), got "
                             f"{tuple(student_global.shape)} and {tuple(teacher_probs.shape)}")
        b = two_b // 2
        t0, t1 = teacher_probs.float().chunk(2)  # (B, K) each
        ce_global = _cross_entropy(torch.cat([t1, t0]), self.student_log_probs(student_global))  # (2B,) crops swapped
        global_sum = ce_global.mean() * 2  # sum over the 2 pairs of the per-pair batch mean
        n_local = 0
        local_sum = ce_global.new_zeros(())
        if student_local is not None and student_local.numel():
            if student_local.dim() != 2 or student_local.shape[1] != k or student_local.shape[0] % b:
                raise ValueError(f"DINOLoss wants student_local of shape (L*B, K) with B={b}, K={k}, "
                                 f"got {tuple(student_local.shape)}")
            n_local = student_local.shape[0] // b
            log_s = self.student_log_probs(student_local).view(n_local, b, k)  # (L, B, K)
            # CE against teacher 0 plus CE against teacher 1 = CE against their sum (linear in the target)
            ce_local = -torch.einsum("lbk,bk->lb", log_s, t0 + t1)  # (L, B)
            local_sum = ce_local.mean(dim=1).sum()
        n_pairs = 2 + 2 * n_local
        return global_sum / n_pairs, local_sum / n_pairs

    def forward(self, student_global: Tensor, student_local: Tensor | None, teacher_probs: Tensor) -> Tensor:
        """student_global (2B, K), student_local (L*B, K) or None, teacher_probs (2B, K) -> scalar."""
        global_term, local_term = self.terms(student_global, student_local, teacher_probs)
        return global_term + local_term


class IBOTPatchLoss(_CenteredLoss):
    """Masked-patch cross-entropy: per image the mean CE over its masked tokens, summed, divided by 2B images.

    Rows of the (M, K) inputs are the masked tokens in ``masks`` row-major order (``tokens.flatten(0, 1)[
    masks.flatten()]``). Images without a masked token contribute 0 but still count in the 2B divisor (DINOv2).
    The centre (softmax centering) is the EMA of the mean over all masked tokens of all ranks (DINOv2 averages
    per-rank means, the same when ranks hold equally many masked tokens).
    """

    def forward(self, student_masked_logits: Tensor, teacher_probs: Tensor, masks: Tensor) -> Tensor:
        """student_masked_logits (M, K), teacher_probs (M, K), masks (2B, N) bool -> scalar."""
        if student_masked_logits.shape != teacher_probs.shape:
            raise ValueError(f"IBOTPatchLoss: student {tuple(student_masked_logits.shape)} and teacher "
                             f"{tuple(teacher_probs.shape)} masked logits differ in shape")
        masks = masks.bool().flatten(1)  # (2B, N)
        per_image = 1.0 / masks.sum(dim=1).clamp_min(1).float()  # (2B,)
        token_weight = per_image.unsqueeze(1).expand_as(masks)[masks]  # (M,) 1 / masked count of its image
        if token_weight.shape[0] != student_masked_logits.shape[0]:
            raise ValueError(f"IBOTPatchLoss: {student_masked_logits.shape[0]} masked-token rows but masks hold "
                             f"{token_weight.shape[0]} masked tokens")
        ce = _cross_entropy(teacher_probs.float(), self.student_log_probs(student_masked_logits))  # (M,)
        return (ce * token_weight).sum() / masks.shape[0]


class _GatherRows(torch.autograd.Function):
    """All ranks' (B, D) rows stacked rank-major; backward sums the gradients all ranks computed for each rank's
    rows and hands every rank its own (what the deprecated torch.distributed.nn.functional.all_gather does, with
    public collectives that every backend, gloo included, supports)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor) -> Tensor:
        ctx.rank, ctx.rows = dist.get_rank(), x.shape[0]
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        checked.all_gather(parts, x)
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        grad = grad.contiguous().clone()  # all_reduce works in place; autograd's buffer stays untouched
        checked.all_reduce(grad)  # tiny (W*B, D): simpler than reduce_scatter, which gloo lacks
        return grad[ctx.rank * ctx.rows : (ctx.rank + 1) * ctx.rows]


class KoLeoLoss(nn.Module):
    """Kozachenko-Leonenko entropy regulariser: -mean_i log(distance of x_i to its nearest neighbour), x L2-normed.

    Guards (DINOv2 issues #314, #492): the distance is clamped at `eps`, so duplicates give a finite loss
    (-log eps) and zero, not infinite, gradient; fewer than 2 rows (no neighbour exists) give 0, still attached to
    the graph so backward and DDP work. Computed in float32 with autocast off.

    scope="rank" (DINOv2): each rank's batch alone. scope="global": the features of all ranks are gathered by an
    autograd-aware all-gather and every rank computes the same loss L over the global batch, so the loss does not
    depend on the number of ranks. Gradient: the gather's backward sums the gradients all W ranks send to a rank's
    rows, so a rank's own features receive W * dL/dx (every rank differentiated the same L); DDP (like FSDP2) then
    averages parameter gradients over the W ranks, which cancels W and gives exactly dL/dtheta of one process
    holding the whole batch. (Without DDP-style averaging, divide by W.)
    Requires the same number of rows on every rank (checked, with a clear error).
    """

    def __init__(self, scope: str = "rank", eps: float = 1e-8):
        super().__init__()
        if scope not in ("rank", "global"):
            raise ValueError(f"KoLeoLoss scope must be 'rank' or 'global', got {scope!r}")
        self.scope = scope
        self.eps = eps

    def _gather(self, x: Tensor) -> Tensor:
        sizes = torch.tensor([x.shape[0], -x.shape[0]], device=x.device)
        checked.all_reduce(sizes, op=dist.ReduceOp.MAX)
        if sizes[0].item() != -sizes[1].item():
            raise ValueError(f"global KoLeo needs equal batch sizes on all ranks, got between "
                             f"{-sizes[1].item()} and {sizes[0].item()}")
        return _GatherRows.apply(x.contiguous())  # (W*B, D), rank-major

    def forward(self, features: Tensor) -> Tensor:
        """features (B, D) -> scalar."""
        with torch.autocast(device_type=features.device.type, enabled=False):
            x = features.float()
            if self.scope == "global" and _distributed():
                x = self._gather(x)
            if x.shape[0] < 2:
                return x.sum() * 0.0
            x = F.normalize(x, dim=-1, eps=self.eps)  # (N, D)
            with torch.no_grad():
                sims = x @ x.t()  # (N, N)
                sims.fill_diagonal_(float("-inf"))
                nearest = sims.argmax(dim=1)  # (N,)
            sq_dist = (x - x[nearest]).pow(2).sum(dim=-1)  # (N,)
            distance = sq_dist.clamp_min(self.eps**2).sqrt()
            return -torch.log(distance).mean()
