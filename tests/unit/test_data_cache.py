"""Latent cache: resume after a stop, idempotent re-runs, validation, the reader contract, sample_latent, VAE loading."""

import json
import math
import os

import numpy as np
import pytest
import safetensors.torch
import torch

from data_helpers import make_clean_folder, save_tiny_vae, sd_layout_state_dict, tiny_vae
from maskdit_ds.data.latent_cache import (LatentCache, encode_to_cache, finalize_cache, make_plan, prepare_cache,
                                          sample_latent, shard_name, write_shard)
from maskdit_ds.data.sources import ImageFolderSource
from maskdit_ds.data.transforms import adm_center_crop, to_tensor_pm1
from maskdit_ds.data.vae import encode_moments, load_vae

ARGS = dict(resolution=32, shard_size=4, batch_size=3, num_workers=0, progress=False)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    make_clean_folder(root / "img", classes=("a", "b", "c"), per_class=4)  # 12 images -> 3 shards of 4
    vae, info = load_vae(save_tiny_vae(root / "vae"), "fp32")
    full = root / "full"
    result = encode_to_cache(ImageFolderSource(str(root / "img")), vae, info, str(full), **ARGS)
    assert result["status"] == "complete"
    return root, ImageFolderSource(str(root / "img")), vae, info, full


def _shard_stats(path):
    d = os.path.join(path, "shards")
    return {name: (os.stat(os.path.join(d, name)).st_ino, os.stat(os.path.join(d, name)).st_mtime_ns)
            for name in sorted(os.listdir(d))}


def _table(path):
    return LatentCache(str(path)).data.with_format("numpy")[:]


def test_stop_and_resume_redoes_nothing_and_equals_uninterrupted(setup, tmp_path):
    _, src, vae, info, full = setup
    out = str(tmp_path / "resumed")
    first = encode_to_cache(src, vae, info, out, max_shards=1, **ARGS)
    assert first["status"] == "partial" and first["encoded"] == 4
    assert sorted(os.listdir(os.path.join(out, "shards"))) == [shard_name(0)]
    with pytest.raises(ValueError, match="incomplete .1 of 3 shards"):
        LatentCache(out)
    before = _shard_stats(out)
    os.makedirs(os.path.join(out, "shards", f".tmp-{shard_name(1)}-12345"))  # a shard half-written when killed
    second = encode_to_cache(src, vae, info, out, **ARGS)
    assert second["status"] == "complete" and second["encoded"] == 8 and second["shards_written"] == 2
    after = _shard_stats(out)
    assert after[shard_name(0)] == before[shard_name(0)]  # the finished shard was not rewritten
    assert sorted(after) == [shard_name(k) for k in range(3)]  # the stale temp dir is gone
    a, b = _table(out), _table(full)
    for col in ("moments", "label"):
        np.testing.assert_array_equal(a[col], b[col])
    meta_a, meta_b = (json.load(open(os.path.join(p, "meta.json"))) for p in (out, full))
    assert meta_a == meta_b


def test_rerun_over_finished_cache_does_nothing(setup):
    _, src, vae, info, full = setup
    before = _shard_stats(full), os.stat(full / "meta.json").st_mtime_ns
    again = encode_to_cache(src, vae, info, str(full), **ARGS)
    assert again["status"] == "complete" and again["encoded"] == 0
    assert (_shard_stats(full), os.stat(full / "meta.json").st_mtime_ns) == before


def test_other_settings_into_same_dir_are_refused(setup):
    _, src, vae, info, full = setup
    with pytest.raises(ValueError, match="resolution: cache has 32, now 64"):
        encode_to_cache(src, vae, info, str(full), **dict(ARGS, resolution=64))


def test_reader_contract_and_meta(setup):
    _, src, vae, info, full = setup
    cache = LatentCache(str(full))
    assert len(cache) == 12
    item = cache[5]
    assert set(item) == {"x", "y"} and item["x"].dtype == torch.float32 and item["x"].shape == (8, 8, 8)
    assert item["y"].dtype == torch.int64 and int(item["y"]) == 1
    m = cache.meta
    assert (m["resolution"], m["latent_channels"], m["latent_size"], m["crop"]) == (32, 4, 8, "adm_center")
    assert m["moments_dtype"] == "float16" and m["count"] == 12 and m["copies"] == 1 and m["flip"] is False
    assert m["vae"]["sha256"] == info["sha256"] and m["vae"]["hash_of"] == "file" and m["label_names"] == ["a", "b", "c"]
    assert m["source"]["fingerprint"] == src.describe()["fingerprint"]
    batch = next(iter(torch.utils.data.DataLoader(cache, batch_size=5, shuffle=False)))  # via __getitems__
    torch.testing.assert_close(batch["x"][3], cache[3]["x"])
    assert batch["y"].tolist() == [0, 0, 0, 0, 1]
    assert cache.labels().dtype == torch.int64 and cache.labels().tolist() == [0] * 4 + [1] * 4 + [2] * 4
    # Stored moments are the float16 rounding of a fresh encode of the same crop.
    assert cache.data.with_format(None)[0]["index"] == 0
    fresh = encode_moments(vae, to_tensor_pm1(adm_center_crop(src.load(0), 32))[None])[0]
    torch.testing.assert_close(cache[0]["x"], fresh.half().float(), rtol=0, atol=2e-3)  # one fp16 ulp near 1


def test_check_compatible(setup):
    cache = LatentCache(str(setup[4]))
    cache.check_compatible(32, 4)
    with pytest.raises(ValueError, match="resolution 256") as e:
        cache.check_compatible(256, 4)
    assert str(setup[4]) in str(e.value) and "32 px" in str(e.value)
    with pytest.raises(ValueError, match="with 16 latent channels"):
        cache.check_compatible(32, 16)


def test_validation_rejects_nan_and_bad_labels(setup, tmp_path):
    _, src, _, info, _ = setup
    plan = make_plan(src, info, 32, False, "float32", shard_size=12)
    for case in ("nan", "label"):
        out = str(tmp_path / case)
        prepare_cache(out, plan)
        m = np.zeros((12, 8, 8, 8), np.float32)
        labels = np.zeros(12, np.int64)
        if case == "nan":
            m[7, 2, 3, 4] = np.nan
        else:
            labels[3] = 3  # 3 classes -> labels must be < 3
        write_shard(out, 0, plan, m, labels, range(12), np.zeros(12, bool), skipped=[])
        with pytest.raises(ValueError, match=r"source index 7\) has NaN" if case == "nan" else r"outside \[0, 3\)"):
            finalize_cache(out, plan)


def test_sample_latent_statistics_scale_and_fresh_draws():
    mean = torch.tensor([1.0, -2.0, 0.5, 0.0]).view(1, 4, 1, 1).expand(4096, 4, 4, 4)
    std = torch.tensor([0.5, 2.0, 1.0, 0.1]).view(1, 4, 1, 1).expand_as(mean)
    moments = torch.cat([mean, (std ** 2).log()], 1).half()  # stored as float16
    g = torch.Generator().manual_seed(0)
    z = sample_latent(moments, g)
    assert z.shape == (4096, 4, 4, 4) and z.dtype == torch.float32
    torch.testing.assert_close(z.mean((0, 2, 3)), torch.tensor([1.0, -2.0, 0.5, 0.0]) * 0.18215, atol=0.01, rtol=0)
    torch.testing.assert_close(z.std((0, 2, 3)), torch.tensor([0.5, 2.0, 1.0, 0.1]) * 0.18215, atol=0.0, rtol=0.03)
    assert not torch.equal(z, sample_latent(moments, g))  # every step a fresh draw
    assert torch.equal(sample_latent(moments, torch.Generator().manual_seed(0)), z)  # but reproducible by seed
    big = torch.cat([torch.zeros(20000, 1), torch.full((20000, 1), 100.0)], 1)[..., None, None]
    assert math.isclose(sample_latent(big, scale=1.0).std().item(), math.exp(10), rel_tol=0.05)  # logvar clamped at 20
    tiny = torch.cat([torch.zeros(1, 1), torch.full((1, 1), -1e4)], 1)[..., None, None]
    assert sample_latent(tiny).abs().max() < 1e-6  # clamped at -30, not exp(-5000) underflow to NaN


def test_vae_single_file_and_dtypes(tmp_path):
    base = tiny_vae()
    folder = save_tiny_vae(tmp_path / "diffusers")
    safetensors.torch.save_file(sd_layout_state_dict(base), str(tmp_path / "sd_vae.safetensors"))
    single, info = load_vae(str(tmp_path / "sd_vae.safetensors"), "fp32", config=folder)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    torch.testing.assert_close(encode_moments(single, x), encode_moments(base, x), rtol=0, atol=0)
    assert info["hash_of"] == "file" and info["id"].endswith("sd_vae.safetensors") and info["downsample"] == 4
    bf16, info = load_vae(folder, "bf16")
    assert bf16.dtype == torch.bfloat16 and info["dtype"] == "bf16"
    m = encode_moments(bf16, x)
    assert m.dtype == torch.float32 and (m - encode_moments(base, x)).abs().max() < 0.1
    with pytest.raises(ValueError, match="VAE dtype"):
        load_vae(folder, "fp8")
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_vae(str(tmp_path))
