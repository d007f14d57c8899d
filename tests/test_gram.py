"""Gram anchoring loss: DINOv3's 24 option combinations reproduced from its stored inputs, plus the properties the
training side relies on (teacher gets no gradient, float32 under bf16 inputs, refusals)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from dinospec.ssl.gram import GramLoss, resize_patch_grid

DATA = Path(__file__).resolve().parent / "data" / "dinov3"  # outputs of DINOv3's code; see its README.md


def cases() -> list[dict]:
    return json.loads((DATA / "gram_loss.json").read_text())["results"]


@pytest.fixture(scope="module")
def reference() -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(DATA / "gram_loss.safetensors")


def test_all_24_cases_are_stored():
    keys = {c["key"] for c in cases()}
    assert len(keys) == 24


@pytest.mark.parametrize("case", cases(), ids=lambda c: c["key"])
def test_equals_dinov3(case, reference):
    negatives = {"remove_neg": case["remove_neg"], "remove_only_teacher_neg": case["remove_only_teacher_neg"]}
    loss_fn = GramLoss(normalized=case["apply_norm"], img_level=case["img_level"], tokens_used=case["tokens_used"],
                       **negatives)
    got = loss_fn(reference["student_feats"], reference["teacher_feats"], reference["token_mask"])
    want = reference[case["key"]]
    assert got.dtype == torch.float32 and got.dim() == 0
    assert want.item() == case["loss"]  # the JSON and the tensor file agree
    torch.testing.assert_close(got, want, rtol=2e-6, atol=0)


def test_options_change_the_value(reference):
    """Every option is live on these inputs (a loss that ignored one would still pass a single-case check)."""
    s, t, m = reference["student_feats"], reference["teacher_feats"], reference["token_mask"]
    values = {GramLoss(**kw)(s, t, m).item() for kw in (
        {}, {"normalized": False}, {"img_level": True}, {"remove_neg": True}, {"remove_only_teacher_neg": True},
        {"tokens_used": "masked"}, {"tokens_used": "unmasked"})}
    assert len(values) == 7


def test_teacher_gets_no_gradient_and_bf16_is_computed_in_fp32():
    g = torch.Generator().manual_seed(0)
    s = torch.randn(2, 9, 16, generator=g, requires_grad=True)
    t = torch.randn(2, 9, 16, generator=g, requires_grad=True)
    loss = GramLoss(img_level=True)(s, t)
    loss.backward()
    assert t.grad is None and s.grad is not None and s.grad.abs().sum() > 0
    low = GramLoss(img_level=True)(s.detach().bfloat16(), t.detach().bfloat16())
    assert low.dtype == torch.float32
    assert GramLoss()(s, s.detach()).item() == 0.0  # identical features: no loss


def test_refusals():
    with pytest.raises(ValueError, match="exclusive"):
        GramLoss(remove_neg=True, remove_only_teacher_neg=True)
    with pytest.raises(ValueError, match="img_level=false"):
        GramLoss(img_level=True, tokens_used="masked")
    with pytest.raises(ValueError, match="token mask"):
        GramLoss(tokens_used="masked")(torch.zeros(1, 4, 8), torch.zeros(1, 4, 8))
    with pytest.raises(ValueError, match="resize the teacher"):
        GramLoss()(torch.zeros(1, 4, 8), torch.zeros(1, 16, 8))


def test_resize_patch_grid():
    """A Gram teacher at twice the crop size: its grid brought onto the student's; a linear ramp stays a ramp
    (bicubic reproduces it in the interior), a same-size grid is returned as is."""
    h, w = 8, 12
    ramp = torch.arange(w, dtype=torch.float32).repeat(h, 1)  # value = column
    tokens = torch.stack([ramp, 2 * ramp], dim=-1).reshape(1, h * w, 2)
    small = resize_patch_grid(tokens, (h, w), (4, 6))
    assert small.shape == (1, 24, 2)
    cols = small.reshape(4, 6, 2)[..., 0]
    assert torch.allclose(cols, cols[:1].expand_as(cols))  # each column constant over rows
    torch.testing.assert_close(cols[0, 1:-1], torch.tensor([2.5, 4.5, 6.5, 8.5]), atol=1e-4, rtol=0)
    assert resize_patch_grid(tokens, (h, w), (h, w)) is tokens
