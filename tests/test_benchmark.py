"""The benchmark command runs on the real engine and reports what docs/benchmarks.md quotes (not a timing test)."""
import json
import subprocess
import sys

from _launch import ROOT, env, free_port


def test_benchmark_reports_every_mode_side_by_side(tmp_path):
    out = tmp_path / "rows.json"
    cmd = [sys.executable, "tools/benchmark.py", "--model", "MaskDiT-T/2", "--input-size", "8", "--batch", "4",
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
    assert "| deepspeed | 0.5 |" in proc.stdout and "speed-up vs DeepSpeed r=0" in proc.stdout
