"""MaskDM on digits: masked pre-training on digits 0-4, fine-tuning on 10% of digits 5-9, vs the same fine-tuning
from scratch at equal training FLOPs. Trains through the real 2-rank DeepSpeed path, then judges both models.

    python tools/maskdm_digits_demo.py --out runs/maskdm_demo    # about 11 min on 2 CPU cores (docs/maskdm.md)

Metrics on samples of classes 5-9 (equal numbers, the same seeds for both models), all on 8x8 digits:
  agreement   fraction a classifier trained on the real digits (DigitsJudge, an SVC) assigns the sampled class
  fd_pixels   Frechet distance between sample and real-digit statistics in raw 8x8 pixel space (64-d)
  fd_mlp      Frechet distance in the hidden layer (64 ReLU units) of an MLP classifier trained on the real digits
These are NOT FID: no Inception network is involved and the numbers are not comparable with published FIDs.
  fid         with --inception-weights: Inception FID (pool3) against the real digits 5-9 at the training
              resolution (upscaled and quantised like the training data), the repository's ADM-protocol extractor
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from maskdit_ds import load_pretrained  # noqa: E402
from maskdit_ds.config import load_config  # noqa: E402
from maskdit_ds.dist import free_port  # noqa: E402
from maskdit_ds.data.digits import DigitsDataset, DigitsJudge, load_digits_arrays  # noqa: E402
from maskdit_ds.evaluation.metrics import frechet_distance, gaussian_stats  # noqa: E402
from maskdit_ds.config import SamplerConfig  # noqa: E402
from maskdit_ds.data.transforms import image_grid, to_uint8  # noqa: E402
from maskdit_ds.diffusion.sampler import sample_seeds  # noqa: E402
from maskdit_ds.model import get_size, kept_tokens, token_grid, train_flops  # noqa: E402

FINETUNE_CLASSES = [5, 6, 7, 8, 9]


def train(config: str, name: str, out: Path, overrides: list[str], ranks: int) -> float:
    """One run through the deepspeed launcher; returns its wall time. Output goes to out/<name>.log."""
    cmd = [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", str(ranks), "--master_port",
           str(free_port()), "--module", "maskdit_ds", "train", "--config", config, f"run.out_dir={out}",
           f"run.name={name}", "sample.final_samples=0", "train.grid_every=0", *overrides]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "HF_HUB_OFFLINE": "1",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    print(f"[demo] {name}: {' '.join(cmd[6:])}", flush=True)
    start = time.time()
    with open(out / f"{name}.log", "w") as log:
        code = subprocess.call(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    if code != 0:
        raise SystemExit(f"[demo] {name} failed with exit code {code}; see {out / f'{name}.log'}")
    return time.time() - start


# ---------------------------------------------------------------- judging


def to_8x8(pixels_uint8: np.ndarray) -> np.ndarray:
    """uint8 NHWC samples (the samples.npz layout) -> (N, 64) in [0, 1], pooled like DigitsJudge does."""
    x = torch.from_numpy(pixels_uint8).permute(0, 3, 1, 2).float().mean(1, keepdim=True) / 255.0
    return F.adaptive_avg_pool2d(x, 8).reshape(len(x), -1).numpy()


class Judges:
    """The real-digit references: the SVC judge, an MLP feature space and the real statistics of digits 5-9."""

    def __init__(self, inception_weights: str = "", inception_sha256: str = ""):
        from sklearn.neural_network import MLPClassifier

        images, labels = load_digits_arrays()
        flat = images.reshape(len(images), -1)
        self.svc = DigitsJudge()
        self.mlp = MLPClassifier(hidden_layer_sizes=(64,), max_iter=1000, random_state=0).fit(flat, labels)
        real = flat[np.isin(labels, FINETUNE_CLASSES)]
        self.real_pixels, self.real_mlp = gaussian_stats(real), gaussian_stats(self.features(real))
        self.extractor = self.real_pool3 = None
        if inception_weights:  # verified by sha256 before anything is computed
            from maskdit_ds.evaluation import PT_INCEPTION_SHA256, build_extractor

            self.extractor = build_extractor(inception_weights, expected_sha256=inception_sha256 or PT_INCEPTION_SHA256)
            self.real_pool3 = gaussian_stats(self.extractor.images(real_digits_uint8(FINETUNE_CLASSES)).pool3)

    def features(self, flat: np.ndarray) -> np.ndarray:
        return np.maximum(flat @ self.mlp.coefs_[0] + self.mlp.intercepts_[0], 0)  # (N, 64) hidden ReLU layer

    def score(self, pixels_uint8: np.ndarray, labels: np.ndarray) -> dict:
        flat = to_8x8(pixels_uint8)
        scores = {"agreement": float((self.svc.clf.predict(flat) == labels).mean()),
                  "fd_pixels": frechet_distance(gaussian_stats(flat), self.real_pixels),
                  "fd_mlp": frechet_distance(gaussian_stats(self.features(flat)), self.real_mlp)}
        if self.extractor is not None:
            scores["fid"] = frechet_distance(gaussian_stats(self.extractor.images(pixels_uint8).pool3),
                                             self.real_pool3)
        return scores


def real_digits_uint8(classes) -> np.ndarray:
    """The real digits of `classes` as the trainer sees them (16 px), quantised like samples: uint8 NHWC."""
    digits = DigitsDataset(load_config("maskdm_digits_finetune").data.resolution)
    return to_uint8(digits.x[torch.isin(digits.y, torch.tensor(list(classes)))])


def training_subset_score(judges: Judges, seed: int) -> dict:
    """The fine-tuning images themselves, scored like samples: what memorising the 10% subset would give."""
    cfg = load_config("maskdm_digits_finetune", [f"run.seed={seed}"])
    from maskdit_ds.data import build_dataset

    subset = build_dataset(cfg.data, cfg.model, cfg.run.seed)
    x = torch.stack([subset[i]["x"] for i in range(len(subset))])
    y = np.array([int(subset[i]["y"]) for i in range(len(subset))])
    return {"num_images": len(subset), **judges.score(to_uint8(x), y)}


def sample_and_score(run_dir: Path, judges: Judges, n: int, steps: int, guidance: float) -> dict:
    net = load_pretrained(run_dir)  # the newest export: EMA weights
    labels = torch.tensor(FINETUNE_CLASSES * (n // len(FINETUNE_CLASSES)))
    start = time.time()
    images, _ = sample_seeds(net, list(range(len(labels))), (1, 16, 16), net.num_classes,
                             SamplerConfig(steps=steps, guidance=guidance), "cpu", class_labels=labels,
                             batch_size=250)
    pixels = to_uint8(images.float())
    np.savez(run_dir / "demo_samples.npz", arr_0=pixels, arr_1=labels.numpy())
    from PIL import Image

    Image.fromarray(image_grid(pixels[:100], columns=10)).save(run_dir / "demo_samples.png")
    return {**judges.score(pixels, labels.numpy()), "sample_seconds": round(time.time() - start, 1)}


# ---------------------------------------------------------------- the experiment


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/maskdm_demo")
    parser.add_argument("--pre-steps", type=int, default=800, help="masked pre-training steps (digits 0-4)")
    parser.add_argument("--pre-batch", type=int, default=64)
    parser.add_argument("--fine-steps", type=int, default=200, help="fine-tuning steps (10%% of digits 5-9)")
    parser.add_argument("--fine-batch", type=int, default=64)
    parser.add_argument("--mask-ratio", type=float, default=0.75)
    parser.add_argument("--model", default="", help="a registry name, e.g. UViT-Digits/2 (default: the preset's)")
    parser.add_argument("--fine-ema", type=float, default=0.98,
                        help="EMA decay of both fine-tuning runs: a few hundred steps need a short EMA (0.98: "
                             "half-life 34 steps), or the exported EMA is mostly the starting weights")
    parser.add_argument("--samples", type=int, default=200, help="samples per model, equal numbers of 5-9")
    parser.add_argument("--sample-steps", type=int, default=12, help="EDM Heun steps")
    parser.add_argument("--guidance", type=float, default=1.5)
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--inception-weights", default="",
                        help="pt_inception-2015-12-05-6726825d.pth: also report Inception FID (docs/evaluation.md)")
    parser.add_argument("--inception-sha256", default="", help="expected hash of other weights (default: official)")
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)

    # Equal training FLOPs (analytic counter of model/flops.py, backward = 2x forward): the scratch run gets the
    # pre-training's FLOPs as extra unmasked fine-tuning steps. Masked steps are cheaper than unmasked ones.
    model = [f"model.name={args.model}"] if args.model else []
    pre_cfg = load_config("maskdm_digits_pretrain", model)
    size, res, ch = get_size(pre_cfg.model.name), pre_cfg.model.input_size, pre_cfg.model.in_channels
    kept = kept_tokens(pre_cfg.mask.strategy, token_grid(pre_cfg.model), args.mask_ratio)
    pre_flops = args.pre_steps * args.pre_batch * train_flops(size, res, ch, kept)
    fine_flops = args.fine_batch * train_flops(size, res, ch)  # one unmasked fine-tuning step
    extra = round(pre_flops / fine_flops)
    scratch_steps = args.fine_steps + extra
    batch = lambda b: [f"train.global_batch={b}", f"train.micro_batch={b // args.ranks}"]  # noqa: E731
    fine = [*batch(args.fine_batch), f"train.ema_decay={args.fine_ema}", *model]

    times = {}
    times["pretrain"] = train("maskdm_digits_pretrain", "pretrain", out, [
        f"train.steps={args.pre_steps}", f"train.ckpt_every={args.pre_steps}", f"mask.ratio={args.mask_ratio}",
        *batch(args.pre_batch), *model], args.ranks)
    times["finetune"] = train("maskdm_digits_finetune", "finetune", out, [
        f"train.init_from={out / 'pretrain'}", f"train.steps={args.fine_steps}",
        f"train.ckpt_every={args.fine_steps}", *fine], args.ranks)
    times["scratch"] = train("maskdm_digits_finetune", "scratch", out, [
        "train.init_from=", f"train.steps={scratch_steps}", f"train.ckpt_every={scratch_steps}", *fine],
        args.ranks)

    judges = Judges(args.inception_weights, args.inception_sha256)
    results = {
        "settings": {**vars(args), "out": str(out), "scratch_steps": scratch_steps, "compute_match": "equal FLOPs",
                     "model": pre_cfg.model.name},
        "train_gflops": {"pretrain+finetune": round((pre_flops + args.fine_steps * fine_flops) / 1e9, 1),
                         "scratch": round(scratch_steps * fine_flops / 1e9, 1)},
        "images_seen": {"pretrain+finetune": args.pre_steps * args.pre_batch + args.fine_steps * args.fine_batch,
                        "scratch": scratch_steps * args.fine_batch},
        "wall_seconds": {k: round(v, 1) for k, v in times.items()},
        "training_subset": training_subset_score(judges, pre_cfg.run.seed),
        "pretrained+finetuned": sample_and_score(out / "finetune", judges, args.samples, args.sample_steps,
                                                 args.guidance),
        "scratch": sample_and_score(out / "scratch", judges, args.samples, args.sample_steps, args.guidance),
    }
    (out / "demo_results.json").write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))
    print("\n| model | agreement | FD pixels 8x8 | FD digits-MLP | Inception FID |\n|---|---|---|---|---|")
    for key in ("pretrained+finetuned", "scratch", "training_subset"):
        r = results[key]
        fid = f"{r['fid']:.2f}" if "fid" in r else "not measured (no --inception-weights)"
        print(f"| {key} | {r['agreement']:.3f} | {r['fd_pixels']:.3f} | {r['fd_mlp']:.3f} | {fid} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
