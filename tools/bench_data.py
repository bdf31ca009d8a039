"""Data pipeline throughput: VAE encode images/s (decode + ADM crop + encode + Arrow write) and latent-cache
loader samples/s, on a generated image folder. Prints one JSON line; see docs/bench_data.md.

  python tools/bench_data.py                                  # tiny VAE, 32 px, CPU
  python tools/bench_data.py --vae /models/sd-vae-ft-mse --resolution 256 --device cuda --images 4096
  python tools/bench_data.py --resolution 256 --teacher-resolution 224 --loader-batch 64 --loader-workers 1
"""

import argparse
import json
import os
import sys
import tempfile

try:
    import maskdit_ds  # noqa: F401
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np
import torch
from PIL import Image

from maskdit_ds.data.latent_cache import LatentCache, encode_to_cache, sample_latent
from maskdit_ds.data.source_images import LatentsWithImages
from maskdit_ds.data.sources import ImageFolderSource
from maskdit_ds.data.vae import encode_moments, load_vae
from maskdit_ds.timing import interleave, time_calls


def make_images(root: str, n: int, resolution: int, classes: int = 10) -> None:
    """JPEGs 1.5x the crop size (so the ADM resize does real work), spread over `classes` folders."""
    rng = np.random.default_rng(0)
    side = int(resolution * 1.5)
    for i in range(n):
        d = os.path.join(root, f"class{i % classes:03d}")
        os.makedirs(d, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (side, side + side // 3, 3), dtype=np.uint8)).save(
            os.path.join(d, f"{i:06d}.jpg"), quality=90)


def tiny_vae_folder(path: str) -> str:
    from diffusers import AutoencoderKL

    AutoencoderKL(latent_channels=4, layers_per_block=1, norm_num_groups=32, block_out_channels=(32, 64, 64, 64),
                  down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                  scaling_factor=0.18215).save_pretrained(path)
    return path


def bench_vae_only(vae, resolution, batch_size, device, repeats=5) -> float:
    x = torch.rand(batch_size, 3, resolution, resolution, device=device) * 2 - 1
    times = interleave({"encode": lambda: encode_moments(vae, x)}, rounds=1, repeats=repeats, warmup=1)["encode"]
    return batch_size * repeats / sum(times)


def bench_loader(cache, batch_size, workers, batches) -> dict:
    loader = torch.utils.data.DataLoader(cache, batch_size=batch_size, shuffle=True, num_workers=workers,
                                         drop_last=True, persistent_workers=workers > 0)
    epoch = iter(loader)

    def next_batch():
        nonlocal epoch
        try:
            batch = next(epoch)
        except StopIteration:
            epoch = iter(loader)
            batch = next(epoch)
        sample_latent(batch["x"])

    # The first call starts the workers: excluded from the timing.
    seconds = sum(time_calls(next_batch, batches + 1)[1:])
    return {"loader_samples_per_s": batches * batch_size / seconds, "loader_batch": batch_size,
            "loader_workers": workers}


def main(argv=None) -> int:
    import datasets

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=512)
    p.add_argument("--resolution", type=int, default=64)
    p.add_argument("--vae", default=None, help="VAE spec (default: a tiny random 4-block AutoencoderKL, x8)")
    p.add_argument("--vae-dtype", default="fp32", choices=("fp16", "bf16", "fp32"))
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--num-workers", type=int, default=1, help="decode workers for encoding")
    p.add_argument("--flip", action="store_true")
    p.add_argument("--loader-batch", type=int, default=256)
    p.add_argument("--loader-workers", type=int, default=1)
    p.add_argument("--loader-batches", type=int, default=50)
    p.add_argument("--teacher-resolution", type=int, default=0,
                   help="also time the loader serving each latent's source image at this size (alignment)")
    p.add_argument("--workdir", default=None, help="where to put images and the cache (default: a temp dir)")
    args = p.parse_args(argv)
    datasets.disable_progress_bars()
    with tempfile.TemporaryDirectory() as tmp:
        work = args.workdir or tmp
        make_images(os.path.join(work, "images"), args.images, args.resolution)
        spec = args.vae or tiny_vae_folder(os.path.join(work, "tiny_vae"))
        vae, info = load_vae(spec, args.vae_dtype, args.device)
        result = {"device": args.device, "torch_threads": torch.get_num_threads(), "resolution": args.resolution,
                  "vae": "tiny 4-block (random)" if args.vae is None else info["id"], "vae_dtype": args.vae_dtype,
                  "images": args.images, "batch_size": args.batch_size, "decode_workers": args.num_workers}
        result["vae_encode_only_images_per_s"] = bench_vae_only(vae, args.resolution, args.batch_size, args.device)
        out = os.path.join(work, "cache")
        source, written = ImageFolderSource(os.path.join(work, "images")), {}

        def encode():
            written.update(encode_to_cache(source, vae, info, out, args.resolution, args.flip, "float16",
                                           shard_size=1024, batch_size=args.batch_size,
                                           num_workers=args.num_workers, rank=0, world_size=1, progress=False))

        [seconds] = time_calls(encode, 1)
        result["cache_images_per_s"] = written["images_per_s"]  # decode + crop + encode + shard writes
        result["cache_seconds_with_validation"] = seconds
        result.update(bench_loader(LatentCache(out), args.loader_batch, args.loader_workers, args.loader_batches))
        if args.teacher_resolution:  # alignment: each latent's source image beside it, at the teacher's size
            beside = LatentsWithImages(LatentCache(out), args.teacher_resolution)
            images = bench_loader(beside, args.loader_batch, args.loader_workers, args.loader_batches)
            result["loader_with_images_samples_per_s"] = images["loader_samples_per_s"]
            result["teacher_resolution"] = args.teacher_resolution
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
