"""Stop one 2-rank training run by SIGUSR1 round after round: each round resumes the run, trains a step or two,
gets SIGUSR1 on both ranks (as SLURM's --signal sends it), saves and must exit 75.

    python tests/support/stop_rounds.py OUT_DIR ROUNDS
        -> one JSON line per round: {"round", "codes", "step", "threads": each rank's threads after the command}

Cheap enough for CI: this process imports torch, DeepSpeed and maskdit_ds once and forks the two ranks of each
round from itself, so a round costs a process-group start, an engine, a resume, a step and a save, not two
interpreter starts. Each rank runs the real command (`python -m maskdit_ds train`'s main) and ends the way a
launched rank does: sys.exit with its code, then the interpreter's own shutdown (threads, atexit, finalizers),
which is where a rank that saved could still abort. A rank's output goes to OUT_DIR/round<k>_rank<r>.log.
"""
from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("PYTHONFAULTHANDLER", "1")  # an abort prints every thread's Python stack into the log
import faulthandler  # noqa: E402

# what a rank would import on its way (seconds each), imported once before the forks
import deepspeed.runtime.engine  # noqa: E402,F401
import deepspeed.runtime.zero.muon.muon_optimizer  # noqa: E402,F401
import sklearn.datasets  # noqa: E402,F401
import torch._dynamo  # noqa: E402,F401
import torch.utils.tensorboard  # noqa: E402,F401
from maskdit_ds.cli.train import main  # noqa: E402
from maskdit_ds.dist import free_port  # noqa: E402
from maskdit_ds.training import loop  # noqa: E402,F401

RANKS = 2
OVERRIDES = ["model.name=MaskDiT-T/2", "train.stages=[]", "train.micro_batch=4", "train.global_batch=8",
             "train.steps=100000", "train.ckpt_every=100000", "train.keep_last=1", "train.log_every=1",
             "train.grid_every=0", "sample.final_samples=0", "data.num_workers=0", "engine.precision=fp32",
             "engine.compile=false"]


def steps_logged(run_dir: Path) -> int:
    path = run_dir / "stats.jsonl"
    lines = path.read_text().splitlines() if path.is_file() else []
    return max((json.loads(line)["step"] for line in lines if line.strip().endswith("}")), default=0)


def start_rank(rank: int, port: int, out_dir: Path, log: Path) -> int:
    pid = os.fork()
    if pid:
        return pid
    # the rank: its own output file, the launcher's environment, then the command's real exit
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1), os.dup2(fd, 2)
    faulthandler.enable(file=sys.stderr, all_threads=True)
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(RANKS), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    code = main(["--config", "digits", f"run.out_dir={out_dir}", "run.name=stopped", *OVERRIDES])
    print(THREADS_LINE + json.dumps(native_threads()), flush=True)
    sys.exit(code)


THREADS_LINE = "native threads after the command: "


def native_threads() -> list[str]:
    """This process's threads by their kernel names (gloo's are gloo_tcp_loop and pt_gloo_runloop)."""
    tasks = Path("/proc/self/task")
    return sorted((t / "comm").read_text().strip() for t in tasks.iterdir())


def threads_at_exit(log: Path) -> list[str] | None:
    lines = [line for line in log.read_text().splitlines() if line.startswith(THREADS_LINE)]
    return json.loads(lines[-1][len(THREADS_LINE):]) if lines else None


def exit_code(status: int) -> int:
    return os.waitstatus_to_exitcode(status)


def one_round(k: int, out_dir: Path, timeout: float = 120) -> dict:
    run_dir = out_dir / "stopped"
    before = steps_logged(run_dir)
    port = free_port()
    pids = [start_rank(r, port, out_dir, out_dir / f"round{k}_rank{r}.log") for r in range(RANKS)]
    deadline, codes = time.time() + timeout, {}
    signalled = False
    while len(codes) < RANKS and time.time() < deadline:
        for pid in pids:
            if pid not in codes:
                done, status = os.waitpid(pid, os.WNOHANG)
                if done:
                    codes[pid] = exit_code(status)
        if not signalled and steps_logged(run_dir) > before:
            for pid in pids:
                os.kill(pid, signal.SIGUSR1)
            signalled = True
        time.sleep(0.02)
    for pid in pids:
        if pid not in codes:
            os.kill(pid, signal.SIGKILL)
            codes[pid] = exit_code(os.waitpid(pid, 0)[1])
    return {"round": k, "codes": [codes[p] for p in pids], "step": steps_logged(run_dir),
            "threads": [threads_at_exit(out_dir / f"round{k}_rank{r}.log") for r in range(RANKS)]}


if __name__ == "__main__":
    out, rounds = Path(sys.argv[1]), int(sys.argv[2])
    out.mkdir(parents=True, exist_ok=True)
    # the imports' objects out of the collector's sight: a rank's collections (and its shutdown) then scan only
    # what the rank made, instead of touching, and so copying, every page of this process's heap
    import gc

    gc.freeze()
    for k in range(rounds):
        print(json.dumps(one_round(k, out)), flush=True)
