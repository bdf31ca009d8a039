"""tools/make_wheelhouse.sh is complete and clean: built for this machine's Python into a folder holding a stale
wheel, it empties the folder first; installed with --no-index into a venv that holds torch alone, it lets
deepspeed, diffusers and datasets import and deepspeed.initialize train a tiny model. So every import-time
dependency is found here, not on a lent GPU. Needs the package registries (as the wheelhouse does)."""
import os
import subprocess
import sys
import venv

from launch import ROOT, free_port

CHECK = """
import importlib, os
import datasets, diffusers, deepspeed, torch
importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None  # as engine.skip_cpu_shm_op
deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False, verbose=False)
net = torch.nn.Linear(4, 2)
engine, *_ = deepspeed.initialize(model=net, model_parameters=net.parameters(), config={
    "train_batch_size": 2, "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}},
    "zero_optimization": {"stage": 2}})
engine.backward(engine(torch.randn(2, 4)).sum())
engine.step()
print("initialized", deepspeed.__version__, diffusers.__version__, datasets.__version__)
"""


def test_wheelhouse_installs_into_a_torch_only_venv_and_deepspeed_initializes(tmp_path):
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    (wheels / "numpy-0.0.1-py3-none-any.whl").write_bytes(b"stale")  # a second version would break --no-index
    python = f"{sys.version_info.major}.{sys.version_info.minor}"
    made = subprocess.run(["bash", "tools/make_wheelhouse.sh", "--python", python, "--out", str(wheels)], cwd=ROOT,
                          env={**os.environ, "PYTHON": sys.executable}, capture_output=True, text=True, timeout=600)
    assert made.returncode == 0, made.stdout[-2000:] + made.stderr[-3000:]
    names = {p.name.split("-")[0].lower() for p in wheels.glob("*.whl")}
    assert not (wheels / "numpy-0.0.1-py3-none-any.whl").exists()
    assert {"deepspeed", "diffusers", "datasets", "xxhash", "msgpack", "py_cpuinfo", "hjson"} <= names
    assert "torch" not in names

    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=False)  # pip runs from outside (--python): no ensurepip, a second faster
    target = env_dir / "bin" / "python"
    pip = [sys.executable, "-m", "pip", "--python", str(target), "install", "-q", "--no-compile"]
    torch_only = subprocess.run([*pip, "torch==2.13.0"], capture_output=True, text=True, timeout=600)
    assert torch_only.returncode == 0, torch_only.stderr[-3000:]
    installed = subprocess.run([*pip, "--no-index", "--find-links", str(wheels), "-r",
                                str(wheels / "requirements.txt")], capture_output=True, text=True, timeout=600)
    assert installed.returncode == 0, installed.stderr[-3000:]

    env = {"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/root"), "DS_ACCELERATOR": "cpu",
           "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(free_port()), "OMP_NUM_THREADS": "1"}  # nothing of this checkout's environment
    check = subprocess.run([str(target), "-c", CHECK], cwd=tmp_path, env=env, capture_output=True, text=True,
                           timeout=300)
    assert check.returncode == 0 and "initialized 0.19.8" in check.stdout, check.stdout[-2000:] + check.stderr[-3000:]
