"""`python -m maskdit_ds train --config <preset|yaml> [section.key=value ...] [--dry-run]`: train or resume a run.

Exit codes (errors.py): 0 done, 2 could not start, 3 diverged, 4 storage error, 5 a rank or host was lost (or never
joined), 75 stopped after saving."""
from __future__ import annotations

import argparse
import os
import sys

from ..errors import (EXIT_CONFIG, EXIT_DIVERGED, EXIT_PEER_LOST, EXIT_STORAGE, ConfigError, PeerLost, RunDirBusy,
                     StorageError, TrainingError)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m maskdit_ds train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="preset name (see maskdit_ds/configs) or a YAML file")
    parser.add_argument("--dry-run", action="store_true", help="validate, print config, ds_config, params, FLOPs")
    parser.add_argument("--world-size", type=int, default=None, help="with --dry-run: the world size to check")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.micro_batch=32")
    return parser


def parse(argv=None) -> argparse.Namespace:
    """Options may stand anywhere among the overrides (`--config x a=1 --dry-run b=2`): argparse hands the overrides
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
    from ..config import load_config

    cfg = load_config(args.config, args.overrides)
    if args.dry_run:
        from ..training import dry_run

        return dry_run(cfg, args.world_size or int(os.environ.get("WORLD_SIZE", 1)))
    from ..training import train

    return train(cfg)


# Refusals print one line (prefix: message) and exit with the code that tells a job script what happened.
REFUSALS = ((ConfigError, "config error", EXIT_CONFIG), (RunDirBusy, "error", EXIT_CONFIG),
            (TrainingError, "training stopped", EXIT_DIVERGED), (StorageError, "storage error", EXIT_STORAGE),
            (PeerLost, "distributed error", EXIT_PEER_LOST))


def main(argv=None) -> int:
    args = parse(argv)
    try:
        return run(args)
    except tuple(kind for kind, _, _ in REFUSALS) as err:
        prefix, code = next((p, c) for kind, p, c in REFUSALS if isinstance(err, kind))
        print(f"{prefix}: {err}", file=sys.stderr, flush=True)
        return code
    finally:
        close_process_group()


def close_process_group() -> None:
    """Leave the process group before the interpreter exits: a gloo group torn down by interpreter shutdown can
    abort the process ('terminate called without an active exception', exit -6) and hide the exit code."""
    if "torch" in sys.modules:
        from .. import dist

        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
