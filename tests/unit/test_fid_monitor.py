"""In-training FID on random Inception weights (the shared fixture): an identical reference scores ~0, and setup errors are caught before training."""
import numpy as np
import pytest
import torch
from eval_helpers import fid_config, random_images, reference_from

from maskdit_ds.config import ConfigError
from maskdit_ds.training.previews import FIDMonitor
from maskdit_ds.model import build_denoiser


def random_ema(cfg):
    torch.manual_seed(0)
    net = build_denoiser(cfg.model)
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0, 0.05)
    return net.eval()


def test_identical_reference_gives_zero(tmp_path, inception_weights):
    placeholder = tmp_path / "placeholder.npz"
    np.savez(placeholder, arr_0=random_images(4, size=16, seed=1))
    cfg = fid_config(inception_weights, placeholder)
    ema = random_ema(cfg)
    first = FIDMonitor(cfg, "cpu")
    own, _ = first.sample(ema)  # the exact images the monitor scores (fixed seeds)
    assert own.shape == (6, 16, 16, 3) and own.dtype == np.uint8
    same = reference_from(own, tmp_path / "same.npz", inception_weights, first.extractor)
    monitor = FIDMonitor(fid_config(inception_weights, same), "cpu")
    rng_before = torch.get_rng_state()
    assert monitor(1, ema) is None  # not a due step: nothing sampled
    fid = monitor(2, ema)
    assert torch.equal(rng_before, torch.get_rng_state())  # training randomness untouched (resume stays exact)
    assert isinstance(fid, float) and abs(fid) < 1e-3 and ema.training is False  # (a differing reference:
    # the 2-rank test below checks fid > 0)


def test_setup_errors_are_caught_before_training(tmp_path, inception_weights):
    np.savez(tmp_path / "ref32.npz", arr_0=random_images(4, size=32))
    with pytest.raises(ConfigError, match="holds 32x32 images, but the model generates 16x16"):
        FIDMonitor(fid_config(inception_weights, tmp_path / "ref32.npz"), "cpu")
    np.savez(tmp_path / "ref16.npz", arr_0=random_images(4, size=16))
    with pytest.raises(ConfigError, match="has sha256 .*, expected (ab){32}: wrong file"):
        FIDMonitor(fid_config(inception_weights, tmp_path / "ref16.npz", "eval.inception_sha256=" + "ab" * 32), "cpu")
    with pytest.raises(ConfigError, match="a latent model needs data.vae"):
        FIDMonitor(fid_config(inception_weights, tmp_path / "ref16.npz", "data.source=latents"), "cpu")
    np.savez(tmp_path / "float.npz", arr_0=random_images(4, size=16).astype(np.float32))
    with pytest.raises(ConfigError, match="dtype float32, expected uint8"):
        FIDMonitor(fid_config(inception_weights, tmp_path / "float.npz"), "cpu")


