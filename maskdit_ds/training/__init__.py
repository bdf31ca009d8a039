"""Training on DeepSpeed ZeRO-2 (docs/method.md §4): the plan, the loop, checkpoints, logging and previews.

engine.py is the only module of the package that imports deepspeed.
"""
from .loop import train
from .plan import describe, dry_run

__all__ = ["describe", "dry_run", "train"]
