"""The paper's mixed precision and an exact EMA (docs/method.md §12), checked on CPU against a plain PyTorch AMP
loop (maskdit_ds/training/numerics.py) and against a reference EMA of the consolidated fp32 masters."""
import json
import subprocess
import sys

from maskdit_ds.dist import free_port

from launch import env
from repo import ROOT, tool_command


def numerics(tmp_path, *args) -> dict:
    out = tmp_path / "report.json"
    proc = subprocess.run(tool_command("numerics", "compare", *args, "--out", out), cwd=ROOT, env=env(),
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:]
    return json.loads(out.read_text())


def test_amp_modes_track_the_papers_plain_loop(tmp_path):
    """Same weights, batches and noise: amp_fp16 and amp_bf16 compute what the paper's loop (fp32 weights,
    torch.autocast, GradScaler, AdamW, EMA of the fp32 weights) computes. Tolerance: 1% of the seed-to-seed spread
    of the per-step loss (the loop's loss across noise seeds), room for a CPU whose kernels order sums
    differently; final EMA within 1e-5 relative (fp32 accumulation of those differences). On this project's CPUs
    both are exactly 0."""
    report = numerics(tmp_path, "--arms", "amp_fp16,amp_bf16", "--steps", "8", "--spread-seeds", "2")
    for name, arm in report["arms"].items():
        spread = report["references"][arm["reference"]]["seed_spread"]
        assert spread > 0.01, report["references"]  # the noise seeds really differ
        assert arm["max_loss_diff"] <= 0.01 * spread, (name, arm["max_loss_diff"], spread)
        assert arm["ema_rel_l2"] <= 1e-5, (name, arm["ema_rel_l2"])


def test_amp_fp16_overflows_back_off_as_torchs_gradscaler_does(tmp_path):
    """From a loss scale of 2^24 the first steps overflow. DeepSpeed 0.19 skips them before its GradScaler sees
    the overflow, which never lowered the scale (every step skipped); the engine lowers it as GradScaler does, so
    the same steps are skipped, the scale ends where the paper's loop's does, and the losses match."""
    report = numerics(tmp_path, "--arms", "amp_fp16", "--steps", "12", "--spread-seeds", "2",
                      "--init-scale", str(2.0**24))
    ours, paper = report["arms"]["amp_fp16"], report["references"]["paper:amp_fp16"]
    assert 0 < paper["skipped"] < 12 and ours["skipped"] == paper["skipped"]
    assert ours["loss_scale"] == paper["loss_scale"] < 2.0**24
    assert ours["max_loss_diff"] <= 0.01 * paper["seed_spread"] and ours["ema_rel_l2"] <= 1e-5


def test_the_ema_under_pure_bf16_zero2_is_the_ema_of_the_fp32_masters(tmp_path):
    """Two ranks, each owning half of the fp32 masters: after every step the gathered partitioned EMA equals an fp32
    EMA of the consolidated masters exactly (the same lerp on the same fp32 numbers), while the old EMA of the
    module's rounded bf16 copy drifts away from it."""
    out = tmp_path / "ema.json"
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                           str(free_port()), str(ROOT / "tests" / "support" / "ema_exactness.py"), str(out)],
                          cwd=ROOT, env=env(PYTHONPATH=str(ROOT)), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:]
    result = json.loads(out.read_text())
    assert result["partitions"] == [result["params"] // 2]  # really partitioned over the two ranks
    assert result["max_abs_diff"] == [0.0] * len(result["max_abs_diff"])
    assert result["old_rel_l2"][-1] > 1e-5  # the half-copy EMA is measurably not the EMA of the weights
