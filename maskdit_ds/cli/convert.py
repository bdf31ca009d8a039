"""Convert checkpoints into maskdit_ds export folders (config.json + model.safetensors), and reshard runs.

  ZeRO tag of a run:     python -m maskdit_ds convert zero runs/x/checkpoints/step_0100000 --out exp/x
  MaskDiT release:       python -m maskdit_ds convert paper imagenet256-guidance.pt --out exp/maskdit256
  DiT release (encoder): python -m maskdit_ds convert dit DiT-XL-2-256x256.pt --out exp/dit_init
  Hub folder / upload:   python -m maskdit_ds convert hub exp/x --out hub/x
                         python -m maskdit_ds convert push hub/x --repo-id me/maskdit-xl2
  New world size:        python -m maskdit_ds convert reshard runs/x/checkpoints/step_0100000 --world-size 4
Foreign .pt files are read with torch.load(weights_only=True) and argparse.Namespace as the only extra type;
a pickle that carries code is refused. See docs/checkpoints.md for the key mappings.
"""

import argparse
import sys

from .. import convert
from . import command, parser


def parse(argv=None) -> argparse.Namespace:
    p = parser("convert", __doc__)
    sub = p.add_subparsers(dest="command", required=True)

    z = sub.add_parser("zero", help="a ZeRO checkpoint tag of our runs -> export folder(s)")
    z.add_argument("tag_dir", help="<run_dir>/checkpoints/step_XXXXXXX")
    z.add_argument("--out", required=True)
    z.add_argument("--weights", default="ema", choices=("ema", "model", "both"),
                   help="ema (default), the consolidated fp32 model weights, or both (out/ema and out/model)")

    for name, text in (("paper", "the MaskDiT paper's released .pt -> export folder"),
                       ("dit", "DiT's released .pt -> export folder with DiT as MaskDiT's encoder")):
        r = sub.add_parser(name, help=text, aliases=["reference"] if name == "paper" else [])
        r.add_argument("file", help=".pt (or .safetensors) file")
        r.add_argument("--out", required=True)
        r.add_argument("--use", default="ema", choices=("ema", "model"), help="entry of a training checkpoint")
        r.add_argument("--model", default=None, help="registry name, e.g. MaskDiT-XL/2 (default: from shapes)")
        r.add_argument("--input-size", type=int, default=None, help="latent size (default: from pos_embed)")
        if name == "dit":
            r.add_argument("--seed", type=int, default=0, help="seed of the fresh decoder initialisation")

    h = sub.add_parser("hub", help="export folder or run dir -> self-contained Hub folder with a model card")
    h.add_argument("source")
    h.add_argument("--out", required=True)
    h.add_argument("--title", default="")

    u = sub.add_parser("push", help="upload a Hub folder with huggingface_hub (needs network and a token)")
    u.add_argument("folder")
    u.add_argument("--repo-id", required=True)
    u.add_argument("--private", action="store_true")
    u.add_argument("--token", default=None, help="default: the cached login / HF_TOKEN")

    s = sub.add_parser("reshard", help="a tag saved on N ranks -> <tag>/universal for M ranks")
    s.add_argument("tag_dir")
    s.add_argument("--world-size", type=int, required=True)
    s.add_argument("--workers", type=int, default=1, help="ds_to_universal extract/merge processes")
    return p.parse_args(argv)


@command
def main(argv=None) -> int:
    args = parse(argv)
    if args.command == "zero":
        convert.convert_zero(args.tag_dir, args.out, args.weights)
    elif args.command in ("paper", "reference"):
        convert.convert_paper(args.file, args.out, args.use, args.model, args.input_size)
    elif args.command == "dit":
        convert.convert_dit(args.file, args.out, args.use, args.model, args.input_size, args.seed)
    elif args.command == "hub":
        convert.make_hub_folder(args.source, args.out, args.title)
    elif args.command == "push":
        convert.push_to_hub(args.folder, args.repo_id, args.private, args.token)
    elif args.command == "reshard":
        from ..training.checkpoint.reshard import reshard  # imports deepspeed: only for this command

        reshard(args.tag_dir, args.world_size, args.workers)
    return 0


if __name__ == "__main__":
    sys.exit(main())
