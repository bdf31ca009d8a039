"""tools/gpu_check.sh on the CPU with tiny sizes (--smoke): every phase of the GPU check runs, so it cannot rot
between the sessions that have a GPU."""
import json
import os
import subprocess
import sys


from launch import ROOT


def test_gpu_check_smoke_runs_every_phase_and_writes_its_report(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env.update(PYTHON=sys.executable, OMP_NUM_THREADS="1")
    proc = subprocess.run(["bash", "tools/gpu_check.sh", "--smoke", "--out", str(tmp_path)], cwd=ROOT, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:]
    result = json.loads((tmp_path / "gpu_check.json").read_text())
    phases = result["phases"]
    assert {name: p["status"] for name, p in phases.items()} == {
        name: "ok" for name in ("attention", "bench", "collectives", "env", "gemm", "sampling", "trainer", "vae")}
    assert phases["collectives"]["result"]["backend"] == "gloo"  # nccl on GPUs
    assert set(phases["collectives"]["result"]["probes"].values()) == {"ok"}
    bench = phases["bench"]["result"]["fp32"]
    assert {(r["runner"], r["mask_ratio"]) for r in bench["rows"]} == {
        ("deepspeed", 0.5), ("deepspeed", 0.0), ("torch", 0.5), ("torch", 0.0)}
    assert 0 < bench["masked_over_unmasked_step"]
    trainer = phases["trainer"]["result"]
    assert trainer["first_exit"] == 75 and trainer["logged_steps"] == [2, 4, 6] and trainer["fid"]
    assert trainer["tensorboard_files"] >= 2  # the stopped run's and the resumed run's
    assert phases["sampling"]["result"]["fp32"]["images_per_s"] > 0
    assert phases["vae"]["result"]["vae_encode_only_images_per_s"] > 0
    table = (tmp_path / "gpu_check.md").read_text()
    assert "| trainer | ok |" in table and "fp32: masked/unmasked step time <= 0.55" in table
