"""The benchmark command runs on the real engine and reports what docs/benchmarks.md quotes (not a timing test)."""
import json
import subprocess
import sys
from pathlib import Path

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


def test_benchmark_two_ranks_engine_variants_and_profile(tmp_path):
    """Under the deepspeed launcher every rank steps (the baseline in DDP); a --ds-config variant runs as one more
    engine beside the shipped one; --profile names the ZeRO-2 phases where the engine's extra time goes, which
    only the real DeepSpeed optimizer produces (the labels wrap its methods)."""
    shipped = json.loads((ROOT / "maskdit_ds" / "ds_configs" / "zero2_fp32.json").read_text())
    shipped["zero_optimization"]["contiguous_gradients"] = False
    variant = tmp_path / "no_contiguous.json"
    variant.write_text(json.dumps(shipped))
    out = tmp_path / "rows.json"
    cmd = [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port()),
           "--module", "maskdit_ds", "bench", "--model", "MaskDiT-T/2", "--input-size", "8", "--batch", "2",
           "--precision", "fp32", "--ratios", "0.5", "--rounds", "1", "--steps", "1", "--warmup", "1",
           "--compile", "off", "--baseline", "--ds-config", str(variant), "--profile", "1", "--json", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:]
    rows = json.loads(out.read_text())
    assert [r["runner"] for r in rows] == ["deepspeed", "deepspeed[no_contiguous]", "torch"]
    assert all(r["world_size"] == 2 for r in rows)
    assert rows[2]["vs_torch"] == 1.0 and all(r["vs_torch"] > 0 for r in rows)
    assert proc.stdout.count("MaskDiT-T/2 8x8x4, batch 2") == 1  # rank 0 alone prints
    for engine in ("deepspeed", "deepspeed[no_contiguous]"):
        section = proc.stdout.split(f"{engine} vs torch, mask ratio 0.5:")[1].split(" vs torch,")[0]
        assert "| zero2: optimizer kernel |" in section and "| zero2: global gradient norm |" in section
        assert "| aten::" in section
