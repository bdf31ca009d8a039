"""In-training FID of a real 2-rank run equals a single-process recomputation of the same step's EMA."""

import launch as _launch
import numpy as np
import pytest
from eval_helpers import fid_config, reference_from
from repo import tool

from maskdit_ds.model.export import load_pretrained
from maskdit_ds.training.previews import FIDMonitor


def test_two_rank_training_logs_fid_equal_to_a_single_process_recomputation(tmp_path, inception_weights):
    """The train.py wiring, collectively on 2 CPU ranks: stats.jsonl gets `fid` at step 2; the exported EMA of that
    step, scored by one process, gives the same value (the 2 ranks' features were gathered correctly)."""
    real = tmp_path / "digits_real.npz"
    tool("digits_reference").main(["--out", str(real), "--resolution", "16"])
    with np.load(real) as z:
        ref = reference_from(z["arr_0"][:10], tmp_path / "digits_ref.npz", inception_weights)
    path, sha = inception_weights
    proc = _launch.train(tmp_path, "run", ["train.steps=2", "train.ckpt_every=2", "sample.steps=2", "eval.fid_every=2",
                                           "eval.fid_samples=6", f"eval.fid_ref={ref}",
                                           f"eval.inception_weights={path}", f"eval.inception_sha256={sha}"],
                         ranks=2, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:]
    rows = [r for r in _launch.stats(tmp_path / "run") if "fid" in r]
    assert [r["step"] for r in rows] == [2] and np.isfinite(rows[0]["fid"]) and rows[0]["fid"] > 0
    cfg = fid_config(inception_weights, ref)
    ema = load_pretrained(tmp_path / "run", "cpu")
    assert FIDMonitor(cfg, "cpu")(2, ema) == pytest.approx(rows[0]["fid"], rel=1e-5)
    event_files = list((tmp_path / "run" / "tb").glob("events.*"))
    assert event_files and any(b"fid" in f.read_bytes() for f in event_files)
