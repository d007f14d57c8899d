"""The `dinospec` command: train | submit | eval | export | analyze | model-info.

    dinospec model-info model=vit_large spec=paper --json
    dinospec train --config configs/demo.yaml train.output_dir=runs/demo
    torchrun --nproc_per_node=8 -m dinospec.cli train --config configs/train/vit_large.yaml spec=paper
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import sys

from dinospec.config import ConfigError, load_config


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", action="append", default=[], metavar="FILE",
                   help="YAML config merged over configs/default.yaml (repeatable)")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="presets (model=NAME, spec=NAME) and dotted overrides (optim.base_lr=1e-3)")


def cmd_model_info(args: argparse.Namespace) -> int:
    from dinospec.model_info import format_table, model_info

    cfg = load_config(args.config, args.overrides)
    info = model_info(cfg)
    print(json.dumps(info) if args.json else format_table(info))
    return 0


# subcommand -> (module, help). Each module defines `add_arguments(parser)` and `run(args) -> int`.
COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("dinospec.trainer", "SSL pretraining (one process, torchrun, or SLURM tasks)"),
    "submit": ("dinospec.launch", "submit a training job to SLURM through submitit (requeues itself)"),
    "export": ("dinospec.export", "export a run's teacher backbone as safetensors + config.json"),
    "eval": ("dinospec.eval.cli", "k-NN, linear or segmentation-probe evaluation of a frozen backbone"),
    "analyze": ("dinospec.analysis", "the paper's token-type analyses and PCA pictures of a backbone"),
    "index": ("dinospec.data.index_cmd", "index a directory of tar shards once (start-up then reads the index)"),
}


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The full parser; with `only`, import just that subcommand's module (keeps start-up fast)."""
    parser = argparse.ArgumentParser(prog="dinospec", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("model-info", help="parameters and FLOPs of a configured backbone vs vanilla")
    _add_config_args(p)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_model_info)

    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text)
        if only not in (None, name) or importlib.util.find_spec(module) is None:
            continue
        mod = importlib.import_module(module)
        mod.add_arguments(p)
        p.set_defaults(func=mod.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    only = argv[0] if argv and argv[0] in COMMANDS else None
    parser = build_parser(only)
    args, extra = parser.parse_known_args(argv)
    if extra:  # key=value overrides may also come after options
        if not hasattr(args, "overrides") or any("=" not in e or e.startswith("-") for e in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = [*args.overrides, *extra]
    if not hasattr(args, "func"):
        print(f"dinospec: '{args.command}' is not available in this install", file=sys.stderr)
        return 2
    try:
        return args.func(args) or 0
    except ConfigError as e:
        print(f"dinospec: config error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
