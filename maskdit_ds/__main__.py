"""Command line: `python -m maskdit_ds train --config <preset|yaml> [section.key=value ...] [--dry-run]`."""
from __future__ import annotations

import argparse
import os
import sys

from .errors import (EXIT_CONFIG, EXIT_DIVERGED, EXIT_STORAGE, ConfigError, RunDirBusy, StorageError,
                     TrainingError)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m maskdit_ds", description=__doc__)
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed launcher
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="train (or resume) a run")
    train.add_argument("--config", required=True, help="preset name (see maskdit_ds/configs) or a YAML file")
    train.add_argument("--dry-run", action="store_true", help="validate, print config, ds_config, params, FLOPs")
    train.add_argument("--world-size", type=int, default=None, help="with --dry-run: the world size to check")
    train.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed launcher
    train.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.micro_batch=32")
    return parser


def parse(argv=None) -> argparse.Namespace:
    """Options may stand anywhere among the overrides (`train x=1 --dry-run y=2`): argparse hands the overrides
    after an option back as unknown arguments, which we append in their order."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    unknown = [e for e in extra if e.startswith("-") or "=" not in e]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)} (overrides look like section.key=value)")
    args.overrides = [*args.overrides, *extra]
    return args


def run(args: argparse.Namespace) -> int:
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # skip DeepSpeed's accelerator probing and its warning
    from .config import load_config

    cfg = load_config(args.config, args.overrides)
    if args.dry_run:
        from .train import dry_run

        return dry_run(cfg, args.world_size or int(os.environ.get("WORLD_SIZE", 1)))
    from .train import train

    return train(cfg)


def main(argv=None) -> int:
    args = parse(argv)
    try:
        return run(args)
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr, flush=True)
        return EXIT_CONFIG
    except RunDirBusy as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        return EXIT_CONFIG
    except TrainingError as err:
        print(f"training stopped: {err}", file=sys.stderr, flush=True)
        return EXIT_DIVERGED
    except StorageError as err:
        print(f"storage error: {err}", file=sys.stderr, flush=True)
        return EXIT_STORAGE
    finally:
        close_process_group()


def close_process_group() -> None:
    """Leave the process group before the interpreter exits: a gloo group torn down by interpreter shutdown can
    abort the process ('terminate called without an active exception', exit -6) and hide the exit code."""
    if "torch" in sys.modules:
        from . import dist

        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
