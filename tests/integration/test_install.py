"""`pip install .` gives a package that trains from any directory: presets and DeepSpeed configs ship inside it."""
import json
import os
import shutil
import subprocess
import sys
import zipfile

import pytest

from launch import ROOT, env, free_port


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """The project built as a wheel (no editable link to the checkout) and installed into its own folder."""
    base = tmp_path_factory.mktemp("install")
    source = base / "source"  # a copy: setuptools writes build/ and *.egg-info/ next to the project it builds
    source.mkdir()
    for name in ("pyproject.toml", "requirements.txt"):
        shutil.copy(ROOT / name, source / name)
    shutil.copytree(ROOT / "maskdit_ds", source / "maskdit_ds", ignore=shutil.ignore_patterns("__pycache__"))
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                            str(base / "wheel"), str(source)], capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr[-3000:]
    wheel = next((base / "wheel").glob("maskdit_ds-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert {"maskdit_ds/ds_configs/zero2_fp16.json", "maskdit_ds/ds_configs/zero2_bf16.json",
            "maskdit_ds/ds_configs/zero2_fp32.json", "maskdit_ds/configs/digits.yaml"} <= set(names)
    site = base / "site"
    inst = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site),
                           str(wheel)], capture_output=True, text=True, timeout=300)
    assert inst.returncode == 0, inst.stderr[-3000:]
    return site


def test_installed_package_trains_from_another_directory(installed, tmp_path):
    work = tmp_path / "elsewhere"
    work.mkdir()
    run_env = env(PYTHONPATH=str(installed), MASTER_PORT=str(free_port()))  # ahead of any editable install
    where = subprocess.run([sys.executable, "-c", "import maskdit_ds; print(maskdit_ds.__file__)"], cwd=work,
                           env=run_env, capture_output=True, text=True, timeout=120)
    assert where.stdout.strip().startswith(str(installed)), where.stdout + where.stderr
    cmd = [sys.executable, "-m", "maskdit_ds", "train", "--config", "digits", "run.name=installed",
           "model.name=MaskDiT-T/2", "train.stages=[]", "train.steps=2", "train.micro_batch=8",
           "train.global_batch=8", "train.log_every=1", "sample.final_samples=0", "train.grid_every=0",
           "engine.precision=fp32"]
    proc = subprocess.run(cmd, cwd=work, env=run_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:]
    ds_config = json.loads((work / "runs" / "installed" / "ds_config.json").read_text())
    assert ds_config["zero_optimization"]["stage"] == 2  # read from the installed package's ds_configs/
    assert [json.loads(line)["step"] for line in (work / "runs" / "installed" / "stats.jsonl").open()] == [1, 2]
    assert not os.path.exists(work / "maskdit_ds")
