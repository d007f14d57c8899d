"""Losses and head against slow, obviously-correct reference formulas, plus 2-rank gloo equivalence checks."""

from __future__ import annotations

import math
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from dinospec.models.heads import DINOHead
from dinospec.ssl.losses import (
    DINOLoss,
    IBOTPatchLoss,
    KoLeoLoss,
    sinkhorn_knopp_teacher,
    softmax_center_teacher,
    update_center,
)

# ---------------------------------------------------------------------------------------------------------------
# reference formulas: loops over rows, pairs, images and tokens, in float64


def ref_log_softmax(v: torch.Tensor) -> torch.Tensor:
    v = v.double()
    return v - torch.log(torch.exp(v - v.max()).sum()) - v.max()


def ref_cross_entropy(t: torch.Tensor, s_logits: torch.Tensor, temp: float) -> float:
    logp = ref_log_softmax(s_logits / temp)
    return -sum(float(t[k]) * float(logp[k]) for k in range(t.shape[0]))


def ref_softmax_center(logits: torch.Tensor, center: torch.Tensor, temp: float) -> torch.Tensor:
    out = torch.empty(logits.shape, dtype=torch.float64)
    for i in range(logits.shape[0]):
        e = torch.exp((logits[i].double() - center[0].double()) / temp)
        out[i] = e / e.sum()
    return out


def ref_center_update(center: torch.Tensor, logits: torch.Tensor, momentum: float) -> torch.Tensor:
    mean = sum(logits[i].double() for i in range(logits.shape[0])) / logits.shape[0]
    return momentum * center.double() + (1 - momentum) * mean


def ref_sinkhorn(logits: torch.Tensor, temp: float, n_iterations: int) -> torch.Tensor:
    """Q (K x B) scaled row by row (prototypes: 1/K each) then column by column (samples: 1/B each)."""
    b, k = logits.shape
    q = torch.exp(logits.double() / temp).t().clone()  # (K, B)
    q /= q.sum()
    for _ in range(n_iterations):
        for p in range(k):
            q[p] = q[p] / q[p].sum() / k
        for s in range(b):
            q[:, s] = q[:, s] / q[:, s].sum() / b
    return (q * b).t()


def ref_dino_loss(s_global, s_local, t_probs, temp: float) -> float:
    b = t_probs.shape[0] // 2
    teachers = [t_probs[:b], t_probs[b:]]
    globals_ = [s_global[:b], s_global[b:]]
    locals_ = [] if s_local is None else list(s_local.split(b))
    pairs = [(globals_[0], teachers[1]), (globals_[1], teachers[0])]
    pairs += [(s, t) for s in locals_ for t in teachers]
    total = 0.0
    for s, t in pairs:
        total += sum(ref_cross_entropy(t[i], s[i], temp) for i in range(b)) / b
    return total / len(pairs)


def ref_ibot_loss(s_masked, t_masked, masks, temp: float) -> float:
    row, total = 0, 0.0
    for i in range(masks.shape[0]):
        per_image = []
        for n in range(masks.shape[1]):
            if masks[i, n]:
                per_image.append(ref_cross_entropy(t_masked[row], s_masked[row], temp))
                row += 1
        if per_image:
            total += sum(per_image) / len(per_image)
    assert row == s_masked.shape[0]
    return total / masks.shape[0]


def ref_koleo(features: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    x = [f / f.norm().clamp_min(eps) for f in features.double()]
    terms = []
    for i in range(len(x)):
        nearest = min(torch.sqrt(((x[i] - x[j]) ** 2).sum()) for j in range(len(x)) if j != i)
        terms.append(-torch.log(nearest.clamp_min(eps)))
    return torch.stack(terms).mean()


# ---------------------------------------------------------------------------------------------------------------
# head


def test_dino_head_matches_weight_norm_with_unit_gain():
    torch.manual_seed(0)
    head = DINOHead(16, 40, hidden_dim=24, bottleneck_dim=8, nlayers=3)
    names = {n for n, _ in head.named_parameters()}
    assert names == {"mlp.0.weight", "mlp.0.bias", "mlp.2.weight", "mlp.2.bias", "mlp.4.weight", "mlp.4.bias",
                     "last_layer.weight"}
    assert all(not head.mlp[i].bias.detach().any() for i in (0, 2, 4))

    # DINOv2's form: weight_norm(Linear) with g = 1, v = our weight
    reference = torch.nn.utils.parametrizations.weight_norm(nn.Linear(8, 40, bias=False))
    with torch.no_grad():
        reference.parametrizations.weight.original0.fill_(1.0)
        reference.parametrizations.weight.original1.copy_(head.last_layer.weight)
    x = torch.randn(5, 16)
    bottleneck = F.normalize(head.mlp(x), dim=-1)
    out, expected = head(x), reference(bottleneck)
    torch.testing.assert_close(out, expected)
    assert float(out.detach().abs().max()) <= 1 + 1e-6  # cosine logits

    upstream = torch.randn_like(out)
    (out * upstream).sum().backward()
    (expected * upstream).sum().backward()
    torch.testing.assert_close(head.last_layer.weight.grad, reference.parametrizations.weight.original1.grad)

    tokens = torch.randn(3, 7, 16)  # (B, N, D) works row-wise
    torch.testing.assert_close(head(tokens), head(tokens.flatten(0, 1)).view(3, 7, 40))
    assert tuple(DINOHead(16, 10, nlayers=1)(x).shape) == (5, 10)


# ---------------------------------------------------------------------------------------------------------------
# teacher targets


def test_softmax_centering_and_center_update_match_reference():
    torch.manual_seed(1)
    logits, center = torch.randn(9, 11) * 3, torch.randn(1, 11)
    probs = softmax_center_teacher(logits, center, temp=0.07)
    torch.testing.assert_close(probs.double(), ref_softmax_center(logits, center, 0.07))

    expected = ref_center_update(center, logits, 0.9)
    returned = update_center(center, logits, momentum=0.9)
    assert returned is center  # in place: the module buffer keeps its identity
    torch.testing.assert_close(center.double(), expected)

    before = center.clone()
    update_center(center, logits[:0], momentum=0.9)  # no rows: unchanged, no NaN
    assert torch.equal(center, before)

    loss = DINOLoss(11)
    loss.update_center(logits)
    torch.testing.assert_close(loss.center.double(), ref_center_update(torch.zeros(1, 11), logits, 0.9))
    assert "center" in loss.state_dict() and "center" in IBOTPatchLoss(11).state_dict()


def test_sinkhorn_matches_reference_and_marginals():
    torch.manual_seed(2)
    logits = torch.randn(12, 7)
    q = sinkhorn_knopp_teacher(logits, temp=0.1, n_iterations=3)
    torch.testing.assert_close(q.double(), ref_sinkhorn(logits, 0.1, 3), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(q.sum(dim=1), torch.ones(12))  # every sample's assignment sums to 1

    converged = sinkhorn_knopp_teacher(logits, temp=0.1, n_iterations=300)
    torch.testing.assert_close(converged.sum(dim=0), torch.full((7,), 12 / 7), rtol=1e-4, atol=1e-4)  # equipartition
    torch.testing.assert_close(converged.sum(dim=1), torch.ones(12))

    big = sinkhorn_knopp_teacher(logits * 1e4, temp=0.04)  # exp overflow is avoided by the max shift
    assert torch.isfinite(big).all()
    assert sinkhorn_knopp_teacher(logits[:0], temp=0.1).shape == (0, 7)


# ---------------------------------------------------------------------------------------------------------------
# losses


@pytest.mark.parametrize("n_local", [0, 3])
def test_dino_loss_matches_reference_pairs(n_local):
    torch.manual_seed(3)
    b, k = 4, 13
    s_global = torch.randn(2 * b, k, requires_grad=True)
    s_local = torch.randn(n_local * b, k) if n_local else None
    t_probs = torch.softmax(torch.randn(2 * b, k) / 0.05, dim=-1)
    loss_fn = DINOLoss(k, student_temp=0.1)
    loss = loss_fn(s_global, s_local, t_probs)
    assert math.isclose(float(loss.detach()), ref_dino_loss(s_global.detach(), s_local, t_probs, 0.1), rel_tol=1e-5)
    global_term, local_term = loss_fn.terms(s_global, s_local, t_probs)
    torch.testing.assert_close(global_term + local_term, loss)
    loss.backward()
    assert torch.isfinite(s_global.grad).all()
    with pytest.raises(ValueError, match="L\\*B"):
        loss_fn(s_global, torch.randn(b + 1, k), t_probs)


def test_ibot_loss_matches_reference_per_image_mean():
    torch.manual_seed(4)
    k, n = 9, 6
    masks = torch.rand(6, n) < 0.4
    masks[1] = False  # an image without masks contributes 0 but still counts
    masks[2, :] = True
    m = int(masks.sum())
    s, t = torch.randn(m, k), torch.softmax(torch.randn(m, k) / 0.07, dim=-1)
    loss = IBOTPatchLoss(k, student_temp=0.1)(s, t, masks)
    assert math.isclose(float(loss), ref_ibot_loss(s, t, masks, 0.1), rel_tol=1e-5)
    with pytest.raises(ValueError, match="masked tokens"):
        IBOTPatchLoss(k)(s[1:], t[1:], masks)
    empty = IBOTPatchLoss(k)(torch.randn(0, k, requires_grad=True), torch.zeros(0, k), torch.zeros(2, n, dtype=bool))
    assert float(empty.detach()) == 0.0


def test_koleo_matches_reference_and_guards():
    torch.manual_seed(5)
    x = torch.randn(10, 6, requires_grad=True)
    loss = KoLeoLoss()(x)
    xr = x.detach().clone().requires_grad_(True)
    expected = ref_koleo(xr)
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-6)
    loss.backward()
    expected.backward()
    torch.testing.assert_close(x.grad, xr.grad, rtol=1e-4, atol=1e-6)

    dup = torch.randn(4, 6)
    dup = torch.cat([dup, dup[:2]]).requires_grad_(True)  # exact duplicates
    loss = KoLeoLoss()(dup)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(dup.grad).all()
    torch.testing.assert_close(loss.double(), ref_koleo(dup.detach()), rtol=1e-5, atol=1e-5)

    one = torch.randn(1, 6, requires_grad=True)  # no neighbour: 0, still differentiable
    loss = KoLeoLoss()(one)
    loss.backward()
    assert float(loss.detach()) == 0.0 and torch.equal(one.grad, torch.zeros_like(one))

    half = torch.randn(8, 6).to(torch.bfloat16)
    assert KoLeoLoss()(half).dtype == torch.float32
    with pytest.raises(ValueError, match="scope"):
        KoLeoLoss(scope="world")


# ---------------------------------------------------------------------------------------------------------------
# two gloo ranks against one process


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _two_rank_worker(rank: int, world: int, port: int, out_dir: str, data: dict) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        b, res = data["b"], {}
        mine = slice(rank * b, (rank + 1) * b)
        res["sinkhorn"] = sinkhorn_knopp_teacher(data["logits"][mine], 0.07, 3)
        uneven = data["uneven_split"][rank]  # ranks with different row counts (masked patches)
        res["sinkhorn_uneven"] = sinkhorn_knopp_teacher(data["logits"][uneven], 0.07, 3)
        res["sinkhorn_empty_rank"] = sinkhorn_knopp_teacher(data["logits"][mine if rank == 0 else slice(0, 0)],
                                                            0.07, 3)
        center = data["center"].clone()
        update_center(center, data["logits"][mine], 0.9)
        res["center"] = center
        center = data["center"].clone()
        update_center(center, data["logits"][uneven], 0.9)
        res["center_uneven"] = center

        # global KoLeo through a DDP-wrapped model: DDP averages the gradients over the 2 ranks
        model = nn.Linear(5, 4)
        model.load_state_dict(data["model"])
        ddp = nn.parallel.DistributedDataParallel(model)
        loss = KoLeoLoss(scope="global")(ddp(data["inputs"][mine]))
        loss.backward()
        res["koleo_loss"], res["koleo_grads"] = loss.detach(), [p.grad.clone() for p in model.parameters()]
        feats = data["features"][mine].clone().requires_grad_(True)
        KoLeoLoss(scope="global")(feats).backward()
        res["koleo_feature_grad"] = feats.grad
        torch.save(res, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_two_gloo_ranks_equal_one_process(tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    torch.manual_seed(6)
    b, k = 5, 11
    model = nn.Linear(5, 4)
    data = {
        "b": b, "logits": torch.randn(2 * b, k) * 2, "center": torch.randn(1, k),
        "uneven_split": [slice(0, 7), slice(7, 10)], "model": model.state_dict(),
        "inputs": torch.randn(2 * b, 5), "features": torch.randn(2 * b, 4),
    }
    mp.spawn(_two_rank_worker, args=(2, _free_port(), str(tmp_path), data), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]

    logits = data["logits"]
    full = sinkhorn_knopp_teacher(logits, 0.07, 3)
    torch.testing.assert_close(torch.cat([r["sinkhorn"] for r in ranks]), full)
    torch.testing.assert_close(torch.cat([r["sinkhorn_uneven"] for r in ranks]), full)
    torch.testing.assert_close(ranks[0]["sinkhorn_empty_rank"], sinkhorn_knopp_teacher(logits[:b], 0.07, 3))
    assert ranks[1]["sinkhorn_empty_rank"].shape == (0, k)

    expected_center = update_center(data["center"].clone(), logits, 0.9)
    for r in ranks:
        torch.testing.assert_close(r["center"], expected_center)
        torch.testing.assert_close(r["center_uneven"], expected_center)

    loss = KoLeoLoss()(model(data["inputs"]))  # one process, 2b samples
    loss.backward()
    for r in ranks:
        torch.testing.assert_close(r["koleo_loss"], loss.detach())
        for got, want in zip(r["koleo_grads"], [p.grad for p in model.parameters()]):
            torch.testing.assert_close(got, want)
    feats = data["features"].clone().requires_grad_(True)
    KoLeoLoss()(feats).backward()
    # before DDP's average, each rank's own rows carry world_size x the one-process gradient
    torch.testing.assert_close(torch.cat([r["koleo_feature_grad"] for r in ranks]), 2 * feats.grad)
