"""Stages are built once (config.expand_stages) into one type, and where a run starts is one decision
(checkpoint.decide_start) with one typed answer that the loop logs. One process, no DeepSpeed engine: the tags
here hold what the start decision reads (per-rank state, EMA, config, complete.json), not ZeRO partitions."""
import dataclasses
import json

import pytest
import torch

from maskdit_ds.config import ConfigError, Stage, expand_stages, load_config, save_config
from maskdit_ds.model import build_denoiser, export
from maskdit_ds.training import checkpoint as ckpt
from maskdit_ds.training.state import TrainState, rng_state


def digits(tmp_path, *overrides):
    cfg = load_config("digits", [f"run.out_dir={tmp_path}", "run.name=r", "engine.precision=fp32", *overrides])
    return cfg, expand_stages(cfg)


def write_tag(cfg, state: TrainState, ema: torch.nn.Module):
    """A tag as save_checkpoint lays it out for one rank, without the DeepSpeed files."""
    tag_dir = cfg.run_dir / "checkpoints" / f"step_{state.step:07d}"
    tag_dir.mkdir(parents=True)
    ckpt.save_rank_state(tag_dir, 0, {"train": dataclasses.asdict(state), "data": {"epoch": 0, "position": 3},
                                      "rng": rng_state()})
    ckpt.save_ema(ema, tag_dir)
    save_config(cfg, tag_dir / "config.yaml")
    ckpt.write_manifest(tag_dir, {"step": state.step, "world_size": 1})
    return tag_dir


def test_stages_are_built_once_into_stages_that_carry_their_config(tmp_path):
    cfg, stages = digits(tmp_path)
    assert [(s.index, s.name, s.steps) for s in stages] == [(0, "masked", 800), (1, "unmasked-tuning", 200)]
    assert all(isinstance(s, Stage) and s.cfg.train.stages == [] for s in stages)
    assert (stages[0].cfg.mask.ratio, stages[1].cfg.mask.ratio) == (0.5, 0.0)  # the tuning stage's override
    assert cfg.mask.ratio == 0.5 and cfg.train.stages  # the run config itself is untouched
    single, (only,) = digits(tmp_path, "train.stages=[]", "train.steps=7")
    assert (only.index, only.name, only.steps) == (0, "main", 7) and only.cfg is single


@pytest.mark.parametrize("override, message", [
    ("train.stages=[{name: a, steps: 5, overrides: {mask.nope: 1}}]", r"train.stages\[0\] \(a\): unknown config key"),
    ("train.stages=[{name: a, steps: 0}]", r"every train.stages\[i\].steps\) must be positive"),
    ("train.stages=[3]", r"train.stages\[0\]: expected a mapping, got 3"),
    ("train.stages=[{name: a, stpes: 5}]", r"unknown config key 'train.stages\[0\].stpes'"),
])
def test_a_bad_stage_list_is_refused_with_the_stage_named(tmp_path, override, message):
    with pytest.raises(ConfigError, match=message):
        digits(tmp_path, override)


def test_a_fresh_run_starts_from_nothing_and_writes_its_config(tmp_path):
    cfg, stages = digits(tmp_path)
    start = ckpt.decide_start(cfg, stages, 1)
    assert start.kind == "fresh" and start.state == TrainState() and start.engine_tag is None
    assert start.describe().startswith("[start] fresh")
    assert (cfg.run_dir / "config.yaml").is_file() and len(json.loads((cfg.run_dir / "ds_config.json").read_text())) == 2


def test_a_resume_mid_stage_continues_the_tag_and_hands_its_engine_state_over_once(tmp_path):
    cfg, stages = digits(tmp_path)
    saved_ema = torch.nn.Linear(2, 2)
    tag_dir = write_tag(cfg, TrainState(step=5, stage=0, stage_step=5, images_seen=40), saved_ema)
    start = ckpt.decide_start(cfg, stages, 1)
    assert (start.kind, start.source, start.state.step, start.state.stage) == ("resume", tag_dir, 5, 0)
    assert start.data_state == {"epoch": 0, "position": 3} and not start.stage_done
    assert start.describe() == f"[resume] from {tag_dir} (step 5, stage 0)"
    ema = torch.nn.Linear(2, 2)
    ckpt.restore(start, torch.nn.Linear(2, 2), ema)
    assert torch.equal(ema.weight, saved_ema.weight) and torch.equal(ema.bias, saved_ema.bias)

    loads = []

    class Engine:
        def load(self, ckpt_dir, tag):
            loads.append((ckpt_dir, tag))

    assert not start.loads_universal  # saved on this world size: a plain ZeRO load
    for _ in range(2):  # the first stage's engine loads the tag; a later stage's engine starts fresh
        ckpt.load_engine_state(start, Engine())
    assert loads == [(tag_dir.parent, tag_dir.name)]


def test_a_tag_that_ended_a_stage_starts_the_next_one_and_one_that_ended_the_run_trains_nothing(tmp_path):
    cfg, stages = digits(tmp_path)
    write_tag(cfg, TrainState(step=800, stage=0, stage_step=800), torch.nn.Linear(2, 2))
    start = ckpt.decide_start(cfg, stages, 1)
    assert start.stage_done and not start.finished and start.engine_tag is None
    assert (start.state.stage, start.state.stage_step, start.state.step) == (1, 0, 800)
    assert "(step 800, stage 0)" in start.describe() and "finished" not in start.describe()

    write_tag(cfg, TrainState(step=1000, stage=1, stage_step=200), torch.nn.Linear(2, 2))
    start = ckpt.decide_start(cfg, stages, 1)
    assert start.finished and start.state.stage == len(stages)
    assert start.describe().endswith("[resume] training already finished at step 1000; nothing left to train")


def test_init_from_an_export_continues_its_counters_and_records_the_lineage(tmp_path):
    source_cfg, _ = digits(tmp_path)
    trained = build_denoiser(source_cfg.model)
    folder = export(tmp_path / "exported", trained, source_cfg.model, {"step": 7, "images_seen": 56})
    cfg, stages = digits(tmp_path, f"train.init_from={folder}")
    start = ckpt.decide_start(cfg, stages, 1)
    assert (start.kind, start.state.step, start.state.images_seen, start.state.stage) == ("init_from", 7, 56, 0)
    assert start.record == {"checkpoint": str(folder), "step": 7, "ema": "continued"}
    lineage = json.loads((cfg.run_dir / "lineage.json").read_text())
    assert lineage["checkpoint"] == str(folder) and lineage["data"]["source"] == "digits"
    net, ema = build_denoiser(cfg.model), build_denoiser(cfg.model)
    ckpt.restore(start, net, ema)
    for loaded in (net, ema):
        assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), trained.state_dict().values()))
