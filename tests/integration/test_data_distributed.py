"""Two-rank caching through tools/cache_latents.py under torchrun gives one complete cache equal to a one-rank run."""

import json
import os
import subprocess
import sys

import numpy as np

from data_helpers import free_port, make_clean_folder, save_tiny_vae
from maskdit_ds.data.latent_cache import LatentCache, encode_to_cache, shard_name
from maskdit_ds.data.sources import ImageFolderSource
from maskdit_ds.data.vae import load_vae
from repo import TOOLS


def test_two_ranks_under_torchrun(tmp_path):
    make_clean_folder(tmp_path / "img", classes=("a", "b"), per_class=7)  # 14 images -> 4 shards of 4
    vae_dir = save_tiny_vae(tmp_path / "vae")
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           str(TOOLS / "cache_latents.py"), "--source", str(tmp_path / "img"), "--out",
           str(tmp_path / "cache"), "--vae", vae_dir, "--vae-dtype", "fp32", "--resolution", "32", "--flip",
           "--shard-size", "4", "--batch-size", "4", "--num-workers", "0", "--device", "cpu", "--no-progress"]
    proc = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=150)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = [json.loads(line.split(": ", 1)[1]) for line in proc.stdout.splitlines() if line.startswith("[cache] rank")]
    assert sorted(r["encoded"] for r in lines) == [6, 8]  # rank 0: shards 0, 2 (4 + 4); rank 1: shards 1, 3 (4 + 2)
    assert {r["status"] for r in lines} == {"complete", "done_by_rank_0"}
    cache = LatentCache(str(tmp_path / "cache"))
    assert len(cache) == 28 and cache.meta["count"] == 28 and cache.meta["num_shards"] == 4
    assert sorted(os.listdir(tmp_path / "cache" / "shards")) == [shard_name(k) for k in range(4)]

    vae, info = load_vae(vae_dir, "fp32")
    single = tmp_path / "single"
    encode_to_cache(ImageFolderSource(str(tmp_path / "img")), vae, info, str(single), resolution=32, flip=True,
                    shard_size=4, batch_size=4, num_workers=0, progress=False)
    a, b = cache.data.with_format("numpy")[:], LatentCache(str(single)).data.with_format("numpy")[:]
    np.testing.assert_array_equal(a["moments"], b["moments"])
    np.testing.assert_array_equal(a["label"], b["label"])
