"""In-training FID (maskdit_ds.fid_monitor) on random Inception weights made here: identical reference gives ~0,
setup errors are caught before training, and a real 2-rank digits run logs a finite `fid` to stats.jsonl."""

import sys
from pathlib import Path

import _launch
import numpy as np
import pytest
import torch
from _eval_helpers import random_images, write_weights

from maskdit_ds import checkpoint as ckpt
from maskdit_ds.config import ConfigError, load_config
from maskdit_ds.evaluation import build_extractor, build_reference
from maskdit_ds.fid_monitor import FIDMonitor
from maskdit_ds.model import build_denoiser

REPO = Path(__file__).resolve().parents[1]
TINY = ["model.name=MaskDiT-T/2", "model.input_size=16", "data.resolution=16", "train.stages=[]", "sample.steps=2",
        "eval.fid_samples=6", "eval.fid_every=2"]


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    path = tmp_path_factory.mktemp("w") / "inception.pth"
    return path, write_weights(path, seed=0)


def config(weights, ref, *more):
    path, sha = weights
    return load_config("digits", [*TINY, f"eval.fid_ref={ref}", f"eval.inception_weights={path}",
                                  f"eval.inception_sha256={sha}", *more])


def random_ema(cfg):
    torch.manual_seed(0)
    net = build_denoiser(cfg.model)
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0, 0.05)
    return net.eval()


def reference_from(images, out, weights, extractor=None):
    np.savez(out.with_suffix(".real.npz"), arr_0=images)
    extractor = extractor or build_extractor(weights[0], "cpu", 20, expected_sha256=weights[1])
    return build_reference(out.with_suffix(".real.npz"), out, extractor, progress=False)


def test_identical_reference_gives_zero(tmp_path, weights):
    placeholder = tmp_path / "placeholder.npz"
    np.savez(placeholder, arr_0=random_images(4, size=16, seed=1))
    cfg = config(weights, placeholder)
    ema = random_ema(cfg)
    first = FIDMonitor(cfg, "cpu")
    own = first.sample(ema)  # the exact images the monitor scores (fixed seeds)
    assert own.shape == (6, 16, 16, 3) and own.dtype == np.uint8
    same = reference_from(own, tmp_path / "same.npz", weights, first.extractor)
    monitor = FIDMonitor(config(weights, same), "cpu")
    rng_before = torch.get_rng_state()
    assert monitor(1, ema) is None  # not a due step: nothing sampled
    fid = monitor(2, ema)
    assert torch.equal(rng_before, torch.get_rng_state())  # training randomness untouched (resume stays exact)
    assert isinstance(fid, float) and abs(fid) < 1e-3 and ema.training is False  # (a differing reference:
    # the 2-rank test below checks fid > 0)


def test_setup_errors_are_caught_before_training(tmp_path, weights):
    np.savez(tmp_path / "ref32.npz", arr_0=random_images(4, size=32))
    with pytest.raises(ConfigError, match="holds 32x32 images, but the model generates 16x16"):
        FIDMonitor(config(weights, tmp_path / "ref32.npz"), "cpu")
    np.savez(tmp_path / "ref16.npz", arr_0=random_images(4, size=16))
    with pytest.raises(ConfigError, match="has sha256 .*, expected (ab){32}: wrong file"):
        FIDMonitor(config(weights, tmp_path / "ref16.npz", "eval.inception_sha256=" + "ab" * 32), "cpu")
    with pytest.raises(ConfigError, match="a latent model needs data.vae"):
        FIDMonitor(config(weights, tmp_path / "ref16.npz", "data.source=latents"), "cpu")
    np.savez(tmp_path / "float.npz", arr_0=random_images(4, size=16).astype(np.float32))
    with pytest.raises(ConfigError, match="dtype float32, expected uint8"):
        FIDMonitor(config(weights, tmp_path / "float.npz"), "cpu")


def test_two_rank_training_logs_fid_equal_to_a_single_process_recomputation(tmp_path, weights):
    """The train.py wiring, collectively on 2 CPU ranks: stats.jsonl gets `fid` at step 2; the exported EMA of that
    step, scored by one process, gives the same value (the 2 ranks' features were gathered correctly)."""
    real = tmp_path / "digits_real.npz"
    sys.path.insert(0, str(REPO / "tools"))
    import digits_reference

    digits_reference.main(["--out", str(real), "--resolution", "16"])
    with np.load(real) as z:
        ref = reference_from(z["arr_0"][:10], tmp_path / "digits_ref.npz", weights)
    path, sha = weights
    proc = _launch.train(tmp_path, "run", ["train.steps=2", "train.ckpt_every=2", "sample.steps=2", "eval.fid_every=2",
                                           "eval.fid_samples=6", f"eval.fid_ref={ref}",
                                           f"eval.inception_weights={path}", f"eval.inception_sha256={sha}"],
                         ranks=2, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:]
    rows = [r for r in _launch.stats(tmp_path / "run") if "fid" in r]
    assert [r["step"] for r in rows] == [2] and np.isfinite(rows[0]["fid"]) and rows[0]["fid"] > 0
    cfg = config(weights, ref)
    ema = ckpt.load_pretrained(tmp_path / "run", "cpu")
    assert FIDMonitor(cfg, "cpu")(2, ema) == pytest.approx(rows[0]["fid"], rel=1e-5)
    event_files = list((tmp_path / "run" / "tb").glob("events.*"))
    assert event_files and any(b"fid" in f.read_bytes() for f in event_files)
