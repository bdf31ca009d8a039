"""The EDM sampler: its noise schedule, its network calls, per-seed determinism, and uint8 conversion."""
import pytest
import torch

from maskdit_ds.config import SamplerConfig, from_dict, load_config, validate
from maskdit_ds.errors import ConfigError
from maskdit_ds.data.transforms import to_uint8
from maskdit_ds.diffusion.sampler import edm_sample, sample_seeds, sigma_schedule


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
    edm_sample(net, torch.randn(2, 1, 4, 4), torch.tensor([1, 2]), SamplerConfig(steps=40, solver="euler"))
    assert net.calls == 40


def test_samples_depend_only_on_their_seed():
    net, cfg = CountingNet(), SamplerConfig(steps=5, S_churn=10)
    all_at_once, labels = sample_seeds(net, [0, 1, 2, 3, 4], (1, 4, 4), 10, cfg, "cpu", batch_size=5)
    # the seeds split across two "ranks" in other batch sizes give the same images
    part_a, la = sample_seeds(net, [0, 2, 4], (1, 4, 4), 10, cfg, "cpu", batch_size=2)
    part_b, lb = sample_seeds(net, [1, 3], (1, 4, 4), 10, cfg, "cpu", batch_size=1)
    assert torch.equal(all_at_once[[0, 2, 4]], part_a) and torch.equal(all_at_once[[1, 3]], part_b)
    assert torch.equal(labels[[0, 2, 4]], la)


def test_to_uint8_floor_and_round():
    x = torch.tensor([-1.0, -0.999, 0.0, 0.5, 1.0, 2.0]).view(1, 1, 1, 6)
    assert to_uint8(x, "floor")[0, 0, :, 0].tolist() == [0, 0, 127, 191, 255, 255]
    assert to_uint8(x, "round")[0, 0, :, 0].tolist() == [0, 0, 128, 191, 255, 255]
    assert to_uint8(x).shape == (1, 1, 6, 3)




def test_sample_heun_of_older_configs_reads_as_the_solver(tmp_path):
    """`sample.heun: true/false` (configs and run directories written before sample.solver) still means Heun or
    Euler, in a YAML, an override or a stage's overrides; an override in either spelling wins over the file."""
    old = tmp_path / "old.yaml"
    old.write_text("base: digits\nsample:\n  heun: false\n")
    assert load_config(str(old)).sample.solver == "euler"
    assert load_config(str(old), ["sample.solver=heun"]).sample.solver == "heun"
    assert load_config("digits", ["sample.heun=false"]).sample.solver == "euler"
    # a stage's override beats the run's sample.solver (read together they would contradict each other)
    validate(load_config("digits", ["train.stages=[{name: a, steps: 1, overrides: {sample.heun: false}}]"]))
    with pytest.raises(ConfigError, match="sample.heun: True contradicts sample.solver: 'euler'"):
        from_dict({"sample": {"heun": True, "solver": "euler"}})
    with pytest.raises(ConfigError, match="sample.solver: 'rk4' is not one of heun, euler"):
        validate(load_config("digits", ["sample.solver=rk4"]))
