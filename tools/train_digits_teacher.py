"""Train a small vision transformer on the built-in digits, to serve as the representation-alignment teacher of
the CPU demonstration (docs/alignment.md).

It is a transformers Dinov2 model (8x8 grey images, 2x2 patches: the denoiser's 4x4 token grid), trained as a
classifier on 80% of the digits; its patch features therefore carry what separates the classes. The backbone
(without the classification head) and its input normalisation are saved with save_pretrained, so training loads
it exactly as it loads facebook/dinov2-base: loss.align_teacher=<out>.

  python tools/train_digits_teacher.py --out runs/digits_teacher
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

try:
    import maskdit_ds  # noqa: F401
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch
import torch.nn.functional as F

from maskdit_ds.data.digits import load_digits_arrays, upscale


def build(width: int, depth: int, heads: int):
    from transformers import Dinov2Config, Dinov2ForImageClassification

    config = Dinov2Config(image_size=8, patch_size=2, num_channels=1, hidden_size=width, num_hidden_layers=depth,
                          num_attention_heads=heads, intermediate_size=4 * width, num_labels=10,
                          hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return Dinov2ForImageClassification(config)


def split(seed: int, held_out: float = 0.2):
    """(train x, train y, test x, test y): images (N, 1, 8, 8) in [-1, 1], a seeded 80/20 split."""
    images, labels = load_digits_arrays()
    x, y = upscale(torch.from_numpy(images), 8), torch.from_numpy(labels)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    cut = int(len(y) * (1 - held_out))
    return x[order[:cut]], y[order[:cut]], x[order[cut:]], y[order[cut:]]


def shift(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random translations by up to one pixel (zero padding is the background, -1): augmentation."""
    padded = F.pad(x, (1, 1, 1, 1), value=-1.0)
    dy, dx = torch.randint(0, 3, (2,), generator=generator).tolist()
    return padded[..., dy:dy + 8, dx:dx + 8]


def train(args) -> dict:
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    model = build(args.width, args.depth, args.heads)
    xtr, ytr, xte, yte = split(args.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.05)
    steps = args.epochs * (len(ytr) // args.batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=steps)
    start = time.time()
    model.train()
    for _ in range(args.epochs):
        order = torch.randperm(len(ytr), generator=gen)
        for i in range(len(ytr) // args.batch):
            idx = order[i * args.batch:(i + 1) * args.batch]
            logits = model(pixel_values=shift(xtr[idx], gen)).logits
            loss = F.cross_entropy(logits, ytr[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    model.eval()
    with torch.no_grad():
        accuracy = (model(pixel_values=xte).logits.argmax(1) == yte).float().mean().item()
    return {"model": model, "held_out_accuracy": accuracy, "train_seconds": time.time() - start,
            "train_images": len(ytr), "held_out_images": len(yte)}


def save(model, out: str, record: dict) -> None:
    from transformers import BitImageProcessor

    os.makedirs(out, exist_ok=True)
    model.dinov2.save_pretrained(out)  # the backbone alone: AutoModel.from_pretrained gives a Dinov2Model
    # inputs are [0, 1] after the teacher's rescale; mean 0.5, std 0.5 maps them to the [-1, 1] it was trained on
    BitImageProcessor(image_mean=[0.5], image_std=[0.5], do_resize=False, do_center_crop=False).save_pretrained(out)
    with open(os.path.join(out, "teacher.json"), "w") as f:
        json.dump(record, f, indent=2)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="folder for the teacher (save_pretrained layout)")
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--epochs", type=int, default=150)  # 60: 90% held-out accuracy, 150: 96%
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    result = train(args)
    record = {k: v for k, v in result.items() if k != "model"}
    record.update(width=args.width, depth=args.depth, heads=args.heads, epochs=args.epochs, seed=args.seed)
    save(result["model"], args.out, record)
    print(json.dumps({"out": args.out, **record}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
