"""Resume on another world size: a 2-rank fp16 ZeRO-2 tag -> universal checkpoint + 1-rank training states."""
import json
import shutil

import pytest
import torch

import ckpt_helpers as _ckpt_helpers
import launch as _launch
from maskdit_ds.training import checkpoint as ckpt
from maskdit_ds.training.checkpoint.reshard import ReshardError, reshard, reshard_rank_states


def rank_state(position, rng, epoch=3, step=7):
    return {"train": {"step": step, "stage": 0, "stage_step": step, "images_seen": 112},
            "data": {"epoch": epoch, "position": position}, "rng": {"torch": torch.tensor([rng])}}


def test_rank_states_keep_the_samples_consumed():
    old = [rank_state(16, 0), rank_state(16, 1)]
    one = reshard_rank_states(old, 1)
    assert [s["data"] for s in one] == [{"epoch": 3, "position": 32}]
    three = reshard_rank_states(old, 3)
    assert [s["data"]["position"] for s in three] == [10, 10, 10]  # 32 // 3; 2 samples are seen again
    assert three[0]["reshard"]["samples_repeated"] == 2
    assert [int(s["rng"]["torch"]) for s in three] == [0, 1, 0]  # rank r takes old rank r % N
    assert all(s["train"] == old[0]["train"] for s in three)
    three[0]["rng"]["torch"].add_(5)
    assert int(old[0]["rng"]["torch"]) == 0  # copies, not aliases


def test_resharded_position_continues_the_epoch_where_the_old_ranks_stopped():
    """The position arithmetic of reshard_rank_states against the sampler itself: 2 ranks at position p have
    consumed exactly the first 2p indices of the epoch's order, which 1 rank resumes after."""
    from maskdit_ds.data import ResumableSampler

    length, seed, epoch, position = 103, 5, 2, 24
    old = [ResumableSampler(length, r, 2, seed) for r in range(2)]
    consumed = sorted(i for s in old for i in s.indices(epoch)[:position])
    new = reshard_rank_states([rank_state(position, r, epoch=epoch) for r in range(2)], 1)[0]["data"]
    one = ResumableSampler(length, 0, 1, seed)
    one.epoch, one.position = new["epoch"], new["position"]
    rest = list(iter(one))
    assert sorted(one.indices(epoch)[: new["position"]]) == consumed
    assert not set(rest) & set(consumed) and len(set(rest) | set(consumed)) == length


def test_rank_states_refuse_inconsistent_ranks():
    with pytest.raises(ReshardError, match="different data epochs"):
        reshard_rank_states([rank_state(16, 0, epoch=1), rank_state(16, 1, epoch=2)], 1)
    with pytest.raises(ReshardError, match="disagree on the training state"):
        reshard_rank_states([rank_state(16, 0, step=1), rank_state(16, 1, step=2)], 1)


def test_two_ranks_to_one_loads_in_a_universal_engine(tmp_path):
    run = tmp_path / "r"
    shutil.copytree(_ckpt_helpers.trained_run(), run)
    tag = run / "checkpoints" / "step_0000002"
    out = reshard(tag, 1)
    assert out == tag / "universal" and ckpt.check_tag(out) is None
    assert ckpt.check_tag(tag) is None  # the original tag is untouched and still resumable on 2 ranks
    assert not (tag / "latest_universal").exists()
    manifest = json.loads((out / ckpt.MANIFEST).read_text())
    assert (manifest["world_size"], manifest["source_world_size"], manifest["step"]) == (1, 2, 2)
    old = [ckpt.load_rank_state(tag, r) for r in range(2)]
    new = ckpt.load_rank_state(out, 0)
    assert not (out / "train_state_rank001.pt").exists()
    assert new["data"] == {"epoch": old[0]["data"]["epoch"],
                           "position": old[0]["data"]["position"] + old[1]["data"]["position"]}
    assert new["train"] == old[0]["train"] and new["train"]["images_seen"] == 32
    assert torch.equal(new["rng"]["torch"], old[0]["rng"]["torch"])

    result = _ckpt_helpers.load_universal_on_one_rank(run, tag.name)
    logged = [s for s in _launch.stats(run) if s["step"] == 2][-1]
    assert result["world"] == 1 and result["global_steps"] == 2
    assert result["keys_equal"] and result["masters_bitwise"], result  # == DeepSpeed's zero_to_fp32 of the tag
    assert result["module_dtype"] == "torch.float16" and result["module_is_rounded_masters"], result
    assert result["exp_avg_loaded"] and result["nonzero_exp_avg"], result
    assert result["loss_scale"] == logged["loss_scale"]


def test_trainer_resumes_a_two_rank_run_on_one_rank(tmp_path):
    shutil.copytree(_ckpt_helpers.trained_run(), tmp_path / "r")
    proc = _launch.train(tmp_path, "r", [*_ckpt_helpers.RUN_OVERRIDES, "train.steps=3"], ranks=1,
                         **_ckpt_helpers.FP16)
    assert proc.returncode == 0, proc.stdout[-4000:]
    assert "resharded to 1 ranks" in proc.stdout
    last = _launch.stats(tmp_path / "r")[-1]
    assert last["step"] == 3 and last["images_seen"] == 48  # 32 seen on 2 ranks + one step of 16 on 1 rank
    tags = tmp_path / "r" / "checkpoints"
    manifest = json.loads((tags / "step_0000003" / ckpt.MANIFEST).read_text())
    assert manifest["world_size"] == 1
    # Data position: the 2 ranks consumed p0 + p1 samples of the epoch; the 1-rank run continued from there.
    old = [ckpt.load_rank_state(tags / "step_0000002", r)["data"] for r in range(2)]
    now = ckpt.load_rank_state(tags / "step_0000003", 0)
    assert now["data"] == {"epoch": old[0]["epoch"], "position": old[0]["position"] + old[1]["position"] + 16}
    hours = now["train"].pop("device_hours")
    assert now["train"] == {"step": 3, "stage": 0, "stage_step": 3, "images_seen": 48}
    # device-hours continue from the 2-rank count (which both ranks saved alike), now charged for one device
    saved = {ckpt.load_rank_state(tags / "step_0000002", r)["train"]["device_hours"] for r in range(2)}
    assert len(saved) == 1 and hours > saved.pop()
