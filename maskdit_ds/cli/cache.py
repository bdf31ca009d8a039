"""Encode an image folder or Hugging Face dataset to a MaskDiT latent cache (VAE posterior moments), on every rank.

Launch (one shard of the work per rank; re-run the same command to resume after a kill):
  single process:  python -m maskdit_ds cache --source /data/imagenet --out /data/latents/in256 --vae /models/sd-vae
  workstation:     deepspeed --num_gpus 8 --module maskdit_ds cache --source /data/imagenet --out ... --vae ...
                   torchrun --nproc_per_node 8 -m maskdit_ds cache --source /data/imagenet --out ... --vae ...
  SLURM:           srun --ntasks 32 --gpus-per-task 1 --kill-on-bad-exit=1 python -m maskdit_ds cache ...
                   (rank/world come from SLURM_PROCID/SLURM_NTASKS; no process group is needed)
  array jobs:      python -m maskdit_ds cache ... --rank $SLURM_ARRAY_TASK_ID --world-size $SLURM_ARRAY_TASK_COUNT
Rank 0 waits for every shard, validates the cache and writes meta.json and skipped.jsonl.
"""

import json
import sys

from .. import dist
from ..data.latent_cache import encode_to_cache, rank_and_world
from ..data.sources import open_source
from ..data.vae import load_vae
from ..hardware import sampling_precision
from . import command, parser


def parse(argv=None):
    p = parser("cache", __doc__)
    p.add_argument("--source", required=True, help="image folder (<root>[/<split>]/<class>/<image>), a datasets "
                   "save_to_disk folder, or hf:<hub name> (e.g. hf:ILSVRC/imagenet-1k)")
    p.add_argument("--split", default="train", help="split (folder name or dataset split); default train")
    p.add_argument("--image-column", default=None, help="HF dataset image column (default: the Image feature)")
    p.add_argument("--label-column", default=None, help="HF dataset label column (default: the ClassLabel feature)")
    p.add_argument("--out", required=True, help="cache directory (created; resumed if it exists)")
    p.add_argument("--resolution", type=int, default=256, help="ADM center-crop size in pixels (256 or 512)")
    p.add_argument("--vae", required=True, help="diffusers AutoencoderKL folder, a hub id, or one original-layout "
                   "SD VAE file (.safetensors/.ckpt/.pth, e.g. U-ViT's autoencoder_kl.pth)")
    p.add_argument("--vae-subfolder", default=None, help="subfolder of --vae holding the VAE (e.g. vae)")
    p.add_argument("--vae-config", default=None, help="diffusers config folder for a single-file --vae "
                   "(default: the built-in SD KL-f8 config)")
    p.add_argument("--vae-dtype", default="auto", choices=("auto", "fp16", "bf16", "fp32"),
                   help="encoding precision; auto: bf16 on GPUs that have it (fp16 on older ones), fp32 on CPUs")
    p.add_argument("--moments-dtype", default="float16", choices=("float16", "float32"), help="storage dtype")
    p.add_argument("--flip", action="store_true", help="also store a horizontally flipped copy of every image")
    p.add_argument("--shard-size", type=int, default=4096, help="source images per Arrow shard (the resume unit)")
    p.add_argument("--batch-size", type=int, default=64, help="images per VAE forward")
    p.add_argument("--num-workers", type=int, default=8, help="decode/crop worker processes per rank")
    p.add_argument("--device", default="auto", help="auto = this rank's GPU (local rank modulo the visible GPUs, "
                   "so srun --gpus-per-task 1 works), else cpu")
    p.add_argument("--rank", type=int, default=None, help="override RANK / SLURM_PROCID")
    p.add_argument("--world-size", type=int, default=None, help="override WORLD_SIZE / SLURM_NTASKS")
    p.add_argument("--max-shards", type=int, default=None, help="stop after this many shards per rank (fit a time "
                   "limit; re-run to continue); the cache is validated only by a run that finishes")
    p.add_argument("--wait-timeout", type=float, default=None, help="seconds rank 0 waits for other ranks' shards")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on rank 0")
    return p.parse_args(argv)


@command
def main(argv=None) -> int:
    import datasets
    import torch

    args = parse(argv)
    datasets.disable_progress_bars()  # one bar (ours) per shard write is enough
    rank, world = rank_and_world(args.rank, args.world_size)
    device = dist.set_device() if args.device == "auto" else torch.device(args.device)
    if device.type == "cuda":  # bind it: otherwise every rank of a node also opens a context on GPU 0
        torch.cuda.set_device(device)
    device = str(device)
    args.vae_dtype = sampling_precision(args.vae_dtype)  # what ran is recorded in the cache
    if args.vae_dtype == "fp16" and device == "cpu":
        dist.say("[cache] note: fp16 VAE on CPU is slow or unsupported on some CPUs; consider --vae-dtype fp32")
    source = open_source(args.source, args.split, args.image_column, args.label_column)
    vae, vae_info = load_vae(args.vae, args.vae_dtype, device, args.vae_subfolder, args.vae_config)
    if rank == 0:  # --rank may override the launcher's rank (array jobs)
        dist.say(f"[cache] {len(source)} images, {len(source.label_names)} classes from {args.source}; world size "
                 f"{world}; VAE {vae_info['id']} ({args.vae_dtype}) on {device}")
    result = encode_to_cache(source, vae, vae_info, args.out, args.resolution, args.flip, args.moments_dtype,
                             args.shard_size, args.batch_size, args.num_workers, rank, world, args.max_shards,
                             args.wait_timeout, progress=not args.no_progress)
    meta = result.pop("meta", None)
    if meta is not None:
        result.update(count=meta["count"], num_skipped=meta["num_skipped"])
    print(f"[cache] rank {rank}: " + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
