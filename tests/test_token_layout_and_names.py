"""The backbone's token layout (issue #13 item 2) and the one rule for parameter names (item 1)."""

from __future__ import annotations

import torch

from dinospec.models.routed import Routing, TokenLayout
from dinospec.models.specialize import (
    BLOCK_KINDS, FINAL_NORM, SLOT_PATHS, convert_state_dict, param_kind, plain_key, resolve_spec, routed_slots,
    split_routed_key, vanilla_spec,
)
from dinospec.models.vit import VisionTransformer

ALL_ROUTED = {"groups": [["cls"], ["reg"], ["patch"]], **{kind: "all" for kind in BLOCK_KINDS}, "final_norm": True}


def tiny(spec=None, num_reg: int = 2) -> VisionTransformer:
    torch.manual_seed(0)
    return VisionTransformer(img_size=16, patch_size=8, embed_dim=16, depth=2, num_heads=2, mlp_ratio=2.0,
                             num_register_tokens=num_reg, spec=resolve_spec(spec, 2) if spec else vanilla_spec())


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


def test_slot_paths_name_the_models_routed_slots():
    assert set(routed_slots(tiny(ALL_ROUTED))) == {f"blocks.{i}.{SLOT_PATHS[k]}" for i in range(2) for k in BLOCK_KINDS} \
        | {FINAL_NORM}


def test_routed_key_rule_round_trip():
    routed, vanilla = tiny(ALL_ROUTED).state_dict(), tiny().state_dict()
    slots = routed_slots(tiny(ALL_ROUTED))
    for key in routed:
        split = split_routed_key(key)
        assert (split is not None) == any(key.startswith(slot + ".") for slot in slots), key
        if split:
            slot, group, rest = split
            assert slot in slots and 0 <= group < 3 and f"{slot}.{group}.{rest}" == key
    assert {plain_key(k) for k in routed} == set(vanilla)
    assert all(split_routed_key(k) is None and plain_key(k) == k for k in vanilla)
    assert split_routed_key("blocks.3.mlp.0.fc1.bias") == ("blocks.3.mlp", 0, "fc1.bias")


def test_param_kind_names_every_backbone_parameter():
    kinds = {param_kind(name) for name in tiny(ALL_ROUTED).state_dict()}
    assert kinds == {*BLOCK_KINDS, "final_norm", "tokens", "patch_embed"}
    assert param_kind("blocks.1.attn.qkv.2.weight") == "qkv" and param_kind("norm.0.bias") == "final_norm"


def test_convert_state_dict_vanilla_to_routed_and_back_and_same_spec():
    vanilla, routed = tiny().state_dict(), tiny(ALL_ROUTED).state_dict()
    up, missing, extra = convert_state_dict(vanilla, routed)
    assert not missing and not extra and up.keys() == routed.keys()
    assert all(up[k] is vanilla[plain_key(k)] for k in up)  # renamed, not copied
    down, missing, extra = convert_state_dict(up, vanilla)
    assert not missing and not extra and all(torch.equal(down[k], vanilla[k]) for k in vanilla)
    same, _, _ = convert_state_dict(routed, routed, (0, 1, 2), (0, 1, 2))
    assert all(same[k] is routed[k] for k in routed)
