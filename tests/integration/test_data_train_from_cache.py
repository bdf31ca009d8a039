"""End to end: a latent cache made by encode_to_cache trains through `python -m maskdit_ds train`, and a cache
of another resolution is refused by the trainer."""

import json
import os
import subprocess
import sys

import pytest

from data_helpers import free_port, make_clean_folder, save_tiny_vae
from maskdit_ds.data.latent_cache import encode_to_cache
from maskdit_ds.data.sources import ImageFolderSource
from maskdit_ds.data.vae import load_vae
from repo import ROOT


def _train(tmp_path, cache, *overrides):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()),
               OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-m", "maskdit_ds", "train", "--config", "digits", "data.source=latents",
           f"data.path={cache}", "model.in_channels=4", "train.stages=[]", "train.steps=3", "train.global_batch=8",
           "train.micro_batch=8", "sample.final_samples=0", "train.grid_every=0", "engine.precision=fp32",
           f"run.out_dir={tmp_path / 'runs'}", "data.num_workers=0", *overrides]
    return subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e")
    make_clean_folder(root / "img", classes=("a", "b", "c"), per_class=6, size=(64, 80))
    vae, info = load_vae(save_tiny_vae(root / "vae", blocks=4), "fp32")  # x8, as the SD VAE: 64 px -> 4x8x8
    encode_to_cache(ImageFolderSource(str(root / "img")), vae, info, str(root / "cache"), 64, flip=True,
                    num_workers=0, progress=False)
    return root / "cache"


def test_train_from_latent_cache(tmp_path, cache):
    proc = _train(tmp_path, cache, "data.resolution=64", "model.input_size=8")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    stats = [json.loads(line) for line in open(tmp_path / "runs" / "digits" / "stats.jsonl")]
    assert stats[-1]["step"] == 3 and stats[-1]["images_seen"] == 24
    assert 0 < stats[-1]["loss"] < 100


def test_trainer_refuses_cache_of_other_resolution(tmp_path, cache):
    proc = _train(tmp_path, cache, "data.resolution=128", "model.input_size=16")
    assert proc.returncode != 0
    assert f"latent cache {cache}" in proc.stderr and "resolution 128" in proc.stderr
