"""The benchmark command runs on the real engine and reports what docs/benchmarks.md quotes (not a timing test)."""
import json
import subprocess
import sys

from launch import ROOT, env, free_port


def test_benchmark_reports_every_mode_side_by_side(tmp_path):
    out = tmp_path / "rows.json"
    cmd = [sys.executable, "-m", "maskdit_ds", "bench", "--model", "MaskDiT-T/2", "--input-size", "8", "--batch", "4",
           "--precision", "fp32", "--ratios", "0.5,0.0", "--rounds", "1", "--steps", "2", "--baseline",
           "--json", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env(MASTER_PORT=str(free_port())), stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:]
    rows = json.loads(out.read_text())
    assert [(r["runner"], r["mask_ratio"]) for r in rows] == [
        ("deepspeed", 0.5), ("deepspeed", 0.0), ("torch", 0.5), ("torch", 0.0)]
    for row in rows:
        assert row["images_per_s"] > 0 and row["tflops"] > 0 and row["peak_mem_gb"] > 0 and 0 < row["mfu"] <= 1
        assert row["steps_timed"] == 2
    # Same wall time would mean the same TFLOP/s; masking removes half the encoder's work per image.
    masked, unmasked = rows[0], rows[1]
    assert masked["tflops"] / masked["images_per_s"] < unmasked["tflops"] / unmasked["images_per_s"]
    assert "| deepspeed | 0.5 |" in proc.stdout and "speed-up vs first r=0" in proc.stdout


def test_benchmark_counts_the_kept_tokens_of_each_strategy(tmp_path):
    """Plain PyTorch with crop masks (what tools/bench_mask_ratios.py did): FLOPs follow the window's kept tokens,
    floor(sqrt(L (1 - r)))^2 = 4 of 16 at r = 0.5, where a random mask would keep floor(L (1 - r)) = 8."""
    out = tmp_path / "rows.json"
    cmd = [sys.executable, "-m", "maskdit_ds", "bench", "--model", "MaskDiT-T/2", "--input-size", "8", "--batch", "4",
           "--precision", "fp32", "--ratios", "0,0.5", "--strategy", "crop", "--no-deepspeed", "--rounds", "1",
           "--steps", "1", "--warmup", "1", "--json", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env(MASTER_PORT=str(free_port())), stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:]
    rows = json.loads(out.read_text())
    assert [(r["runner"], r["mask_ratio"], r["kept_tokens"]) for r in rows] == [("torch", 0.0, 16), ("torch", 0.5, 4)]
    assert rows[1]["flop_ratio_vs_unmasked"] > 1.5 and rows[0]["flop_ratio_vs_unmasked"] == 1.0
