"""`dinospec export`: the command line of dinospec/export.py. Torch-free until `run`, so `--help` and argument
errors answer at once.

    dinospec export runs/demo --out exports/demo                      # teacher of the latest checkpoint
    dinospec export runs/demo --step 2000 --which student --out exports/demo_student
    dinospec export runs/distill --student 1 --out exports/distill_s1  # a distillation run's first extra student
    dinospec export runs/demo --out exports/demo_timm --format timm   # vanilla spec only: timm loads it
    dinospec export dinov2_vitb14_reg4_pretrain.pth --out exports/vitb_paper spec=paper   # weights file + spec
    dinospec export dinov3_vits16.pth --out exports/v3s --img-size 224 # DINOv3 format (RoPE) too
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Mapping


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", metavar="SOURCE",
                   help="run directory (holds checkpoints/), or weights: a DINOv2 / DINOv3 .pth / .safetensors file "
                        "or a dinospec export dir")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="for weights: spec=NAME, spec.KEY=..., student.KEY=... (convert the spec, change settings)")
    p.add_argument("--out", required=True, help="export directory to write")
    p.add_argument("--img-size", type=int, help="for weights: image size of the export (default: the weights' "
                                                 "position grid; RoPE: 224); a learned pos_embed is resized to it")
    p.add_argument("--step", type=int, help="checkpoint step (default: the latest)")
    p.add_argument("--format", choices=("dinospec", "timm"), default="dinospec",
                   help="dinospec (any spec; dinospec.load_backbone) or timm (vanilla spec only)")
    p.add_argument("--which", choices=("teacher", "student"), default="teacher",
                   help="which backbone (DINOv2 evaluates the teacher)")
    p.add_argument("--student", type=int, default=0,
                   help="a distillation run's student: 0 the main one (default), k the k-th of distill.students")
    p.add_argument("--force", action="store_true", help="overwrite an existing export in --out")


def run(args: argparse.Namespace) -> int:
    from dinospec.config import ConfigError
    from dinospec.export import ExportError, export_run, export_weights, usage
    from dinospec.weights import CONFIG_FILE, WeightsError

    try:
        if (Path(args.run_dir) / "checkpoints").is_dir():
            if args.overrides or args.img_size:
                raise ExportError("spec / student overrides and --img-size apply to weights: export the run first, "
                                  "then export that export dir with them")
            out = export_run(args.run_dir, args.out, args.step, args.which, args.format, args.force, args.student)
        else:
            if args.step is not None or args.student:
                raise ExportError(f"--step and --student apply to run directories; {args.run_dir} is not one")
            out = export_weights(args.run_dir, args.out, args.overrides, args.format, args.force, args.img_size)
    except (ExportError, WeightsError, ConfigError) as e:
        print(f"dinospec export: {e}", file=sys.stderr)
        return 2
    config = json.loads((out / CONFIG_FILE).read_text())
    src = config["source"]
    spec = "vanilla" if _is_vanilla(config) else "specialised"
    if "weights" in src:
        st = config["student"]
        print(f"exported {src['weights']} ({src['family']} weights) as a {spec} backbone (embed_dim {st['embed_dim']}, "
              f"depth {st['depth']}, patch {st['patch_size']}, {st['num_register_tokens']} registers, "
              f"{st.get('pos_embed', 'learned')} positions; {config['format']} format) to {out}\n")
    else:
        which = f"{src['which']} (student {src['student']})" if src.get("student") else src["which"]
        print(f"exported the {which} backbone of {src['run_dir']} at step {src['step']} "
              f"({config['student']['arch']}, {config['format']} format) to {out}\n")
    print(usage(out, config), end="")
    return 0


def _is_vanilla(config: Mapping[str, Any]) -> bool:
    from dinospec.models.spec_ranges import resolve_spec

    return resolve_spec(config["spec"], config["student"]["depth"]).is_vanilla
