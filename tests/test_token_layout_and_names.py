"""The backbone's token layout (issue #13 item 2) and the one rule for parameter names (item 1)."""

from __future__ import annotations

import torch

from dinospec.models.routed import Routing, TokenLayout
from dinospec.models.vit import VisionTransformer


def test_layout_splits_a_sequence_with_registers_into_cls_registers_patches():
    model = VisionTransformer(img_size=16, patch_size=8, embed_dim=16, depth=1, num_heads=2, num_register_tokens=3)
    assert model.layout == TokenLayout(3) and model.num_prefix_tokens == 4 and model.num_register_tokens == 3
    x = torch.arange(2 * 8 * 5, dtype=torch.float32).reshape(2, 8, 5)  # 1 cls, 3 registers, 4 patches
    cls, registers, patches = model.layout.split(x)
    assert torch.equal(cls, x[:, 0]) and torch.equal(registers, x[:, 1:4]) and torch.equal(patches, x[:, 4:])
    assert model.layout.lengths(4) == (1, 3, 4)
    assert model.routing(4) == Routing(((0, 8, 0),))  # vanilla: one segment over the whole layout
    with torch.no_grad():
        out = model.forward_features(torch.randn(2, 3, 16, 16))
    assert out["x_norm_regtokens"].shape == (2, 3, 16) and out["x_norm_patchtokens"].shape == (2, 4, 16)
