"""In-training FID: every eval.fid_every steps all ranks sample eval.fid_samples images with the EMA; rank 0 scores.

Each rank samples its share of a fixed seed list (the same seeds at every evaluation, so the curve is not noisier
than the model), runs the FID Inception on its own images, and only the pool3 features (N, 2048) travel to rank 0.
FID is biased in N: the values compare with each other, not with FID-50K.
"""
from __future__ import annotations

import numpy as np
import torch

from . import dist
from .config import Config
from .errors import ConfigError
from .evaluation import PT_INCEPTION_SHA256, build_extractor, frechet_distance, gaussian_stats, open_images
from .evaluation import load_reference_stats
from .generate import load_decoder, run_generate_config, sample_images


class FIDMonitor:
    """Built collectively on every rank after the EMA exists; fails on every rank if the setup is wrong."""

    def __init__(self, cfg: Config, device=None, inception_batch: int = 100):
        e, m = cfg.eval, cfg.model
        self.every, self.num_samples, self.device = e.fid_every, e.fid_samples, device or dist.device()
        self.shape = (m.in_channels, m.input_size, m.input_size)  # what the network samples
        latent = cfg.data.source == "latents"
        self.gen = run_generate_config(cfg, batch_size=64)
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

    def due(self, step: int) -> bool:
        return bool(self.every) and step % self.every == 0

    def seeds(self) -> range:
        """This rank's seeds: 0..fid_samples-1, strided over ranks."""
        return range(dist.rank(), self.num_samples, dist.world_size())

    @torch.no_grad()
    def sample(self, ema) -> np.ndarray:
        """uint8 (n, H, W, 3) for this rank's seeds, classes uniform from each seed's generator, with guidance."""
        vae = load_decoder(self.gen.vae, self.device)[0]  # cached: the run's one VAE (None for pixel models)
        images, _ = sample_images(ema, self.seeds(), None, self.shape, self.gen, self.device, vae)
        return images

    def __call__(self, step: int, ema) -> float | None:
        """Collective. The FID on rank 0 at due steps; None on other ranks and at other steps."""
        if not self.due(step):
            return None
        was_training = ema.training
        ema.eval()
        features = self.extractor.images(self.sample(ema)).pool3  # (n, 2048) float32
        ema.train(was_training)
        parts = dist.gather_to_main(features)
        if not dist.is_main():
            return None
        # The symmetric-eigh trace of sqrt(S1 S2): ADM's value to ~1e-8, without scipy sqrtm's ~30 s on a CPU.
        return float(frechet_distance(gaussian_stats(np.concatenate(parts)), self.ref, "eigh"))
