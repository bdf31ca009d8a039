"""Convert the public MaskDiT latent releases into a maskdit_ds latent cache.

  256 px LMDB:       python -m maskdit_ds import-latents --reference /data/maskdit/imagenet256-latents --out /data/latents/ref256
  512 px WebDataset: python -m maskdit_ds import-latents --reference '/data/maskdit/latent_512/*.tar' --out /data/latents/ref512
Pickled .latent/.cls members are read with a restricted unpickler (numpy arrays only); anything else is refused.
Re-running the same command resumes at the first missing shard.
"""

import json
import sys

from ..data.release_import import import_release, open_release
from . import command, parser


def parse(argv=None):
    p = parser("import-latents", __doc__)
    p.add_argument("--reference", required=True, nargs="+", help="LMDB folder, or tar files / folders / globs")
    p.add_argument("--out", required=True, help="cache directory to create (or resume)")
    p.add_argument("--resolution", type=int, default=None, help="default: latent size x 8")
    p.add_argument("--num-classes", type=int, default=1000)
    p.add_argument("--moments-dtype", default="float32", choices=("float16", "float32"))
    p.add_argument("--shard-size", type=int, default=4096)
    p.add_argument("--vae-id", default=None, help="record which VAE made the release, if known")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


@command
def main(argv=None) -> int:
    import datasets

    args = parse(argv)
    datasets.disable_progress_bars()
    ref = args.reference[0] if len(args.reference) == 1 else args.reference
    result = import_release(open_release(ref), args.out, args.resolution, args.num_classes, args.moments_dtype,
                            args.shard_size, args.vae_id, progress=not args.no_progress)
    meta = result.pop("meta")
    print(json.dumps(dict(result, count=meta["count"], resolution=meta["resolution"])), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
