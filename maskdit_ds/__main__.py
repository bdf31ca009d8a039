"""Command line: `python -m maskdit_ds train --config <preset|yaml> [section.key=value ...] [--dry-run]`."""
from __future__ import annotations

import argparse
import os
import sys



def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m maskdit_ds", description=__doc__)
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed launcher
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="train (or resume) a run")
    train.add_argument("--config", required=True, help="preset name (see maskdit_ds/configs) or a YAML file")
    train.add_argument("--dry-run", action="store_true", help="validate, print config, ds_config, params, FLOPs")
    train.add_argument("--world-size", type=int, default=None, help="with --dry-run: the world size to check")
    train.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed launcher
    train.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.micro_batch=32")
    args = parser.parse_args(argv)

    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # skip DeepSpeed's accelerator probing and its warning
    from .config import ConfigError, load_config

    try:
        cfg = load_config(args.config, args.overrides)
        if args.dry_run:
            from .train import dry_run

            return dry_run(cfg, args.world_size or int(os.environ.get("WORLD_SIZE", 1)))
        from .train import TrainingError, train as run_training

        return run_training(cfg)
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr, flush=True)
        return 2
    except TrainingError as err:
        print(f"training stopped: {err}", file=sys.stderr, flush=True)
        return 3


if __name__ == "__main__":
    sys.exit(main())
