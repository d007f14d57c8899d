"""Token-type routing: segment layout, spec parsing, exact vanilla <-> routed conversion, and isolation of groups.

The isolation tests are the heart of it: perturb ONE group's copy of ONE routed layer and watch that layer's output
through a forward hook; exactly that group's tokens may change, every other token must stay bitwise equal, and the
gradient reaching a group's copy must come from that group's tokens alone.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dinospec.config import CONFIG_DIR, load_config
from dinospec.models.routed import Routing, TokenLayout, TokenRouted, route
from dinospec.models.specialize import (
    BLOCK_KINDS,
    SpecError,
    parse_block_range,
    resolve_groups,
    resolve_spec,
    routed_slots,
    routed_to_vanilla,
    vanilla_spec,
    vanilla_to_routed,
)
from dinospec.models.vit import VisionTransformer

SPEC_PRESETS = sorted(p.stem for p in (CONFIG_DIR / "spec").glob("*.yaml"))
GROUPINGS = {
    "cls|reg+patch": [["cls"], ["reg", "patch"]],
    "cls+reg|patch": [["cls", "reg"], ["patch"]],
    "cls|reg|patch": [["cls"], ["reg"], ["patch"]],
    "cls+patch|reg": [["cls", "patch"], ["reg"]],  # a group made of two non-adjacent segments
}
TINY = dict(img_size=32, patch_size=8, embed_dim=32, depth=6, num_heads=4)  # 16 patches


def preset_spec(name: str) -> dict:
    """The `spec` section a run gets from `spec=<name>` (through the real config loader)."""
    return dict(load_config([], [f"spec={name}"]).spec)


def tiny_model(spec: dict | None, num_reg: int = 0, depth: int = TINY["depth"], **kw) -> VisionTransformer:
    resolved = resolve_spec(spec, depth) if spec is not None else None
    args = {**TINY, "depth": depth, **kw}
    torch.manual_seed(0)  # weights independent of test order: the fp32 rounding checked below is then reproducible
    return VisionTransformer(num_register_tokens=num_reg, spec=resolved, **args).eval()


def perturb_(model: nn.Module, seed: int) -> None:
    """Move every parameter away from its init, so norms, LayerScale and tokens all matter."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if name.endswith("gamma"):
                p.copy_(0.5 + 0.3 * noise)  # LayerScale: O(1) instead of 1e-5
            elif ".norm" in name or name.startswith("norm"):
                p.add_(0.3 * noise)
            else:
                p.add_(0.05 * noise)


# ----------------------------------------------------------------------------------------------------------------
# Routing.from_lengths over a TokenLayout (as VisionTransformer.routing)


# expected (start, stop, group) segments for 1 cls, R registers, 4 patches, written out by hand
EXPECTED_SEGMENTS = {
    ("cls|reg+patch", 0): ((0, 1, 0), (1, 5, 1)),
    ("cls|reg+patch", 3): ((0, 1, 0), (1, 8, 1)),
    ("cls+reg|patch", 0): ((0, 1, 0), (1, 5, 1)),
    ("cls+reg|patch", 3): ((0, 4, 0), (4, 8, 1)),
    ("cls|reg|patch", 0): ((0, 1, 0), (1, 5, 2)),
    ("cls|reg|patch", 1): ((0, 1, 0), (1, 2, 1), (2, 6, 2)),
    ("cls|reg|patch", 3): ((0, 1, 0), (1, 4, 1), (4, 8, 2)),
    ("cls+patch|reg", 0): ((0, 5, 0),),
    ("cls+patch|reg", 3): ((0, 1, 0), (1, 4, 1), (4, 8, 0)),
}


@pytest.mark.parametrize("grouping,num_reg", sorted(EXPECTED_SEGMENTS))
def test_routing_segments(grouping, num_reg):
    group_of_type, _ = resolve_groups(GROUPINGS[grouping])
    routing = Routing.from_lengths(group_of_type, TokenLayout(num_reg).lengths(4))
    assert routing.segments == EXPECTED_SEGMENTS[grouping, num_reg]
    # the per-token group index agrees with the token types
    types = ["cls"] + ["reg"] * num_reg + ["patch"] * 4
    expected = [next(i for i, g in enumerate(GROUPINGS[grouping]) if t in g) for t in types]
    assert group_index(routing).tolist() == expected


def group_index(routing: Routing) -> torch.Tensor:
    """(N,) long tensor: the group of every token position."""
    return torch.cat([torch.full((b - a,), g, dtype=torch.long) for a, b, g in routing.segments])


def test_resolve_groups():
    assert resolve_groups([["cls"], ["reg", "patch"]]) == ((0, 1, 1), 2)
    assert resolve_groups([["patch"], ["cls", "reg"]]) == ((1, 1, 0), 2)
    assert resolve_groups([["cls", "reg", "patch"]]) == ((0, 0, 0), 1)
    with pytest.raises(SpecError, match="empty"):
        resolve_groups([["cls"], [], ["reg", "patch"]])
    with pytest.raises(SpecError, match="'clss'"):
        resolve_groups([["clss"], ["reg", "patch"]])
    with pytest.raises(SpecError, match="'cls' is in two groups"):
        resolve_groups([["cls"], ["cls", "reg", "patch"]])
    with pytest.raises(SpecError, match="reg"):
        resolve_groups([["cls"], ["patch"]])


def test_token_routed_needs_two_groups():
    with pytest.raises(ValueError):
        TokenRouted(nn.LayerNorm(4), 1)


# ----------------------------------------------------------------------------------------------------------------
# spec parser


@pytest.mark.parametrize("depth,n", [(12, 4), (24, 8), (40, 13)])
def test_first_third(depth, n):
    assert parse_block_range("first_third", depth) == frozenset(range(n))
    assert parse_block_range("0:1/3", depth) == frozenset(range(n))


def test_block_ranges():
    assert parse_block_range("none", 12) == frozenset()
    assert parse_block_range("all", 12) == frozenset(range(12))
    assert parse_block_range("ALL", 7) == frozenset(range(7))
    assert parse_block_range("first_half", 12) == frozenset(range(6))
    assert parse_block_range("2,5", 12) == frozenset({2, 5})
    assert parse_block_range("4:8", 12) == frozenset(range(4, 8))
    assert parse_block_range(":3", 12) == frozenset(range(3))
    assert parse_block_range("9:", 12) == frozenset(range(9, 12))
    assert parse_block_range("1/2:1/1", 12) == frozenset(range(6, 12))
    assert parse_block_range("0.25:0.5", 12) == frozenset(range(3, 6))
    assert parse_block_range("4:4", 12) == frozenset()
    assert parse_block_range(3, 12) == frozenset({3})


@pytest.mark.parametrize("text,match", [
    ("abc", "bad block range"),
    ("1:x", "bad block range"),
    ("2,x", "bad block range"),
    ("0:1/0", "bad block range"),
    ("0:99", r"outside 0\.\.11"),
    ("12", r"\[12\]"),
    ("-1", r"\[-1\]"),
    ("8:4", "'8:4' is reversed"),  # must not silently route nothing
    ("1/2:1", r"'1/2:1' is reversed \(6:1\)"),  # "1" is block 1, not the whole depth: 6:1 is reversed
])
def test_block_range_errors(text, match):
    with pytest.raises(SpecError, match=match):
        parse_block_range(text, 12)


def test_resolve_spec():
    spec = preset_spec("paper")
    resolved = resolve_spec(spec, 24)
    assert resolved.group_of_type == (0, 1, 1) and resolved.num_groups == 2
    assert resolved.blocks["qkv"] == frozenset(range(8))
    assert resolved.blocks["norm1"] == frozenset(range(24)) and resolved.blocks["mlp"] == frozenset()
    assert resolved.groups_for("qkv", 7) == 2 and resolved.groups_for("qkv", 8) == 1
    assert not resolved.is_vanilla
    with pytest.raises(SpecError, match="spec.qkv"):
        resolve_spec({**spec, "qkv": "0:30"}, 24)
    one_group = resolve_spec({**spec, "groups": [["cls", "reg", "patch"]], "final_norm": True}, 24)
    assert one_group.is_vanilla and one_group.num_groups == 1
    assert resolve_spec(preset_spec("none"), 12).is_vanilla
    assert vanilla_spec().is_vanilla


# ----------------------------------------------------------------------------------------------------------------
# exact conversion vanilla -> routed (and back)


def all_outputs(model: VisionTransformer, x: torch.Tensor, masks: torch.Tensor) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        out = {k: v for k, v in model.forward_features(x).items() if v is not None}
        masked = model.forward_features(x, masks)
        out.update({f"masked_{k}": v for k, v in masked.items() if k != "masks"})
        for i, (p, c) in enumerate(model.get_intermediate_layers(x, n=[1, 3], return_class_token=True)):
            out[f"inter{i}_patch"], out[f"inter{i}_cls"] = p, c
        out["inter_prenorm"] = model.get_intermediate_layers(x, n=2, norm=False)[0]
    return out


# Routing a Linear splits its GEMM into smaller ones whose fp32 rounding differs by an ULP or two (the kernel's
# summation order depends on the row count), so fp32 outputs agree to 1e-6 relative to their largest magnitude
# (a few ULP after 6 blocks), fp64 ones to 1e-12; presets routing only norms / LayerScale must be bitwise equal.
PER_TOKEN_ONLY = {"none", "norm", "norm_ls", "final_norm"}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("num_reg", [0, 3])
@pytest.mark.parametrize("preset", SPEC_PRESETS)
def test_vanilla_to_routed_is_exact(preset, num_reg, dtype):
    spec = preset_spec(preset)
    vanilla = tiny_model(None, num_reg).to(dtype)
    perturb_(vanilla, seed=1)
    routed = tiny_model(spec, num_reg).to(dtype)
    routed.load_state_dict(vanilla_to_routed(vanilla.state_dict(), routed))  # strict: every key mapped
    if preset != "none":
        assert routed_slots(routed), "a specialised preset must give routed slots"
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2), dtype=dtype)
    masks = torch.rand(2, 16, generator=torch.Generator().manual_seed(3)) < 0.4
    ref, got = all_outputs(vanilla, x, masks), all_outputs(routed, x, masks)
    assert ref.keys() == got.keys()
    tol = 1e-6 if dtype == torch.float32 else 1e-12
    for key in ref:
        assert ref[key].shape == got[key].shape, key
        if preset in PER_TOKEN_ONLY:
            assert torch.equal(ref[key], got[key]), key
        elif ref[key].numel():
            scale = max(1.0, ref[key].abs().max().item())
            assert (ref[key] - got[key]).abs().max().item() <= tol * scale, key


def test_routed_to_vanilla_round_trip_and_refusal():
    spec = {**preset_spec("paper"), "mlp": "0:2", "final_norm": True}
    vanilla = tiny_model(None, 2)
    perturb_(vanilla, seed=4)
    routed = tiny_model(spec, 2)
    routed.load_state_dict(vanilla_to_routed(vanilla.state_dict(), routed))
    back = routed_to_vanilla(routed.state_dict(), routed)
    ref = vanilla.state_dict()
    assert back.keys() == ref.keys()
    assert all(torch.equal(back[k], ref[k]) for k in ref)

    with torch.no_grad():
        routed.blocks[1].attn.qkv[1].bias[0] += 1e-3
    with pytest.raises(SpecError, match=r"'blocks\.1\.attn\.qkv'.*'bias'"):
        routed_to_vanilla(routed.state_dict(), routed)
    # a tolerance accepts a difference below it
    assert torch.equal(routed_to_vanilla(routed.state_dict(), routed, atol=1e-2)["blocks.1.attn.qkv.bias"],
                       routed.blocks[1].attn.qkv[0].bias)


def test_vanilla_to_routed_key_errors():
    routed = tiny_model(preset_spec("paper"))
    state = tiny_model(None).state_dict()
    missing = {k: v for k, v in state.items() if k != "blocks.0.norm1.weight"}
    with pytest.raises(SpecError, match="lacks 1 key.*blocks.0.norm1.weight"):
        vanilla_to_routed(missing, routed)
    with pytest.raises(SpecError, match="1 key.*head.weight"):
        vanilla_to_routed({**state, "head.weight": torch.zeros(1)}, routed)


# ----------------------------------------------------------------------------------------------------------------
# routing isolation: one group's copy of one layer touches only that group's tokens

ROUTED_KINDS = (*BLOCK_KINDS, "final_norm")


def layer_of(model: VisionTransformer, kind: str) -> TokenRouted:
    block = model.blocks[1]  # the second block: its input already mixes all tokens
    layer = {"qkv": block.attn.qkv, "proj": block.attn.proj, "final_norm": model.norm}.get(kind)
    layer = layer if layer is not None else getattr(block, kind)
    assert isinstance(layer, TokenRouted), kind
    return layer


def fully_routed(grouping: str, num_reg: int = 2) -> VisionTransformer:
    spec = {"groups": GROUPINGS[grouping], **{k: "all" for k in BLOCK_KINDS}, "final_norm": True}
    model = tiny_model(spec, num_reg, depth=2, img_size=16)  # 1 cls + 2 reg + 4 patches
    perturb_(model, seed=5)
    return model


def capture_output(layer: nn.Module, store: list) -> torch.utils.hooks.RemovableHandle:
    return layer.register_forward_hook(lambda mod, args, out: store.append(out))


@pytest.mark.parametrize("grouping", sorted(GROUPINGS))
@pytest.mark.parametrize("kind", ROUTED_KINDS)
def test_perturbing_one_group_changes_only_its_tokens(kind, grouping):
    model = fully_routed(grouping)
    layer = layer_of(model, kind)
    groups = group_index(model.routing(4))  # (N,)
    x = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(6))
    outs: list = []
    handle = capture_output(layer, outs)
    with torch.no_grad():
        model.forward_features(x)
        for g in range(len(layer)):
            saved = [p.clone() for p in layer[g].parameters()]
            for p in layer[g].parameters():
                p.add_(0.1 * torch.randn(p.shape))
            model.forward_features(x)
            for p, s in zip(layer[g].parameters(), saved):
                p.copy_(s)
    handle.remove()
    ref = outs[0]
    for g, out in enumerate(outs[1:]):
        changed = (out != ref).any(dim=-1)  # (B, N): tokens whose output moved at all
        in_group = (groups == g).expand_as(changed)
        assert changed[in_group].all(), f"group {g}: some of its tokens did not change"
        assert not changed[~in_group].any(), f"group {g}: tokens of other groups changed"
        assert torch.equal(out[~in_group], ref[~in_group])


@pytest.mark.parametrize("grouping", sorted(GROUPINGS))
@pytest.mark.parametrize("kind", ROUTED_KINDS)
def test_gradient_of_a_copy_comes_from_its_tokens_only(kind, grouping):
    model = fully_routed(grouping)
    layer = layer_of(model, kind)
    groups = group_index(model.routing(4))
    outs: list = []
    handle = capture_output(layer, outs)
    model.forward_features(torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(7)))
    handle.remove()
    out = outs[0]  # (B, N, C)
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(8))
    for g in range(len(layer)):
        loss = (out[:, groups == g] * weights[:, groups == g]).sum()
        for h in range(len(layer)):
            grads = torch.autograd.grad(loss, list(layer[h].parameters()), retain_graph=True, allow_unused=True)
            if h == g:
                assert all(gr is not None and gr.abs().sum() > 0 for gr in grads), f"copy {g} got no gradient"
            else:
                assert all(gr is None or not gr.any() for gr in grads), f"copy {h} got gradient from group {g}"


def test_empty_group_copy_gets_no_gradient():
    """Without registers, the register group's copies see no token and receive no gradient."""
    spec = {"groups": GROUPINGS["cls|reg|patch"], **{k: "all" for k in BLOCK_KINDS}, "final_norm": True}
    model = tiny_model(spec, 0, depth=2, img_size=16).train()
    model.forward_features(torch.randn(2, 3, 16, 16))["x_prenorm"].square().sum().backward()
    slots = routed_slots(model)
    assert len(slots) == 2 * len(BLOCK_KINDS) + 1
    for name in slots:
        register_copy = model.get_submodule(name)[1]
        assert all(p.grad is None for p in register_copy.parameters()), name
    assert model.blocks[0].attn.qkv[2].weight.grad.abs().sum() > 0


def test_route_calls_plain_and_routed_layers():
    routing = Routing.from_lengths((0, 1, 1), TokenLayout(0).lengths(3))
    x = torch.randn(2, 4, 6)
    plain = nn.Linear(6, 5)
    routed = TokenRouted(plain, 2)
    assert torch.equal(route(plain, x, routing), plain(x))
    with torch.no_grad():
        routed[1].weight.mul_(2)
    out = route(routed, x, routing)
    assert torch.equal(out[:, :1], routed[0](x[:, :1])) and torch.equal(out[:, 1:], routed[1](x[:, 1:]))


# ----------------------------------------------------------------------------------------------------------------
# the fast paths of TokenRouted (per-token affine, segmented Linear) against the plain definition


def slice_reference(routed: TokenRouted, x: torch.Tensor, routing: Routing) -> torch.Tensor:
    """The definition of routing: each segment through its group's copy, concatenated."""
    return torch.cat([routed[g](x[:, a:b]) for a, b, g in routing.segments], dim=1)


def routed_layer(kind: str, groups: int) -> TokenRouted:
    from dinospec.models.vit import LayerNorm, LayerScale, Mlp

    make = {"layernorm": lambda: LayerNorm(6, eps=1e-6), "layerscale": lambda: LayerScale(6, 0.5),
            "linear": lambda: nn.Linear(6, 5), "linear_nobias": lambda: nn.Linear(6, 5, bias=False),
            "mlp": lambda: Mlp(6, 10)}[kind]
    layer = TokenRouted(make(), groups).double()
    perturb_(layer, seed=11)
    return layer


@pytest.mark.parametrize("kind", ["layernorm", "layerscale", "linear", "linear_nobias", "mlp"])
@pytest.mark.parametrize("grouping", ["cls|reg|patch", "cls+patch|reg"])
def test_fast_paths_match_the_per_segment_definition(kind, grouping):
    group_of_type, num_groups = resolve_groups(GROUPINGS[grouping])
    routing = Routing.from_lengths(group_of_type, TokenLayout(2).lengths(5))  # 1 cls, 2 registers, 5 patches
    layer = routed_layer(kind, num_groups)
    x = torch.randn(3, 8, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(12), requires_grad=True)
    weights = torch.randn(3, 8, 5 if "linear" in kind else 6, dtype=torch.float64)
    params = list(layer.parameters())
    got = layer(x, routing)
    want = slice_reference(layer, x, routing)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    grads_got = torch.autograd.grad((got * weights).sum(), [x, *params], allow_unused=True)
    grads_want = torch.autograd.grad((want * weights).sum(), [x, *params], allow_unused=True)
    for g, w in zip(grads_got, grads_want):
        assert (g is None) == (w is None)
        if g is not None:
            torch.testing.assert_close(g, w, rtol=0, atol=1e-12)


def test_per_token_layernorm_and_segmented_linear_pass_gradcheck():
    routing = Routing.from_lengths((0, 1, 1), TokenLayout(1).lengths(3))
    for kind in ("layernorm", "linear"):
        layer = routed_layer(kind, 2)
        x = torch.randn(2, 5, 6, dtype=torch.float64, requires_grad=True)
        assert torch.autograd.gradcheck(lambda inp, *ps: layer(inp, routing), (x, *layer.parameters()))


def saved_activation_bytes(model: nn.Module, x: torch.Tensor) -> int:
    """Bytes of the distinct storages autograd keeps for backward (parameters excluded)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    kept: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        kept[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model.forward_features(x)
    return sum(n for ptr, n in kept.items() if ptr not in params)


@pytest.mark.parametrize("preset", ["paper", "qkv_all", "norm_ls"])
def test_routing_keeps_no_extra_activation_for_backward(preset):
    """A routed model keeps what the vanilla one keeps, plus one small (N, C) per-token parameter tensor per routed
    norm / LayerScale (no batch dimension): no split copy of any activation."""
    spec = preset_spec(preset)
    x = torch.randn(4, 3, 32, 32)
    vanilla, routed = tiny_model(None, 2).train(), tiny_model(spec, 2).train()
    per_token_slots = [n for n in routed_slots(routed) if not n.endswith(("qkv", "proj", "mlp"))]
    tokens = 1 + 2 + 16
    allowance = len(per_token_slots) * tokens * TINY["embed_dim"] * 4
    extra = saved_activation_bytes(routed, x) - saved_activation_bytes(vanilla, x)
    assert 0 <= extra <= allowance, (extra, allowance)
