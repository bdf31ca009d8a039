"""tools/gpu_check.sh on the CPU: --smoke runs every phase with tiny sizes (so it cannot rot between the sessions
that have a GPU), and --rehearse prints the full plan for an 80 GB GPU and fails when it cannot work."""
import json
import os
import subprocess
import sys

from launch import ROOT
from repo import tool, tool_command


def check_env() -> dict:
    """This process's environment for the check, less what an earlier test left in it: the rank variables, and the
    inductor cache folder that torch exports once anything compiled in this process (the check chooses its own)."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT", "TORCHINDUCTOR_CACHE_DIR")}
    env.update(PYTHON=sys.executable, OMP_NUM_THREADS="1")
    return env


def test_gpu_check_smoke_runs_every_phase_and_writes_its_report(tmp_path):
    proc = subprocess.run(["bash", "tools/gpu_check.sh", "--smoke", "--out", str(tmp_path)], cwd=ROOT,
                          env=check_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:]
    result = json.loads((tmp_path / "gpu_check.json").read_text())
    phases = result["phases"]
    assert {name: p["status"] for name, p in phases.items()} == {
        name: "ok" for name in ("attention", "bench_eager", "bench_other", "collectives", "env", "gemm",
                                "sampling", "trainer", "vae")}
    assert phases["collectives"]["result"]["backend"] == "gloo"  # nccl on GPUs
    assert phases["env"]["result"]["inductor_cache_dir"] == str(tmp_path / "inductor_cache")  # one for all
    assert set(phases["collectives"]["result"]["probes"].values()) == {"ok"}
    runners = result["runners"]
    assert set(runners) == {"deepspeed-fp32-eager", "torch-fp32-eager"}  # one process each
    for runner in runners.values():
        assert {r["mask_ratio"] for r in runner["rows"]} == {0.5, 0.0}
        assert runner["predicted_gib"] > 0 and runner["measured_peak_gib"] > 0 and runner["seconds"] > 0
    assert [p["name"] for p in result["plan"]["phases"]][:4] == ["env", "collectives", "attention", "bench_eager"]
    trainer = phases["trainer"]["result"]
    assert trainer["first_exit"] == 75 and trainer["logged_steps"] == [2, 4, 6] and trainer["fid"]
    assert trainer["tensorboard_files"] >= 2  # the stopped run's and the resumed run's
    assert phases["sampling"]["result"]["fp32"]["images_per_s"] > 0
    assert phases["vae"]["result"]["vae_encode_only_images_per_s"] > 0
    table = (tmp_path / "gpu_check.md").read_text()
    assert "| trainer | ok |" in table and "fp32: masked/unmasked step time <= 0.55" in table
    assert "| deepspeed-fp32-eager | ok |" in table and "fp32: engine/plain step time <= 1.10" in table


def test_gpu_check_rehearsal_prints_the_80gb_plan_and_fails_when_short(tmp_path):
    proc = subprocess.run(["bash", "tools/gpu_check.sh", "--rehearse", "--out", str(tmp_path)], cwd=ROOT,
                          env=check_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    plan = json.loads((tmp_path / "plan.json").read_text())
    phases = {p["name"]: p for p in plan["phases"]}
    assert list(phases)[:5] == ["env", "collectives", "attention", "bench_eager", "bench_compiled"]
    runners = [r for p in plan["phases"] for r in p["runners"]]
    assert {r["name"] for r in runners} >= {"deepspeed-amp_bf16-eager", "deepspeed-amp_bf16-compiled",
                                            "deepspeed-amp_fp16-eager", "torch-amp_bf16-eager"}  # GPU default, paper
    assert all(r["fits"] and 20 < r["predicted_gib"] < 72 for r in runners)  # XL/2, batch 128, <= 90% of 80 GiB
    assert sum(p["predicted_s"] for p in plan["phases"] if p["kept"]) <= plan["budget_s"] == 480
    assert "| 4 | bench_eager | yes |" in proc.stdout and "predicted total of the kept phases" in proc.stdout

    # the same planner with a short budget; its memory traces (checked above) are skipped: they do not change
    # which phases fit in time, and they are most of the rehearsal's cost
    short = subprocess.run(tool_command("gpu_check_plan", "--budget", "120", "--no-memory"), cwd=ROOT,
                           env=check_env(), capture_output=True, text=True, timeout=600)
    assert short.returncode == 1 and "phase bench_compiled does not fit the 120 s budget" in short.stderr


def test_gpu_check_budget_drops_the_lowest_value_phases(tmp_path):
    """Smoke predictions: 25 s per light phase. 60 s keeps env and collectives and drops everything after."""
    proc = subprocess.run(["bash", "tools/gpu_check.sh", "--smoke", "--budget", "60", "--out", str(tmp_path)],
                          cwd=ROOT, env=check_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:]
    result = json.loads((tmp_path / "gpu_check.json").read_text())
    assert {name: p["status"] for name, p in result["phases"].items()} == {"env": "ok", "collectives": "ok"}
    kept = {p["name"]: p["kept"] for p in result["plan"]["phases"]}
    assert kept["collectives"] and not kept["attention"] and not kept["bench_eager"] and not kept["vae"]


def test_a_runner_over_its_limit_is_recorded_and_the_next_runner_still_runs(tmp_path, monkeypatch):
    gpu_check = tool("gpu_check")

    runners = [{"name": "slow", "engine": "deepspeed", "precision": "fp32", "compile": False, "predicted_gib": 0.1,
                "predicted_s": 1.0, "limit_s": 1},  # killed after 1 s: a python with deepspeed takes longer
               {"name": "plain", "engine": "torch", "precision": "fp32", "compile": False, "predicted_gib": 0.1,
                "predicted_s": 30.0, "limit_s": 300}]
    monkeypatch.setattr(gpu_check, "plan_runners", lambda args, phase: runners)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    args = gpu_check.argparse.Namespace(out=str(tmp_path), smoke=True)
    try:
        gpu_check.bench_phase("bench_other")(args)
        raise AssertionError("the phase should fail: one runner timed out")
    except RuntimeError as err:
        assert "['slow']" in str(err)
    slow = json.loads((tmp_path / "runner_slow.json").read_text())
    plain = json.loads((tmp_path / "runner_plain.json").read_text())
    assert slow["status"] == "timeout" and "over its 1 s limit" in slow["error"]
    assert plain["status"] == "ok" and {r["mask_ratio"] for r in plain["rows"]} == {0.5, 0.0}
