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


# ---------------------------------------------------------------- in-training FID on the digits preset

FID_TINY = ["model.name=MaskDiT-T/2", "model.input_size=16", "data.resolution=16", "train.stages=[]",
            "sample.steps=2", "eval.fid_samples=6", "eval.fid_every=2"]


def fid_config(weights, ref, *more):
    """The digits preset, tiny, with in-training FID against `ref` on the random weights (path, sha256)."""
    from maskdit_ds.config import load_config

    path, sha = weights
    return load_config("digits", [*FID_TINY, f"eval.fid_ref={ref}", f"eval.inception_weights={path}",
                                  f"eval.inception_sha256={sha}", *more])


def reference_from(images, out, weights, extractor=None):
    """An ADM reference batch at `out` built from uint8 `images` with the random weights (path, sha256)."""
    from maskdit_ds.evaluation import build_extractor, build_reference

    np.savez(out.with_suffix(".real.npz"), arr_0=images)
    extractor = extractor or build_extractor(weights[0], "cpu", 20, expected_sha256=weights[1])
    return build_reference(out.with_suffix(".real.npz"), out, extractor, progress=False)
