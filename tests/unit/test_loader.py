"""What a resume restores besides weights: the loader's exact sample position and every RNG (weights_only files)."""
import numpy as np
import torch

from maskdit_ds.data.loader import ResumableLoader


def test_loader_resumes_at_the_exact_sample():
    data = [{"x": torch.tensor([float(i)]), "y": torch.tensor(i)} for i in range(50)]
    ref = ResumableLoader(data, 4, rank=0, world=2, seed=7)
    it = iter(ref)
    seen = [next(it)["y"].tolist() for _ in range(9)]  # crosses an epoch (25 per rank -> 6 batches)
    resumed = ResumableLoader(data, 4, rank=0, world=2, seed=7)
    first = ResumableLoader(data, 4, rank=0, world=2, seed=7)
    it1 = iter(first)
    [next(it1) for _ in range(4)]
    resumed.load_state_dict(first.state_dict())
    it2 = iter(resumed)
    assert [next(it2)["y"].tolist() for _ in range(5)] == seen[4:]
    other = iter(ResumableLoader(data, 4, rank=1, world=2, seed=7))
    rank1 = {v for _ in range(6) for v in next(other)["y"].tolist()}
    assert not rank1 & set(sum(seen[:6], []))  # ranks see disjoint samples within an epoch
    assert seen[0] != seen[6]  # a new permutation each epoch


def test_rng_states_survive_a_weights_only_rank_state_file(tmp_path):
    import random

    from maskdit_ds.training.checkpoint import load_rank_state, save_rank_state
    from maskdit_ds.training.state import rng_state, set_rng_state

    np.random.seed(3), random.seed(3), torch.manual_seed(3)
    save_rank_state(tmp_path, 0, {"train": {"step": 7}, "data": {"epoch": 1, "position": 5}, "rng": rng_state()})
    expected = (np.random.rand(4), [random.random() for _ in range(4)], torch.rand(4))
    np.random.seed(99), random.seed(99), torch.manual_seed(99)
    state = load_rank_state(tmp_path, 0)  # torch.load(weights_only=True): no pickled code can run
    set_rng_state(state["rng"])
    assert state["train"]["step"] == 7 and state["data"] == {"epoch": 1, "position": 5}
    np.testing.assert_array_equal(np.random.rand(4), expected[0])
    assert [random.random() for _ in range(4)] == expected[1]
    assert torch.equal(torch.rand(4), expected[2])


