"""EDM sampler schedule and seeding, uint8 conversion, resumable distributed loader, schedules and EMA."""
import numpy as np
import torch

from maskdit_ds.data.loader import ResumableLoader
from maskdit_ds.sample import SamplerConfig, edm_sample, generate, sigma_schedule, to_uint8
from maskdit_ds.schedules import ema_update, mask_ratio_at


class CountingNet(torch.nn.Module):
    num_classes = 10

    def __init__(self):
        super().__init__()
        self.calls = 0

    def guided(self, x, sigma, labels, guidance):
        self.calls += 1
        return x * 0.5 + labels.view(-1, 1, 1, 1).float() * 0.01


def test_sigma_schedule_endpoints():
    t = sigma_schedule(40, 0.002, 80.0, 7.0)
    assert len(t) == 41 and abs(t[0] - 80) < 1e-9 and abs(t[39] - 0.002) < 1e-12 and t[40] == 0
    assert torch.all(t[:-1][1:] < t[:-1][:-1])


def test_heun_uses_79_network_calls_and_euler_40():
    net = CountingNet()
    edm_sample(net, torch.randn(2, 1, 4, 4), torch.tensor([1, 2]), SamplerConfig(steps=40))
    assert net.calls == 79
    net.calls = 0
    edm_sample(net, torch.randn(2, 1, 4, 4), torch.tensor([1, 2]), SamplerConfig(steps=40, heun=False))
    assert net.calls == 40


def test_samples_depend_only_on_their_seed():
    net, cfg = CountingNet(), SamplerConfig(steps=5, S_churn=10)
    all_at_once, labels = generate(net, [0, 1, 2, 3, 4], (1, 4, 4), 10, cfg, "cpu", batch_size=5)
    # the seeds split across two "ranks" in other batch sizes give the same images
    part_a, la = generate(net, [0, 2, 4], (1, 4, 4), 10, cfg, "cpu", batch_size=2)
    part_b, lb = generate(net, [1, 3], (1, 4, 4), 10, cfg, "cpu", batch_size=1)
    assert torch.equal(all_at_once[[0, 2, 4]], part_a) and torch.equal(all_at_once[[1, 3]], part_b)
    assert torch.equal(labels[[0, 2, 4]], la)


def test_to_uint8_floor_and_round():
    x = torch.tensor([-1.0, -0.999, 0.0, 0.5, 1.0, 2.0]).view(1, 1, 1, 6)
    assert to_uint8(x, "floor")[0, 0, :, 0].tolist() == [0, 0, 127, 191, 255, 255]
    assert to_uint8(x, "round")[0, 0, :, 0].tolist() == [0, 0, 128, 191, 255, 255]
    assert to_uint8(x).shape == (1, 1, 6, 3)


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


def test_mask_ratio_schedules():
    assert mask_ratio_at(0.5, "constant", 0.7) == 0.5
    assert mask_ratio_at(0.5, "cosine", 0.0) == 0.5 and abs(mask_ratio_at(0.5, "cosine", 1.0)) < 1e-12
    assert abs(mask_ratio_at(0.5, "cosine", 0.5) - 0.5 * np.cos(np.pi / 4) ** 4) < 1e-12


def test_ema_update_in_fp32_from_half_weights():
    ema, model = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2).half()
    before = [p.clone() for p in ema.parameters()]
    ema_update(ema, model, 0.9)
    for b, e, m in zip(before, ema.parameters(), model.parameters()):
        assert e.dtype == torch.float32 and torch.allclose(e, 0.9 * b + 0.1 * m.float())


def test_rng_states_survive_a_weights_only_rank_state_file(tmp_path):
    import random

    from maskdit_ds.checkpoint import load_rank_state, save_rank_state
    from maskdit_ds.train import rng_state, set_rng_state

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


def test_grids_of_latent_models_decode_with_the_configured_vae(tmp_path):
    from _data_helpers import save_tiny_vae

    from maskdit_ds.config import load_config
    from maskdit_ds.train import decode_latents, grid_vae

    spec = save_tiny_vae(tmp_path / "vae", blocks=4)  # x8 downsampling, like the SD VAE
    cfg = load_config("digits", [f"data.vae={spec}", "model.in_channels=4"])
    images = decode_latents(torch.randn(3, 4, 2, 2), cfg)
    assert images.shape == (3, 3, 16, 16) and images.abs().max() <= 1
    assert grid_vae(spec) is grid_vae(spec)  # loaded once per run
