"""Backbone sizes, without torch: `dinospec.config.validate` checks a config's arch and depth before any command
imports torch (a refused config costs well under a second). The model itself is dinospec/models/vit.py."""

from __future__ import annotations

from typing import Any, Mapping

# embed_dim, depth, num_heads, ffn_layer: DINOv2's sizes plus two small ones for CPU development and tests
ARCHS: dict[str, dict[str, Any]] = {
    "vit_pico": dict(embed_dim=64, depth=6, num_heads=4, ffn_layer="mlp"),
    "vit_tiny": dict(embed_dim=192, depth=12, num_heads=3, ffn_layer="mlp"),
    "vit_small": dict(embed_dim=384, depth=12, num_heads=6, ffn_layer="mlp"),
    "vit_base": dict(embed_dim=768, depth=12, num_heads=12, ffn_layer="mlp"),
    "vit_large": dict(embed_dim=1024, depth=24, num_heads=16, ffn_layer="mlp"),
    "vit_giant2": dict(embed_dim=1536, depth=40, num_heads=24, ffn_layer="swiglu"),
}


def arch_kwargs(student: Mapping[str, Any]) -> dict[str, Any]:
    """Size of the backbone: the arch preset with any explicit embed_dim/depth/num_heads/ffn_layer on top."""
    if student["arch"] not in ARCHS:
        raise KeyError(f"unknown student.arch {student['arch']!r} (available: {', '.join(ARCHS)})")
    kw = dict(ARCHS[student["arch"]])
    for key in ("embed_dim", "depth", "num_heads", "ffn_layer"):
        if student.get(key) is not None:
            kw[key] = student[key]
    if kw["embed_dim"] % kw["num_heads"]:
        raise ValueError(f"embed_dim {kw['embed_dim']} is not divisible by num_heads {kw['num_heads']}")
    return kw
