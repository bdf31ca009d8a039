"""Fixtures for the data tests: a tiny AutoencoderKL folder and generated image folders with bad files."""

import os

import numpy as np
from PIL import Image

from maskdit_ds.dist import free_port  # noqa: F401 (tests import it from here)


def tiny_vae(blocks: int = 3):
    """A 0.95 M-parameter AutoencoderKL (x4 downsample with 3 blocks, x8 with 4), random but seeded."""
    import torch
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    ch = (32, 64, 64, 64)[:blocks]
    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, sample_size=32, layers_per_block=1,
                         norm_num_groups=32, down_block_types=("DownEncoderBlock2D",) * blocks,
                         up_block_types=("UpDecoderBlock2D",) * blocks, block_out_channels=ch,
                         scaling_factor=0.18215).eval()


def save_tiny_vae(path, blocks: int = 3) -> str:
    tiny_vae(blocks).save_pretrained(path)
    return str(path)


def _rgb(rng, h, w):
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB")


def make_clean_folder(root, classes=("cat", "dog"), per_class=5, size=(40, 48), seed=0) -> int:
    """root/<class>/<i>.png with random RGB images; returns the number of images."""
    rng = np.random.default_rng(seed)
    for c in classes:
        os.makedirs(os.path.join(root, c), exist_ok=True)
        for i in range(per_class):
            _rgb(rng, *size).save(os.path.join(root, c, f"{i:03d}.png"))
    return len(classes) * per_class


def make_messy_folder(root, seed=0) -> dict:
    """An image folder with good, convertible and broken files. Returns {"good": n converted or fine,
    "bad": {relative path: reason keyword}, "ignored": files that are not images by extension}."""
    rng = np.random.default_rng(seed)
    a, b = os.path.join(root, "a_class"), os.path.join(root, "b_class")
    os.makedirs(a)
    os.makedirs(os.path.join(b, "nested"))
    _rgb(rng, 40, 56).save(os.path.join(a, "rgb.JPEG"), quality=90)
    Image.fromarray(rng.integers(0, 256, (36, 36, 4), dtype=np.uint8), "CMYK").save(os.path.join(a, "cmyk.jpg"))
    Image.fromarray(rng.integers(0, 256, (50, 40), dtype=np.uint8), "L").save(os.path.join(a, "gray.png"))
    _rgb(rng, 5, 3).save(os.path.join(b, "tiny.png"))  # upscaled by the ADM bicubic step
    _rgb(rng, 40, 40).convert("P").save(os.path.join(b, "palette.png"))
    Image.fromarray(rng.integers(0, 256, (40, 40, 4), dtype=np.uint8), "RGBA").save(os.path.join(b, "nested", "rgba.png"))
    Image.fromarray(rng.integers(0, 65535, (33, 33), dtype=np.uint16)).save(os.path.join(b, "gray16.png"))
    with open(os.path.join(a, "garbage.jpg"), "wb") as f:
        f.write(b"this is not an image at all")
    _rgb(rng, 64, 64).save(os.path.join(b, "full.jpg"), quality=95)
    data = open(os.path.join(b, "full.jpg"), "rb").read()
    with open(os.path.join(b, "truncated.jpg"), "wb") as f:
        f.write(data[: len(data) // 2])
    open(os.path.join(b, "empty.png"), "wb").close()
    with open(os.path.join(b, "notes.txt"), "w") as f:
        f.write("not an image extension: ignored like torchvision does")
    bad = {"a_class/garbage.jpg": "UnidentifiedImageError", "b_class/truncated.jpg": "truncated",
           "b_class/empty.png": "UnidentifiedImageError"}
    return {"good": 8, "bad": bad, "total": 11}


def sd_layout_state_dict(vae) -> dict:
    """diffusers AutoencoderKL state dict -> the original LDM/SD key layout (what from_single_file reads).
    Written for the tiny test VAE; mirrors diffusers' own DIFFUSERS_TO_LDM mapping in reverse."""
    import re

    n_up = len(vae.config.block_out_channels)
    out = {}
    for k, v in vae.state_dict().items():
        k2 = k
        k2 = re.sub(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)", r"encoder.down.\1.block.\2", k2)
        k2 = re.sub(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0", r"encoder.down.\1.downsample", k2)
        k2 = re.sub(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)",
                    lambda m: f"decoder.up.{n_up - 1 - int(m[1])}.block.{m[2]}", k2)
        k2 = re.sub(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0",
                    lambda m: f"decoder.up.{n_up - 1 - int(m[1])}.upsample", k2)
        k2 = re.sub(r"mid_block\.resnets\.(\d+)", lambda m: f"mid.block_{int(m[1]) + 1}", k2)
        k2 = k2.replace("mid_block.attentions.0", "mid.attn_1")
        for a, b in (("group_norm", "norm"), ("to_q", "q"), ("to_k", "k"), ("to_v", "v"), ("to_out.0", "proj_out")):
            k2 = k2.replace(f"attn_1.{a}.", f"attn_1.{b}.")
        k2 = k2.replace("conv_shortcut", "nin_shortcut").replace("conv_norm_out", "norm_out")
        if re.search(r"attn_1\.(q|k|v|proj_out)\.weight", k2):
            v = v[:, :, None, None]  # the original attention uses 1x1 convolutions
        out[k2] = v.contiguous()
    return out
