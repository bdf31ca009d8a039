"""dist.py: the device rule for every launcher, and collectives that put tensors where the group wants them."""
import pytest
import torch

from maskdit_ds import dist


@pytest.mark.parametrize("visible, local_rank, expected", [
    (8, "5", 5),  # --gpus-per-node 8: every task sees all GPUs
    (1, "5", 0),  # --gpus-per-task 1: each task sees only its own GPU, as cuda:0
    (4, "6", 2),  # 4 visible GPUs shared by 8 tasks (two per GPU)
])
def test_local_device_is_the_local_rank_modulo_the_visible_gpus(monkeypatch, visible, local_rank, expected):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: visible)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.setenv("SLURM_LOCALID", local_rank)  # srun, before the trainer maps it to LOCAL_RANK
    assert dist.device() == torch.device("cuda", expected)
    monkeypatch.setenv("LOCAL_RANK", local_rank)
    assert dist.device() == torch.device("cuda", expected)


def test_cpu_device_and_single_process_collectives():
    assert dist.device() == torch.device("cpu") and not dist.initialized()
    t = torch.tensor([1.0, 2.0])
    assert torch.equal(dist.all_reduce(t), t) and dist.all_reduce(t) is not t
    assert torch.equal(dist.all_reduce_async(t).result(), t)
    assert dist.any_rank(True) and not dist.any_rank(False)
    assert dist.all_gather_objects({"a": 1}) == [{"a": 1}] and dist.gather_to_main(3) == [3]
    assert dist.broadcast_from_main("x") == "x"
    dist.barrier()
    dist.long_barrier()
