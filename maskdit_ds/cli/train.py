"""`python -m maskdit_ds train --config <preset|yaml> [section.key=value ...] [--dry-run]`: train or resume a run.

Exit codes (errors.py): 0 done, 2 could not start, 3 diverged, 4 storage error, 5 a rank or host was lost (or never
joined), 75 stopped after saving."""
from __future__ import annotations

import argparse
import os
import sys

from . import command, parser


def build_parser() -> argparse.ArgumentParser:
    p = parser("train", __doc__)
    p.add_argument("--config", required=True, help="preset name (see maskdit_ds/configs) or a YAML file")
    p.add_argument("--dry-run", action="store_true", help="validate, print config, ds_config, params, FLOPs")
    p.add_argument("--world-size", type=int, default=None, help="with --dry-run: the world size to check")
    p.add_argument("--device-memory", default=None,
                   help="with --dry-run: memory per device for the memory plan, e.g. 80GB (default: this "
                        "machine's GPU; none on a CPU)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.micro_batch=32")
    return p


def parse(argv=None) -> argparse.Namespace:
    """Options may stand anywhere among the overrides (`--config x a=1 --dry-run b=2`): argparse hands the overrides
    after an option back as unknown arguments, which we append in their order."""
    p = build_parser()
    args, extra = p.parse_known_args(argv)
    unknown = [e for e in extra if e.startswith("-") or "=" not in e]
    if unknown:
        p.error(f"unrecognized arguments: {' '.join(unknown)} (overrides look like section.key=value)")
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

        return dry_run(cfg, args.world_size or int(os.environ.get("WORLD_SIZE", 1)), args.device_memory)
    from ..training import train

    return train(cfg)


@command
def main(argv=None) -> int:
    return run(parse(argv))


if __name__ == "__main__":
    sys.exit(main())
