"""ADM-protocol evaluation (IS, FID, sFID, precision, recall) of a sample .npz against a reference batch.

Evaluate (prints ADM's five lines; JSON with hashes, counts and protocol via --out):
  python -m maskdit_ds eval samples.npz VIRTUAL_imagenet256_labeled.npz --weights pt_inception-2015-12-05-6726825d.pth \
      --out metrics.json [--device cuda] [--batch-size 200] [--num-samples 50000]
Build a reference batch for a new dataset (arr_0 = first --keep images; stats over all images):
  python -m maskdit_ds eval ref --images /data/val_folder_or_real.npz --out REF.npz --weights ... [--resolution 256]
Weights: pt_inception-2015-12-05-6726825d.pth (95,628,359 bytes, sha256 6726825d...29b2), verified before use;
--download-weights fetches it on machines with internet.
"""

import argparse
import json
import sys
from pathlib import Path

import torch

from .. import io
from ..errors import InputError
from ..evaluation import (PT_INCEPTION_SHA256, build_extractor, build_reference, download_weights, evaluate_npz,
                          format_report)
from . import command, parser


def add_common(p: argparse.ArgumentParser):
    p.add_argument("--weights", help="pt_inception-2015-12-05-6726825d.pth")
    p.add_argument("--download-weights", action="store_true", help="download the weights to ~/.cache/maskdit_ds")
    p.add_argument("--weights-sha256", default=PT_INCEPTION_SHA256,
                   help="expected sha256, only to use CUSTOM weights (default: the pytorch-fid file)")
    p.add_argument("--no-verify-weights", action="store_true", help="skip the hash check (custom weights only)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch-size", type=int, default=200, help="images per Inception forward")
    p.add_argument("--no-progress", action="store_true")


def parse_eval(argv):
    p = parser("eval", __doc__)
    p.add_argument("samples", help=".npz with arr_0 uint8 (N, H, W, 3)")
    p.add_argument("ref", help="reference batch .npz (arr_0 plus optional mu, sigma, mu_s, sigma_s)")
    p.add_argument("--out", help="write the metrics JSON here")
    p.add_argument("--num-samples", type=int, help="use the first N samples (error if the file has fewer)")
    p.add_argument("--cache-dir", help="reference activation cache (default: next to the reference file)")
    p.add_argument("--no-cache", action="store_true", help="neither read nor write the reference cache")
    p.add_argument("--pr-distance", choices=["adm-fp16", "fp32"], default="adm-fp16",
                   help="precision/recall distance blocks: ADM's float16 (default) or float32")
    p.add_argument("--fid-method", choices=["sqrtm", "eigh"], default="sqrtm",
                   help="tr sqrt(S_s S_r): ADM's scipy sqrtm (default) or the faster symmetric-eigh route")
    add_common(p)
    return p.parse_args(argv)


def parse_ref(argv):
    p = parser("eval ref", "Build an ADM-format reference batch.")
    p.add_argument("--images", required=True, help="folder of images (recursive) or .npz with arr_0 uint8 NHWC")
    p.add_argument("--out", required=True, help="reference .npz to write")
    p.add_argument("--resolution", type=int, help="ADM centre crop of every image to this size")
    p.add_argument("--keep", type=int, default=10_000, help="images stored in arr_0 for precision/recall")
    p.add_argument("--workers", type=int, default=8, help="image decoding threads")
    add_common(p)
    return p.parse_args(argv)


def extractor_from(args):
    if not args.weights and not args.download_weights:
        raise InputError("pass --weights PATH (or --download-weights on a machine with internet)")
    weights = args.weights or download_weights()
    expected = None if args.no_verify_weights else args.weights_sha256
    return build_extractor(weights, args.device, args.batch_size, expected_sha256=expected)


def training_record(samples: str) -> dict:
    """{"training": {run, step, images_seen, device_hours}} from the samples.json that `sample` wrote beside the
    .npz, so that a metrics file says what the model cost to train; {} for samples from elsewhere."""
    beside = Path(samples).with_suffix(".json")
    if not beside.is_file():
        return {}
    try:
        record = json.loads(beside.read_text()).get("training")
    except (ValueError, AttributeError):
        return {}
    return {"training": record} if isinstance(record, dict) else {}


@command
def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["ref"]:
        args = parse_ref(argv[1:])
        out = build_reference(args.images, args.out, extractor_from(args), args.resolution, args.keep,
                              args.workers, progress=not args.no_progress)
        print(f"wrote reference batch {out}")
        return 0
    args = parse_eval(argv)
    extractor = extractor_from(args)
    metrics = evaluate_npz(args.samples, args.ref, extractor, args.num_samples, args.cache_dir,
                           use_cache=not args.no_cache, pr_mode=args.pr_distance, fid_method=args.fid_method,
                           progress=not args.no_progress)
    metrics.update(training_record(args.samples))
    print(format_report(metrics))
    if "training" in metrics:
        print(f"trained: {json.dumps(metrics['training'])}")
    if args.out:
        io.atomic_write_text(Path(args.out), json.dumps(metrics, indent=2))  # report reads it: never torn
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
