"""The `dinospec` command: train | submit | eval | export | analyze | model-info.

    dinospec model-info model=vit_large spec=paper --json
    dinospec train --config configs/demo.yaml train.output_dir=runs/demo
    torchrun --nproc_per_node=8 -m dinospec.cli train model=vit_large spec=paper
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import logging
import os
import sys
from pathlib import Path

from dinospec.config import ConfigError, load_config

# user-caused failures found after the config checks (a data folder without images, a disk that fills up): one
# line and this exit status, no traceback (DINOSPEC_DEBUG=1 shows it)
EXIT_USER_ERROR = 1
EXIT_PREEMPTED = 75  # EX_TEMPFAIL: saved on a signal, run me again to resume (train, and a submitted job's rank 0)
USER_ERRORS = (FileNotFoundError, PermissionError, NotADirectoryError, IsADirectoryError)


def add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", action="append", default=[], metavar="FILE",
                   help="YAML config merged over configs/default.yaml (repeatable)")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="presets (model=NAME, spec=NAME) and dotted overrides (optim.base_lr=1e-3)")


def cmd_model_info(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)  # before torch is imported: a bad config is refused at once
    from dinospec.model_info import format_table, model_info

    info = model_info(cfg)
    print(json.dumps(info) if args.json else format_table(info))
    return 0


def _add_train_args(p: argparse.ArgumentParser) -> None:
    add_config_args(p)
    group = p.add_mutually_exclusive_group()
    group.add_argument("--resume", metavar="PATH", help="resume from this checkpoint directory")
    group.add_argument("--no-resume", action="store_true",
                       help="never resume (refuses a run directory that already has checkpoints)")


def cmd_train(args: argparse.Namespace) -> int:
    """Config and paths are checked before torch is imported (a refusal takes well under a second)."""
    from dinospec.preflight import check_run_paths

    cfg = load_config(args.config, args.overrides)
    resume = args.resume or ("never" if args.no_resume else "auto")
    check_run_paths(cfg, resume)
    logging.basicConfig(level=os.environ.get("DINOSPEC_LOG", "INFO"), format="%(asctime)s %(levelname)s %(message)s")
    from dinospec import dist
    from dinospec.trainer import train

    # several SLURM tasks started by srun without a MASTER_PORT: rank 0 publishes a free port in the run dir
    job = "_".join(os.environ.get(k, "0") for k in ("SLURM_JOB_ID", "SLURM_STEP_ID", "SLURM_RESTART_COUNT"))
    from dinospec.checkpoint import CheckpointError

    try:
        dist.init_distributed(cfg.compute.device, rendezvous_file=Path(cfg.train.output_dir) / f".rendezvous_{job}")
        outcome = train(cfg, resume=resume)
    except CheckpointError as e:  # a save that failed (a full disk) or a checkpoint that cannot be loaded
        if os.environ.get("DINOSPEC_DEBUG"):
            raise
        print(f"dinospec: error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    finally:
        dist.shutdown()
    return EXIT_PREEMPTED if outcome.status == "preempted" else 0


# subcommand -> (module, help). Each module defines `add_arguments(parser)` and `run(args) -> int`; modules are
# imported only for their own subcommand, and must read and check their config before importing torch.
COMMANDS: dict[str, tuple[str, str]] = {
    "submit": ("dinospec.launch", "submit a training job to SLURM through submitit (requeues itself)"),
    "export": ("dinospec.export_cmd", "export a run's teacher backbone as safetensors + config.json"),
    "eval": ("dinospec.eval.cli", "k-NN, linear or segmentation-probe evaluation of a frozen backbone"),
    "analyze": ("dinospec.analysis", "the paper's token-type analyses and PCA pictures of a backbone"),
    "index": ("dinospec.data.index_cmd", "index a directory of tar shards once (start-up then reads the index)"),
}


BUILTIN = ("model-info", "train")  # defined in this module: their config is read before anything heavy is imported


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The full parser; with `only`, import just that subcommand's module (keeps start-up fast)."""
    parser = argparse.ArgumentParser(prog="dinospec", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("model-info", help="parameters and FLOPs of a configured backbone vs vanilla")
    add_config_args(p)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_model_info)

    p = sub.add_parser("train", help="SSL pretraining (one process, torchrun, or SLURM tasks)")
    _add_train_args(p)
    p.set_defaults(func=cmd_train)

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
    only = argv[0] if argv and argv[0] in (*COMMANDS, *BUILTIN) else None
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
    except USER_ERRORS as e:
        if os.environ.get("DINOSPEC_DEBUG"):
            raise
        print(f"dinospec: error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR


if __name__ == "__main__":
    sys.exit(main())
