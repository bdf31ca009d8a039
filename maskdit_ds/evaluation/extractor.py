"""Run the FID Inception over batches of uint8 images on one device and collect ADM's three feature sets."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import numpy as np
import torch
from tqdm import tqdm

from .inception import NUM_CLASSES, POOL3_DIM, SPATIAL_DIM, FIDInceptionV3, tf32_disabled
from .weights import PT_INCEPTION_SHA256, load_inception


@dataclass
class Activations:
    """Per-image Inception outputs, float32 numpy, rows in input order."""

    pool3: np.ndarray  # (N, 2048): FID, precision/recall
    spatial: np.ndarray  # (N, 2023): sFID
    logits: np.ndarray  # (N, 1008): IS (no bias)

    def __len__(self):
        return len(self.pool3)

    @staticmethod
    def concat(parts: list["Activations"]) -> "Activations":
        if not parts:
            return Activations(np.zeros((0, POOL3_DIM), np.float32), np.zeros((0, SPATIAL_DIM), np.float32),
                               np.zeros((0, NUM_CLASSES), np.float32))
        return Activations(*(np.concatenate([getattr(p, k) for p in parts]) for k in ("pool3", "spatial", "logits")))


class InceptionExtractor:
    """Build once, reuse for every evaluation: holds the verified network on `device`.

    `weights_sha256` is the hash that was verified (recorded in metrics JSON).
    """

    feature_dims = (POOL3_DIM, SPATIAL_DIM)  # what reference mu/sigma and mu_s/sigma_s must match

    def __init__(self, net: FIDInceptionV3, device="cpu", batch_size: int = 200, weights_sha256: str | None = None):
        self.device = torch.device(device)
        self.net = net.eval().to(self.device)
        self.batch_size = batch_size
        self.weights_sha256 = weights_sha256

    @classmethod
    def from_weights(cls, path, device="cpu", batch_size: int = 200,
                     expected_sha256: str | None = PT_INCEPTION_SHA256) -> "InceptionExtractor":
        """Verify and load `path`. `expected_sha256=None` is only for custom (e.g. test) weights."""
        net, digest = load_inception(path, expected_sha256)
        return cls(net, device, batch_size, digest)

    @torch.inference_mode()
    def __call__(self, images) -> Activations:
        """One batch: uint8 (N, H, W, 3) or (N, 3, H, W), numpy or torch -> Activations."""
        x = torch.as_tensor(images).to(self.device, non_blocking=True)
        with tf32_disabled(), torch.autocast(x.device.type, enabled=False):  # fp32, as ADM's protocol needs
            pool3, spatial, logits = self.net(x)
        return Activations(pool3.float().cpu().numpy(), spatial.float().cpu().numpy(), logits.float().cpu().numpy())

    def run(self, batches: Iterable, total: int | None = None, desc: str = "inception",
            progress: bool = True) -> Activations:
        """Features of a stream of uint8 image batches (any batch sizes; re-chunked to self.batch_size)."""
        parts = []
        with tqdm(total=total, desc=desc, unit="img", disable=not progress, dynamic_ncols=True) as bar:
            for batch in batches:
                for start in range(0, len(batch), self.batch_size):
                    chunk = batch[start:start + self.batch_size]
                    parts.append(self(chunk))
                    bar.update(len(chunk))
        return Activations.concat(parts)

    def images(self, images, progress: bool = False, desc: str = "inception") -> Activations:
        """Features of an in-memory uint8 array/tensor of images (N, H, W, 3)."""
        return self.run([images], total=len(images), desc=desc, progress=progress)
