"""Images beside latents (data/source_images.py): the alignment teacher sees the very image each cached latent was
encoded from (same ADM crop, same flip), at its own resolution, and a resumed loader serves the same pairs."""
import json
import shutil

import numpy as np
import pytest
import torch
from data_helpers import make_clean_folder, save_tiny_vae

from maskdit_ds.config import load_config
from maskdit_ds.data import ResumableLoader, build_dataset
from maskdit_ds.data.latent_cache import LatentCache, encode_to_cache
from maskdit_ds.data.source_images import LatentsWithImages
from maskdit_ds.data.sources import ImageFolderSource
from maskdit_ds.data.transforms import to_tensor_pm1
from maskdit_ds.data.vae import encode_moments, load_vae
from maskdit_ds.errors import ConfigError


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    root = tmp_path_factory.mktemp("src")
    make_clean_folder(root / "img", classes=("a", "b"), per_class=5, size=(40, 52))
    vae, info = load_vae(save_tiny_vae(root / "vae", blocks=4), "fp32")  # x8: 32 px -> 4x4 latents
    encode_to_cache(ImageFolderSource(str(root / "img")), vae, info, str(root / "cache"), resolution=32, flip=True,
                    moments_dtype="float32", shard_size=4, batch_size=3, num_workers=0, progress=False)
    return root, vae


def test_each_image_is_the_one_its_latent_was_encoded_from(cache):
    root, vae = cache
    ds = LatentsWithImages(LatentCache(str(root / "cache")), resolution=32)
    assert len(ds) == 20 and ds.flip.sum() == 10  # every image and its flipped copy
    images = torch.stack([ds[i]["image"] for i in range(len(ds))])
    assert images.dtype == torch.uint8 and images.shape == (20, 3, 32, 32)
    # independent check: encoding the served image gives the cached moments (so crop and flip match)
    x = torch.stack([to_tensor_pm1(img.permute(1, 2, 0).numpy()) for img in images])
    with torch.no_grad():
        moments = encode_moments(vae, x)
    cached = torch.stack([ds[i]["x"] for i in range(len(ds))])
    assert torch.allclose(moments, cached, atol=1e-4)
    flipped = [i for i in range(20) if ds.flip[i]]
    twin = {int(ds.index[i]): i for i in range(20) if not ds.flip[i]}
    i = flipped[0]
    assert torch.equal(images[i], images[twin[int(ds.index[i])]].flip(-1))


def test_images_are_served_at_the_teacher_resolution_through_the_batched_read(cache):
    root, _ = cache
    ds = LatentsWithImages(LatentCache(str(root / "cache")), resolution=16)
    items = ds.__getitems__([3, 0, 7])
    assert [tuple(it["image"].shape) for it in items] == [(3, 16, 16)] * 3
    assert torch.equal(items[1]["image"], ds[0]["image"]) and torch.equal(items[0]["x"], ds[3]["x"])


def test_a_resumed_loader_serves_the_same_latents_labels_and_images(cache):
    root, _ = cache
    ds = LatentsWithImages(LatentCache(str(root / "cache")), resolution=16)
    whole = ResumableLoader(ds, 4, rank=0, world=1, seed=3)
    it = iter(whole)
    batches = [next(it) for _ in range(6)]  # crosses the epoch boundary (20 items, 5 batches)
    first = ResumableLoader(ds, 4, rank=0, world=1, seed=3)
    it = iter(first)
    for _ in range(2):
        next(it)
    resumed = ResumableLoader(ds, 4, rank=0, world=1, seed=3)
    resumed.load_state_dict(first.state_dict())
    it = iter(resumed)
    for expected in batches[2:]:
        got = next(it)
        assert all(torch.equal(got[k], expected[k]) for k in ("x", "y", "image"))


def test_build_dataset_adds_images_only_for_aligned_latent_runs(cache):
    root, _ = cache
    cfg = load_config("imagenet256", ["model.name=MaskDiT-T/2", "model.input_size=4", "data.resolution=32",
                                      f"data.path={root / 'cache'}"])
    assert "image" not in build_dataset(cfg.data, cfg.model)[0]
    item = build_dataset(cfg.data, cfg.model, images_at=16)[0]
    assert item["image"].shape == (3, 16, 16) and item["x"].shape == (8, 4, 4)


def test_moved_images_are_found_through_data_image_source_and_other_images_refused(cache, tmp_path):
    root, _ = cache
    moved = tmp_path / "moved"
    shutil.copytree(root / "img", moved)
    shutil.move(str(root / "img"), str(tmp_path / "away"))  # the recorded path no longer exists
    try:
        with pytest.raises(ConfigError, match="data.image_source: the images of latent cache"):
            LatentsWithImages(LatentCache(str(root / "cache")), 16)
        ds = LatentsWithImages(LatentCache(str(root / "cache")), 16, image_source=str(moved))
        assert ds[0]["image"].shape == (3, 16, 16)
        other = tmp_path / "other"
        make_clean_folder(other, classes=("a", "b"), per_class=6, size=(40, 52))
        with pytest.raises(ConfigError, match="is not the source latent cache .* was encoded from"):
            LatentsWithImages(LatentCache(str(root / "cache")), 16, image_source=str(other))
    finally:
        shutil.move(str(tmp_path / "away"), str(root / "img"))


def test_a_cache_without_a_recorded_source_is_refused(cache, tmp_path):
    root, _ = cache
    copy = tmp_path / "cache"
    shutil.copytree(root / "cache", copy)
    meta = copy / "meta.json"
    record = json.loads(meta.read_text())
    record["source"] = {"type": "maskdit_lmdb", "path": "/somewhere/latents.lmdb"}
    meta.write_text(json.dumps(record))
    with pytest.raises(ConfigError, match="records no image source"):
        LatentsWithImages(LatentCache(str(copy)), 16)
    assert np.asarray(LatentCache(str(copy)).labels()).shape == (20,)
