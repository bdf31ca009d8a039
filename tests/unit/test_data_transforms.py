"""ADM center crop, RGB conversion and [-1, 1] scaling against hand-checked cases."""

import numpy as np
import pytest
import torch
from PIL import Image

from maskdit_ds.data.transforms import adm_center_crop, adm_crop_resized, hflip, to_rgb, to_tensor_pm1


def _img(w, h, seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB")


@pytest.mark.parametrize("w,h,res,resized,box_steps", [
    (600, 400, 256, (384, 256), 0),     # short 400 < 512: bicubic only, 600 * 0.64 = 384
    (500, 333, 256, (384, 256), 0),     # 500 * 256 / 333 = 384.38 -> rounds to 384
    (1100, 520, 256, (542, 256), 1),    # 520 >= 512: box to 550x260, then 550 * 256 / 260 = 541.5 -> 542
    (300, 700, 512, (512, 1195), 0),    # portrait upscale: 700 * 512 / 300 = 1194.7 -> 1195
    (2100, 2050, 512, (525, 512), 2),   # 2050 -> 1025 (still >= 1024) -> 512: two halvings, then scale 1
    (5, 3, 256, (427, 256), 0),         # tiny: upscaled by the bicubic step, 5 * 256 / 3 = 426.7 -> 427
])
def test_adm_crop_matches_hand_computation(w, h, res, resized, box_steps):
    img = _img(w, h)
    # Redo ADM's recipe by hand, step by step, with the expected intermediate sizes.
    ref, steps = img, 0
    while min(ref.size) >= 2 * res:
        ref = ref.resize((ref.size[0] // 2, ref.size[1] // 2), Image.BOX)
        steps += 1
    assert steps == box_steps
    ref = ref.resize(resized, Image.BICUBIC)
    top, left = (resized[1] - res) // 2, (resized[0] - res) // 2
    want = np.asarray(ref)[top:top + res, left:left + res]
    got = adm_center_crop(img, res)
    assert got.shape == (res, res, 3) and got.dtype == np.uint8
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("w,h,res,out", [(512, 384, 256, 224), (1100, 520, 256, 224), (300, 700, 64, 40)])
def test_one_resize_of_the_crop_region_matches_crop_then_resize(w, h, res, out):
    # Smooth content (a random 12x9 picture upscaled): two bicubic passes and one differ only by resampling
    # rounding, well under 2 grey levels on average; a crop region off by one source pixel differs by more.
    img = _img(12, 9).resize((w, h), Image.BICUBIC)
    two_step = np.asarray(Image.fromarray(adm_center_crop(img, res)).resize((out, out), Image.BICUBIC))
    got = adm_crop_resized(img, res, out)
    assert got.shape == (out, out, 3) and got.dtype == np.uint8
    assert np.abs(got.astype(int) - two_step.astype(int)).mean() < 1.5
    np.testing.assert_array_equal(adm_crop_resized(img, res, res), adm_center_crop(img, res))


def test_two_x_too_large_is_box_downsampled_first():
    img = _img(1024, 1024)
    got = adm_center_crop(img, 512)
    # One box halving gives exactly 512: the bicubic step is then the identity.
    np.testing.assert_array_equal(got, np.asarray(img.resize((512, 512), Image.BOX)))
    direct = np.asarray(img.resize((512, 512), Image.BICUBIC))
    assert np.abs(got.astype(int) - direct.astype(int)).max() > 10  # a plain bicubic resize would differ


def test_rgb_conversion_of_other_modes():
    rng = np.random.default_rng(1)
    modes = {
        "L": Image.fromarray(rng.integers(0, 256, (9, 7), dtype=np.uint8), "L"),
        "CMYK": Image.fromarray(rng.integers(0, 256, (9, 7, 4), dtype=np.uint8), "CMYK"),
        "RGBA": Image.fromarray(rng.integers(0, 256, (9, 7, 4), dtype=np.uint8), "RGBA"),
        "P": _img(7, 9).convert("P"),
        "I;16": Image.fromarray(np.full((9, 7), 65535, dtype=np.uint16)),
    }
    for mode, img in modes.items():
        out = to_rgb(img)
        assert out.mode == "RGB" and out.size == (7, 9), mode
    gray = np.asarray(to_rgb(modes["L"]))
    np.testing.assert_array_equal(gray[..., 0], np.asarray(modes["L"]))
    assert np.asarray(to_rgb(modes["I;16"])).min() == 255  # 16-bit white stays white, not clipped garbage
    half = Image.fromarray(np.full((2, 2), 32768, dtype=np.uint16))
    assert abs(int(np.asarray(to_rgb(half))[0, 0, 0]) - 128) <= 1  # rescaled, not clipped to 255


def test_tensor_scaling_and_flip():
    arr = np.array([[[0, 255, 127]]], dtype=np.uint8)  # (1, 1, 3)
    x = to_tensor_pm1(arr)
    assert x.dtype == torch.float32 and x.shape == (3, 1, 1)
    torch.testing.assert_close(x.flatten(), torch.tensor([-1.0, 1.0, 127 / 127.5 - 1]))
    y = torch.arange(6.0).reshape(1, 2, 3)
    torch.testing.assert_close(hflip(y), torch.tensor([[[2.0, 1, 0], [5, 4, 3]]]))
