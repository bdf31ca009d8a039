"""What a run shows of its EMA while and after it trains (rank-0 pictures, all-rank sampling):

- sample grids to TensorBoard every train.grid_every steps;
- in-training FID every eval.fid_every steps: all ranks sample eval.fid_samples images with the EMA (a fixed seed
  list, so the curve is no noisier than the model), each runs the FID Inception on its own images, and only the
  pool3 features (N, 2048) travel to rank 0. FID is biased in N: the values compare with each other, not with
  FID-50K;
- in-training class agreement for the built-in digits every eval.agreement_every steps: the same sampling, judged
  by a digit classifier on rank 0;
- the final samples (samples.npz/png/json), judged by the same classifier for the built-in example.
"""
from __future__ import annotations

import json
import shutil

import numpy as np
import torch

from .. import dist, io
from ..config import Config
from ..data import DigitsJudge
from ..data.transforms import class_grid, image_grid, to_uint8
from ..data.vae import decode, load_decoder
from ..diffusion.sampler import sample_seeds
from ..errors import ConfigError
from ..evaluation import (PT_INCEPTION_SHA256, build_extractor, frechet_distance, gaussian_stats, load_reference_stats,
                          open_images)
from ..generation.run import autocast, run_generate_config, sample_pixels
from ..hardware import sampling_precision
from .stats import RunLogger


class Monitor:
    """Sampling for a quality check every `every` steps: eval.<n>_samples images with the EMA and guidance, a fixed
    seed list strided over ranks (so the curve is no noisier than the model), classes from each seed."""

    def __init__(self, cfg: Config, every: int, num_samples: int, device=None):
        m = cfg.model
        self.every, self.num_samples, self.device = every, num_samples, device or dist.device()
        self.shape = (m.in_channels, m.input_size, m.input_size)  # what the network samples
        self.gen = run_generate_config(cfg, batch_size=64)

    def due(self, step: int) -> bool:
        return bool(self.every) and step % self.every == 0

    def seeds(self) -> range:
        """This rank's seeds: 0..num_samples-1, strided over ranks."""
        return range(dist.rank(), self.num_samples, dist.world_size())

    @torch.no_grad()
    def sample(self, ema) -> tuple[np.ndarray, np.ndarray]:
        """uint8 (n, H, W, 3) and their classes (n,) for this rank's seeds."""
        vae = run_vae(self.gen.vae, self.gen.sampler.precision)  # the run's one VAE (None for pixel models)
        was_training = ema.training
        ema.eval()
        images, labels = sample_pixels(ema, self.seeds(), None, self.shape, self.gen, self.device, vae)
        ema.train(was_training)
        return images, labels


class AgreementMonitor(Monitor):
    """The built-in digits: the share of EMA samples that a classifier trained on the real digits assigns to the
    class they were generated for (rank 0 judges)."""

    def __init__(self, cfg: Config, device=None):
        super().__init__(cfg, cfg.eval.agreement_every, cfg.eval.agreement_samples, device)
        self.judge = DigitsJudge() if dist.is_main() else None

    def __call__(self, step: int, ema) -> float | None:
        """Collective. The agreement on rank 0 at due steps; None on other ranks and at other steps."""
        if not self.due(step):
            return None
        parts = dist.gather_to_main(self.sample(ema))
        if not dist.is_main():
            return None
        return judge_digits(self.judge, np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]))


def judge_digits(judge: DigitsJudge, pixels: np.ndarray, classes: np.ndarray) -> float:
    """uint8 (N, H, W, C) samples and the classes they were generated for -> the share the judge agrees with."""
    as_float = torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 127.5 - 1
    return judge.agreement(as_float, torch.from_numpy(np.asarray(classes)))


class FIDMonitor(Monitor):
    """Built collectively on every rank after the EMA exists; fails on every rank if the setup is wrong."""

    def __init__(self, cfg: Config, device=None, inception_batch: int = 100):
        e = cfg.eval
        super().__init__(cfg, e.fid_every, e.fid_samples, device)
        latent = cfg.data.kind.latent
        self.extractor, self.ref = None, None
        error = None
        try:
            if latent and not cfg.data.vae:
                raise ConfigError("eval.fid_every: a latent model needs data.vae to decode samples for FID")
            self._check_reference(e.fid_ref, cfg.data.resolution)
            self.extractor = build_extractor(e.inception_weights, self.device, inception_batch,
                                             expected_sha256=e.inception_sha256 or PT_INCEPTION_SHA256)
            if dist.is_main():  # reference statistics are read (or computed from arr_0) once, then kept
                self.ref = load_reference_stats(e.fid_ref, self.extractor).pool3
        except (ConfigError, ValueError, FileNotFoundError) as err:
            error = f"in-training FID: {err}"
        errors = [x for x in dist.all_gather_objects(error) if x]
        if errors:
            raise ConfigError(errors[0])

    @staticmethod
    def _check_reference(path, resolution: int) -> None:
        images = open_images(path, role="eval.fid_ref reference")
        if tuple(images.shape[1:3]) != (resolution, resolution):
            raise ConfigError(f"eval.fid_ref {path} holds {images.shape[1]}x{images.shape[2]} images, but the model "
                              f"generates {resolution}x{resolution} (data.resolution); build the reference at "
                              "that size")

    def __call__(self, step: int, ema) -> float | None:
        """Collective. The FID on rank 0 at due steps; None on other ranks and at other steps."""
        if not self.due(step):
            return None
        features = self.extractor.images(self.sample(ema)[0]).pool3  # (n, 2048) float32
        parts = dist.gather_to_main(features)
        if not dist.is_main():
            return None
        # The symmetric-eigh trace of sqrt(S1 S2): ADM's value to ~1e-8, without scipy sqrtm's ~30 s on a CPU.
        return float(frechet_distance(gaussian_stats(np.concatenate(parts)), self.ref, "eigh"))


# ---------------------------------------------------------------- pictures and final samples


@torch.no_grad()
def log_grid(cfg: Config, ema, logger: RunLogger, step: int) -> None:
    """EMA samples (one per class, cycling) with guidance, as a TensorBoard image; rank 0 only."""
    if not dist.is_main():
        return
    n, classes = cfg.sample.grid_size, cfg.model.num_classes
    shape = (cfg.model.in_channels, cfg.model.input_size, cfg.model.input_size)
    with autocast(cfg.sample.precision, dist.device()):
        images, _ = sample_seeds(ema, list(range(n)), shape, classes, cfg.sample.sampler(), dist.device(),
                                 class_labels=torch.arange(n) % classes)
    if cfg.data.kind.latent:
        images = decode_latents(images, cfg)
    logger.image("samples/ema", image_grid(to_uint8(images.float())), step)


def decode_latents(latents: torch.Tensor, cfg: Config) -> torch.Tensor:
    """Latents -> [-1, 1] images with the configured VAE; without one, show 3 latent channels rescaled."""
    if not cfg.data.vae:
        x = latents[:, :3].float()
        return (x / x.abs().amax(dim=(1, 2, 3), keepdim=True).clamp(min=1e-6)).clamp(-1, 1)
    images, _ = decode(run_vae(cfg.data.vae, cfg.sample.precision), latents.float(), cfg.data.latent_scale,
                       batch=len(latents))
    return images


def run_vae(spec: str, precision: str):
    """The run's VAE in the sampler's precision (bf16/fp16 on GPUs, fp32 on CPUs; sample.precision=fp32 asks for
    fp32). load_decoder caches it, so grids, FID and final samples share one."""
    return load_decoder(spec, dist.device(), sampling_precision(precision))[0]


@torch.no_grad()
def final_samples(cfg: Config, ema, logger: RunLogger, state=None) -> None:
    """Sample cfg.sample.final_samples images with the EMA and guidance, split over ranks by seed, into
    samples.npz (arr_0 uint8 NHWC, arr_1 labels) and samples.png; the digits example is also judged."""
    n = cfg.sample.final_samples
    if n <= 0 or (cfg.data.kind.latent and not cfg.data.vae):
        return
    seeds = list(range(n))[dist.rank() :: dist.world_size()]
    shape = (cfg.model.in_channels, cfg.model.input_size, cfg.model.input_size)
    gcfg = run_generate_config(cfg, batch_size=128)
    vae = run_vae(gcfg.vae, gcfg.sampler.precision)
    pixels, labels = sample_pixels(ema, seeds, None, shape, gcfg, dist.device(), vae, progress=dist.is_main())
    parts = cfg.run_dir / "samples_parts"  # pixels reach rank 0 through files: no gather holds them on one GPU
    part = parts / f"rank{dist.rank():05d}.npz"
    part.parent.mkdir(parents=True, exist_ok=True)
    with io.atomic_path(part) as tmp, open(tmp, "wb") as f:
        np.savez(f, seeds=np.asarray(seeds, dtype=np.int64), pixels=pixels, labels=labels)
    dist.long_barrier()  # ranks finish sampling at different times
    if not dist.is_main():
        return
    files = [parts / f"rank{r:05d}.npz" for r in range(dist.world_size())]
    loaded = [dict(np.load(f)) for f in files]
    order = np.argsort(np.concatenate([p["seeds"] for p in loaded]))
    pixels = np.concatenate([p["pixels"] for p in loaded])[order]
    classes = np.concatenate([p["labels"] for p in loaded])[order]
    shutil.rmtree(parts, ignore_errors=True)
    io.atomic_save_npz(cfg.run_dir / "samples.npz", arr_0=pixels, arr_1=classes)
    from PIL import Image

    io.atomic_save_image(Image.fromarray(class_grid(pixels, classes)), cfg.run_dir / "samples.png")
    report = {"num_samples": int(n), "guidance": cfg.sample.guidance, "steps": cfg.sample.steps}
    if state is not None:  # what the model cost to train
        report["training"] = {"run": cfg.run.name, "step": state.step, "images_seen": state.images_seen,
                              "device_hours": state.device_hours}
    if cfg.data.source == "digits":  # the built-in example: a classifier trained on the real digits judges
        report["digits_class_agreement"] = judge_digits(DigitsJudge(), pixels, classes)
    io.atomic_write_text(cfg.run_dir / "samples.json", json.dumps(report, indent=2))
    dist.say(f"[samples] wrote {cfg.run_dir / 'samples.npz'}: {json.dumps(report)}")
