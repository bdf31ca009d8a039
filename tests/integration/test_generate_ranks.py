"""Generation under torchrun: one and two ranks write byte-identical sample files (one generator per image seed)."""

import json
import subprocess
import sys

import launch as _launch
import numpy as np
import pytest
from launch import export_random
from repo import ROOT


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return export_random(tmp_path_factory.mktemp("m") / "export" / "step_0000007")


def _torchrun(ranks, model, out, *extra):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks), "--master_port",
           str(_launch.free_port()), "--module", "maskdit_ds", "sample", str(model), "--out", str(out),
           "--num-images", "7", "--chunk-size", "2", "--batch-size", "2", "--steps", "3", "--no-progress", *map(str, extra)]
    return subprocess.run(cmd, cwd=ROOT, env=_launch.env(), capture_output=True, text=True, timeout=240)


def test_one_and_two_ranks_write_identical_files(tmp_path, model):
    runs = {n: _torchrun(n, model, tmp_path / f"r{n}", "--classes", "balanced") for n in (1, 2)}
    for n, res in runs.items():
        assert res.returncode == 0, f"{n} rank(s):\n{res.stdout[-2000:]}\n{res.stderr[-4000:]}"
    with np.load(tmp_path / "r1/samples.npz") as a, np.load(tmp_path / "r2/samples.npz") as b:
        assert np.array_equal(a["arr_0"], b["arr_0"]) and np.array_equal(a["arr_1"], b["arr_1"])
        assert len(np.unique(a["arr_0"].reshape(7, -1), axis=0)) == 7  # every seed gave its own image
    meta = json.loads((tmp_path / "r2/samples.json").read_text())
    assert meta["this_invocation"]["world_size"] == 2 and meta["class_mode"] == "balanced"
    assert meta["seeds"] == [0, 7] and meta["sampler"]["steps"] == 3 and meta["sampler"]["guidance"] == 1.5
    assert sorted(meta["class_counts"]) == [1, 1, 1, 2, 2]  # 7 images over 5 classes, balanced
    assert not (tmp_path / "r2/chunks").exists()  # removed once the .npz is complete


