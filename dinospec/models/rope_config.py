"""RoPE settings without torch: the config keys (student.rope_*) and their checks, so `dinospec.config.validate`
refuses a bad setting before any command imports torch. The rotation itself is dinospec/models/rope.py."""

from __future__ import annotations

from typing import Any, Mapping

NORMALIZE_COORDS = ("separate", "max", "min")
ROPE_KEYS = ("base", "min_period", "max_period", "normalize_coords", "shift_coords", "jitter_coords",
             "rescale_coords")
"""RopePositions' settings; the config keys are student.rope_<name>."""


def rope_settings(student: Mapping[str, Any]) -> dict[str, Any]:
    """RopePositions kwargs from a `student` section (student.rope_base, ...); absent keys keep the defaults."""
    return {k: student[f"rope_{k}"] for k in ROPE_KEYS if f"rope_{k}" in student}


def check_rope_settings(head_dim: int, base: float | None = 100.0, min_period: float | None = None,
                        max_period: float | None = None, normalize_coords: str = "separate",
                        shift_coords: float | None = None, jitter_coords: float | None = None,
                        rescale_coords: float | None = None) -> None:
    """Raise ValueError naming the setting that cannot work."""
    if head_dim % 4:
        raise ValueError(f"RoPE needs a head dim (embed_dim / num_heads) divisible by 4, got {head_dim}")
    if (min_period is None) != (max_period is None):
        raise ValueError("RoPE: give both min_period and max_period, or neither (then the base is used)")
    if min_period is not None:
        if not 0 < min_period < max_period:
            raise ValueError(f"RoPE: need 0 < min_period < max_period, got {min_period}, {max_period}")
    elif base is None or base <= 0:
        raise ValueError(f"RoPE: base must be > 0, got {base}")
    if normalize_coords not in NORMALIZE_COORDS:
        raise ValueError(f"rope normalize_coords {normalize_coords!r} is not one of {NORMALIZE_COORDS}")
    for name, value, low in (("shift_coords", shift_coords, 0.0), ("jitter_coords", jitter_coords, 1.0),
                             ("rescale_coords", rescale_coords, 1.0)):
        if value is not None and value < low:
            raise ValueError(f"rope {name} must be >= {low} (or null), got {value}")
