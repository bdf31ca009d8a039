"""python -m maskdit_ds <command> [...]: one command line for the whole framework.

  train           train or resume a run (--config PRESET|YAML, dotted overrides, --dry-run)
  sample          many-rank sampling of an export or run directory into an ADM .npz
  eval            ADM-protocol FID / sFID / IS / precision / recall of a samples .npz (`eval ref` builds a reference)
  cache           encode images with a VAE into a latent cache (resumable, one share per rank)
  import-latents  import the paper's released latents into a latent cache
  convert         checkpoints to and from export folders (ZeRO tags, the paper's, DiT's, Hub folders), resharding
  bench           time training steps: mask ratios, eager/compiled, DeepSpeed vs plain PyTorch, alignment
  report          quality against device-hours and images seen for several runs (PNG plot + markdown table)

`python -m maskdit_ds <command> --help` gives each command's options.
"""
from __future__ import annotations

import importlib
import sys

COMMANDS = {"train": "train", "sample": "sample", "eval": "evaluate", "cache": "cache",
            "import-latents": "import_latents", "convert": "convert", "bench": "bench",
            "report": "report"}  # command -> cli module


def main(argv=None) -> int:
    # the deepspeed launcher adds --local_rank=N before the command; ranks read LOCAL_RANK instead
    argv = [a for a in (sys.argv[1:] if argv is None else argv) if not a.startswith("--local_rank")]
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print(__doc__, file=sys.stdout if argv[:1] in (["-h"], ["--help"]) else sys.stderr)
        return 0 if argv[:1] in (["-h"], ["--help"]) else 2
    module = importlib.import_module(f".cli.{COMMANDS[argv[0]]}", __package__)
    return module.main(argv[1:]) or 0


if __name__ == "__main__":
    sys.exit(main())
