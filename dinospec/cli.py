"""The `dinospec` command: train | submit | eval | export | analyze | model-info.

    dinospec model-info model=vit_large spec=paper --json
    dinospec train --config configs/demo.yaml train.output_dir=runs/demo
    torchrun --nproc_per_node=8 -m dinospec.cli train --config configs/train/vit_large.yaml spec=paper
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Callable

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


COMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None], str]] = {}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dinospec", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("model-info", help="parameters and FLOPs of a configured backbone vs vanilla")
    _add_config_args(p)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_model_info)

    for name, (help_text, add_args, target) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text)
        add_args(p)
        p.set_defaults(func=_lazy(target))
    return parser


def _lazy(target: str) -> Callable[[argparse.Namespace], int]:
    """Import a subcommand's module only when it runs (keeps `dinospec --help` fast)."""

    def run(args: argparse.Namespace) -> int:
        module, func = target.rsplit(":", 1)
        mod = __import__(module, fromlist=[func])
        return getattr(mod, func)(args)

    return run


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args) or 0
    except ConfigError as e:
        print(f"dinospec: config error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
