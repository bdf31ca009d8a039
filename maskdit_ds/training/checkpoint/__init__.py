"""The run's checkpoints, in one place: where a run starts, what a save writes, and what a tag on disk is.

The training loop asks four things, in this order:
  start = decide_start(cfg, stages, world)   where do I start, with what (fresh / resume / init_from): a Start
  restore(start, net, ema)                   its weights into the built modules
  load_engine_state(start, engine)           a resumed tag's DeepSpeed state into the first engine
  save_checkpoint(cfg, engine, ema, ...)     a tag (and an export), then pruning

  tags.py     a tag on disk: listing, complete.json and its checks, per-rank state files, the EMA, pruning
  start.py    the start decision: which tag, its config check, resharding, train.init_from
  save.py     saving a tag and an export; the run's lineage
  reshard.py  a tag saved on N ranks -> a universal checkpoint for M ranks
"""
from .save import lineage, save_checkpoint
from .start import Start, decide_start, load_engine_state, restore
from .tags import (EMA_FILE, MANIFEST, check_tag, clean_stale_temporaries, latest_good_tag, list_tags,
                   load_ema, load_rank_state, prune, save_ema, save_rank_state, scan_tags, write_manifest)

__all__ = ["EMA_FILE", "MANIFEST", "Start", "check_tag", "clean_stale_temporaries", "decide_start",
           "latest_good_tag", "lineage", "list_tags", "load_ema", "load_engine_state", "load_rank_state", "prune",
           "restore", "save_checkpoint", "save_ema", "save_rank_state", "scan_tags", "write_manifest"]
