"""engine.precision=auto follows the hardware; explicit half precision on a CPU that emulates it warns with the
measured cost; MFU is a share in [0, 1] or absent, never a number above 1."""
import pytest
import torch

from maskdit_ds import hardware
from maskdit_ds.config import load_config, resolve_auto, validate
from maskdit_ds.training.stats import Throughput, mfu


def fake_cpu(monkeypatch, capability: str, bf16_units: bool, amx: bool = False):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: bf16_units)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)


@pytest.mark.parametrize("capability, bf16_units, amx, expected", [
    ("AVX2", False, False, "fp32"),  # AMD EPYC without AVX-512: emulated bf16 is ~25x slower than fp32
    ("AVX512", False, False, "fp32"),  # AVX-512 without its BF16 extension
    ("AVX512", True, False, "bf16"),
    ("AVX512", False, True, "bf16"),  # AMX tiles
    ("AVX2", True, False, "fp32"),  # ATEN_CPU_CAPABILITY=avx2 keeps torch off the bf16 instructions
])
def test_auto_precision_on_cpus(monkeypatch, capability, bf16_units, amx, expected):
    fake_cpu(monkeypatch, capability, bf16_units, amx)
    precision, reason = hardware.resolve_precision("auto")
    assert precision == expected and reason
    assert hardware.resolve_precision("fp16") == ("fp16", "set in the config")


@pytest.mark.parametrize("capability, expected", [((9, 0), "amp_bf16"), ((8, 0), "amp_bf16"), ((7, 0), "amp_fp16")])
def test_auto_precision_on_gpus(monkeypatch, capability, expected):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA Test GPU")
    precision, reason = hardware.resolve_precision("auto")
    assert precision == expected and "Test GPU" in reason


def test_auto_is_resolved_in_run_and_stage_config_before_anything_runs(monkeypatch):
    fake_cpu(monkeypatch, "AVX2", False)
    cfg = load_config("digits", ["train.stages.1.overrides={engine.precision: auto, mask.ratio: 0.0}"])
    assert cfg.engine.precision == "auto"
    resolved, notes = resolve_auto(cfg)
    assert resolved.engine.precision == "fp32"
    assert resolved.train.stages[1]["overrides"]["engine.precision"] == "fp32"
    assert len(notes) == 2 and all("auto -> fp32" in n for n in notes)
    assert cfg.engine.precision == "auto"  # the input is not modified
    validate(resolved)
    fake_cpu(monkeypatch, "AVX512", True)
    assert resolve_auto(cfg)[0].engine.precision == "bf16"


def test_the_example_and_the_paper_presets_choose_as_documented():
    assert load_config("digits").engine.precision == "auto"
    assert load_config("digits").train.stages[1]["overrides"]["engine.precision"] == "fp32"  # the paper's tuning
    assert load_config("imagenet256").engine.precision == "amp_fp16"  # the paper's masked phase: AMP fp16


def test_emulated_half_precision_warns_with_a_measured_slowdown(monkeypatch):
    fake_cpu(monkeypatch, "AVX2", False)
    rates = {torch.float32: 33.4, torch.bfloat16: 1.31}
    monkeypatch.setattr(hardware, "gemm_gflops", lambda dtype, *a, **k: rates[dtype])
    message = hardware.half_precision_warning("bf16")
    assert "25x slower than fp32" in message and "1.3 vs 33.4 GFLOP/s" in message
    assert hardware.half_precision_warning("fp32") is None
    fake_cpu(monkeypatch, "AVX512", True)
    assert hardware.half_precision_warning("bf16") is None


def test_gemm_probe_leaves_the_global_rng_alone():
    torch.manual_seed(3)
    expected = torch.rand(4)
    torch.manual_seed(3)
    assert hardware.gemm_gflops(torch.float32, 16, 16, 16) > 0
    assert torch.equal(torch.rand(4), expected)  # a resumed run replays the RNG: a probe must not draw from it


@pytest.mark.parametrize("name, precision, tf32, peak", [
    ("NVIDIA H100 80GB HBM3", "bf16", False, 989.4), ("NVIDIA H100 PCIe", "bf16", False, 756.0),
    ("NVIDIA H100 80GB HBM3", "fp32", True, 494.7), ("NVIDIA H100 80GB HBM3", "fp32", False, 66.9),
    ("NVIDIA H200", "fp16", False, 989.4), ("NVIDIA A100-SXM4-80GB", "fp32", True, 156.0),
    ("Tesla V100-SXM2-32GB", "bf16", False, 0.0),  # no bf16 tensor cores: no peak, so no MFU
])
def test_gpu_peaks_follow_the_data_sheet(monkeypatch, name, precision, tf32, peak):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: name)
    assert hardware.gpu_peak_tflops(precision, tf32)[0] == peak


def test_mfu_is_a_share_or_absent():
    assert mfu(50.0, 100.0) == 0.5
    assert mfu(150.0, 100.0) is None  # a peak that the work exceeds does not describe the work
    assert mfu(1.0, 0.0) is None


def test_measured_mfu_of_real_cpu_steps_stays_in_unit_interval():
    """The peak is measured on the model's own GEMM shapes in the run's dtype and thread count, so the achieved
    rate of whole training steps (attention, norms and the optimizer included) is a share of it."""
    from maskdit_ds.diffusion.loss import MaskedEDMLoss
    from maskdit_ds.model import Masker, build_denoiser, gemm_shapes, get_size, train_flops

    cfg = load_config("digits", ["model.name=MaskDiT-T/2", "model.input_size=16"])
    size, net = get_size(cfg.model.name), build_denoiser(cfg.model).train()
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4)
    masker = Masker("random", 8, 0.5)
    peak, source = hardware.device_peak_tflops("fp32", False, gemm_shapes(size, 16, 16, masker.kept))
    assert peak > 0 and "measured" in source
    meter = Throughput(lambda kept: train_flops(size, 16, 1, kept), peak, world=1)
    loss_fn = MaskedEDMLoss(size.patch_size, cfg.model.num_classes)
    x, y = torch.randn(16, 1, 16, 16), torch.randint(0, 10, (16,))
    for _ in range(3):
        loss, _ = loss_fn(net, x, y, masker)
        loss.mean().backward()
        opt.step()
        opt.zero_grad()
        meter.add(16, masker.kept)
    value = meter.read()["mfu"]
    assert value is not None and 0.0 < value <= 1.0
