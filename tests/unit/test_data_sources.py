"""Image sources: a messy image folder and a Hugging Face dataset on disk, cached and read back."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from data_helpers import make_clean_folder, make_messy_folder, save_tiny_vae
from maskdit_ds.data.latent_cache import LatentCache, encode_to_cache
from maskdit_ds.data.sources import HFImageSource, ImageDataset, ImageFolderSource, open_source
from maskdit_ds.data.transforms import adm_center_crop, to_tensor_pm1
from maskdit_ds.data.vae import encode_moments, load_vae


@pytest.fixture(scope="module")
def vae(tmp_path_factory):
    return load_vae(save_tiny_vae(tmp_path_factory.mktemp("vae") / "tiny"), "fp32")


def test_messy_folder_converts_or_skips_and_lists(tmp_path, vae):
    expect = make_messy_folder(tmp_path / "img")
    src = open_source(str(tmp_path / "img"))
    assert isinstance(src, ImageFolderSource)
    assert src.label_names == ["a_class", "b_class"] and len(src) == expect["total"]  # notes.txt is not an image
    assert "b_class/nested/rgba.png" in src.files and src.label(src.files.index("b_class/nested/rgba.png")) == 1
    result = encode_to_cache(src, *vae, str(tmp_path / "cache"), resolution=32, flip=True, shard_size=4,
                             batch_size=3, num_workers=0, progress=False)
    assert result["status"] == "complete" and result["encoded"] == expect["good"]
    meta = result["meta"]
    assert meta["count"] == expect["good"] * 2 and meta["num_skipped"] == len(expect["bad"])
    skipped = [json.loads(line) for line in open(tmp_path / "cache" / "skipped.jsonl")]
    assert {s["name"] for s in skipped} == set(expect["bad"])
    for s in skipped:
        assert expect["bad"][s["name"]] in s["reason"] and src.files[s["index"]] == s["name"]
    cache = LatentCache(str(tmp_path / "cache"))
    assert len(cache) == meta["count"]
    names = {src.files[i] for i in cache.data.with_format(None)["index"]}
    assert names == set(src.files) - set(expect["bad"])  # CMYK, gray, 16-bit, palette, RGBA and tiny all kept
    assert cache.meta["label_names"] == ["a_class", "b_class"] and cache.meta["flip"] is True


def test_image_dataset_pixels_and_bad_image_fallback(tmp_path):
    make_messy_folder(tmp_path / "img")
    src = ImageFolderSource(str(tmp_path / "img"))
    ds = ImageDataset(src, 32)
    assert ds.labels().tolist() == src.labels and len(ImageDataset(str(tmp_path / "img"), 32)) == len(src)
    item = ds[src.files.index("a_class/cmyk.jpg")]
    assert item["x"].shape == (3, 32, 32) and item["x"].dtype == torch.float32 and item["y"].dtype == torch.int64
    assert -1.0 <= item["x"].min() and item["x"].max() <= 1.0
    with pytest.warns(UserWarning, match="garbage.jpg"):
        item = ds[src.files.index("a_class/garbage.jpg")]  # replaced by the next image, gray.png
    expect = to_tensor_pm1(adm_center_crop(Image.open(tmp_path / "img" / "a_class" / "gray.png"), 32))
    torch.testing.assert_close(item["x"], expect)


def _hf_dataset(path, n=6):
    import datasets

    rng = np.random.default_rng(3)
    images = [Image.fromarray(rng.integers(0, 256, (24 + 4 * i, 40, 3), dtype=np.uint8)) for i in range(n)]
    feats = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["x", "y", "z"]),
                               "extra": datasets.Value("string")})
    ds = datasets.Dataset.from_dict({"image": images, "label": [i % 3 for i in range(n)], "extra": ["e"] * n}, features=feats)
    ds = ds.cast_column("image", datasets.Image(decode=False))
    rows = ds.to_dict()
    rows["image"][2] = {"bytes": b"not a png", "path": None}  # one undecodable row
    datasets.Dataset.from_dict(rows, features=ds.features).cast_column("image", datasets.Image()).save_to_disk(str(path))
    return images


def test_hf_dataset_on_disk_as_source(tmp_path, vae):
    images = _hf_dataset(tmp_path / "hf")
    src = open_source(str(tmp_path / "hf"))
    assert isinstance(src, HFImageSource)
    assert (src.image_column, src.label_column, src.label_names) == ("image", "label", ["x", "y", "z"])
    assert ImageDataset(src, 32).labels().tolist() == [0, 1, 2, 0, 1, 2]
    result = encode_to_cache(src, *vae, str(tmp_path / "cache"), resolution=32, shard_size=4, batch_size=2,
                             num_workers=0, moments_dtype="float32", progress=False)
    assert result["meta"]["count"] == 5 and result["meta"]["num_skipped"] == 1
    assert json.loads(open(tmp_path / "cache" / "skipped.jsonl").readline())["index"] == 2
    cache = LatentCache(str(tmp_path / "cache"))
    assert cache.meta["source"]["type"] == "hf_dataset" and cache.meta["label_names"] == ["x", "y", "z"]
    # Row 0 of the cache is source image 0; its moments equal a direct encode of the ADM crop.
    x = to_tensor_pm1(adm_center_crop(images[0], 32))[None]
    torch.testing.assert_close(cache[0]["x"], encode_moments(vae[0], x)[0], rtol=0, atol=1e-5)  # batch-size rounding only
    assert [int(cache[i]["y"]) for i in range(len(cache))] == [0, 1, 0, 1, 2]


def test_source_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        open_source(str(tmp_path / "missing"))
    (tmp_path / "flat").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "flat" / "a.png")
    with pytest.raises(ValueError, match="no class sub-folders"):
        open_source(str(tmp_path / "flat"))
    make_clean_folder(tmp_path / "root" / "train", per_class=1)
    assert open_source(str(tmp_path / "root")).root.name == "train"  # root/<split>/ is picked up
