"""Fixtures for the evaluation tests: random-but-seeded FID Inception weight files and small uint8 image sets."""

import numpy as np

from maskdit_ds.evaluation.weights import random_inception_state, write_random_weights  # noqa: F401


def write_weights(path, seed: int = 0) -> str:
    """Save a random weight file and return its sha256 (to pass as the expected hash of custom weights)."""
    return write_random_weights(path, seed)


def random_images(n: int, size: int = 32, seed: int = 0) -> np.ndarray:
    """uint8 (n, size, size, 3) smooth-ish random images (a random gradient plus noise), so features vary."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    base = rng.uniform(0, 255, (n, 1, 1, 3)) * (1 - yy[None, ..., None]) + rng.uniform(0, 255, (n, 1, 1, 3)) * \
        xx[None, ..., None]
    noise = rng.normal(0, 20, (n, size, size, 3))
    return np.clip(base + noise, 0, 255).astype(np.uint8)
