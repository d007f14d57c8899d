"""RoPE vs learned pos_embed: backbone forward + backward time on CPU (fp32), vanilla and routed (`paper`).

Reuses scripts/bench_backbone.py's interleaved timing (rotating order, one warm-up step each, medians and minima
of wall-clock and process CPU time); only the models differ: dinospec's ViT with `pos_embed=learned` (DINOv2) or
`pos_embed=rope` (DINOv3: rotary positions of the patch tokens inside attention, computed once per forward),
with the vanilla spec or the paper's. Timing only (no memory runs).

    .venv/bin/python scripts/bench_rope.py --archs vit_small --patch 16 --batch 32 --reps 7
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_backbone as bb  # noqa: E402

CONFIGS = ("learned", "rope", "routed_learned", "routed_rope")


def build(config: str, arch: str, patch: int, img: int, drop_path: float = 0.0):
    from dinospec.config import load_config
    from dinospec.models.specialize import resolve_spec
    from dinospec.models.vit import ARCHS, VisionTransformer

    if config not in CONFIGS:
        raise ValueError(f"unknown config {config!r} (one of {CONFIGS})")
    size = ARCHS[arch]
    spec = resolve_spec(load_config([], ["spec=paper"]).spec, size["depth"]) if config.startswith("routed") else None
    model = VisionTransformer(img_size=img, patch_size=patch, layerscale=1e-5, drop_path_rate=drop_path, spec=spec,
                              pos_embed="rope" if config.endswith("rope") else "learned", **size)
    return model, bb.dict_loss


if __name__ == "__main__":
    bb.build = build
    bb.RATIOS = [("rope", "learned", 1.02), ("routed_rope", "routed_learned", 1.02),
                 ("routed_rope", "learned", 1.02)]
    if "--configs" not in sys.argv:
        sys.argv += ["--configs", ",".join(CONFIGS)]
    if "--mem-reps" not in sys.argv:
        sys.argv += ["--mem-reps", "0"]
    sys.exit(bb.main())
