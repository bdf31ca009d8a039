"""Networks built on the meta device: materialised with the same weights as a CPU build, and exports loaded
without any random initialisation (model/materialise.py, model/export.py)."""
import pytest
import torch

from maskdit_ds.config import ModelConfig
from maskdit_ds.model import build_denoiser, export, load_pretrained, on_meta
from maskdit_ds.model.align import AlignedDenoiser
from maskdit_ds.model.materialise import materialise


@pytest.mark.parametrize("name", ["MaskDiT-T/2", "UViT-T/2"])
def test_materialised_network_has_the_weights_of_a_cpu_build(name):
    cfg = ModelConfig(name=name, input_size=8, in_channels=4, num_classes=10)
    torch.manual_seed(3)
    eager = build_denoiser(cfg)
    torch.manual_seed(3)
    late = build_denoiser(cfg, device="cpu")
    assert not on_meta(late)
    assert eager.state_dict().keys() == late.state_dict().keys()
    for key, value in eager.state_dict().items():
        assert torch.equal(value, late.state_dict()[key]), key
    for a, b in zip(eager.buffers(), late.buffers()):  # the fixed sin-cos tables, recomputed in fp32
        assert torch.equal(a, b) and b.dtype == torch.float32


def test_materialised_aligned_module_draws_in_construction_order():
    cfg = ModelConfig(name="MaskDiT-T/2", input_size=8, in_channels=4, num_classes=10)
    torch.manual_seed(5)
    eager = AlignedDenoiser(build_denoiser(cfg), 1, 16, 8)
    torch.manual_seed(5)
    with torch.device("meta"):
        late = AlignedDenoiser(build_denoiser(cfg, device="meta"), 1, 16, 8)
    materialise(late, "cpu")
    for key, value in eager.state_dict().items():
        assert torch.equal(value, late.state_dict()[key]), key


def test_loading_an_export_runs_no_random_init_and_gives_the_same_outputs(tmp_path, monkeypatch):
    cfg = ModelConfig(name="MaskDiT-T/2", input_size=8, in_channels=4, num_classes=10)
    torch.manual_seed(0)
    net = build_denoiser(cfg)
    with torch.no_grad():
        for p in net.parameters():  # non-zero everywhere, so every tensor shows in the output
            p.normal_(0, 0.05)
    folder = export(tmp_path / "model", net, cfg, {"step": 1})

    initialised = []  # devices of every tensor an nn.init function writes while loading
    for fn in ("xavier_uniform_", "normal_", "zeros_", "kaiming_uniform_", "uniform_", "trunc_normal_", "ones_"):
        monkeypatch.setattr(torch.nn.init, fn, recording(getattr(torch.nn.init, fn), initialised))
    loaded = load_pretrained(folder)
    monkeypatch.undo()
    assert initialised and set(initialised) == {"meta"}  # the init ran on shapes only, never on real storage
    assert not on_meta(loaded) and not any(b.is_meta for b in loaded.buffers())

    x, sigma, y = torch.randn(3, 4, 8, 8), torch.tensor([0.5, 2.0, 10.0]), torch.tensor([1, 2, 3])
    with torch.no_grad():
        assert torch.equal(loaded(x, sigma, y), net.eval()(x, sigma, y))


def recording(init_fn, devices: list):
    def wrapped(*args, **kwargs):
        tensor = args[0] if args else kwargs["tensor"]
        devices.append(tensor.device.type)
        return init_fn(*args, **kwargs)
    return wrapped
