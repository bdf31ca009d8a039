"""Fixtures for the evaluation tests: random-but-seeded FID Inception weight files and small uint8 image sets."""

import numpy as np
import torch


def random_inception_state(seed: int = 0) -> dict:
    """A state dict with the pt_inception key set and shapes, scaled so activations stay O(0.1..1)
    (He-normal convs, random BN statistics); PyTorch's default init would shrink pool3 to ~1e-8."""
    from maskdit_ds.evaluation import FIDInceptionV3

    gen = torch.Generator().manual_seed(seed)
    net = FIDInceptionV3()
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, torch.nn.Conv2d):
                torch.nn.init.kaiming_normal_(m.weight, nonlinearity="relu", generator=gen)
            elif isinstance(m, torch.nn.BatchNorm2d):
                m.running_var.uniform_(0.5, 2.0, generator=gen)
                m.running_mean.normal_(0.0, 0.1, generator=gen)
                m.bias.normal_(0.0, 0.1, generator=gen)
    # like pytorch-fid's file: no num_batches_tracked entries
    return {k: v for k, v in net.state_dict().items() if not k.endswith("num_batches_tracked")}


def write_weights(path, seed: int = 0) -> str:
    """Save a random weight file and return its sha256 (to pass as the expected hash of custom weights)."""
    from maskdit_ds.evaluation import sha256_file

    torch.save(random_inception_state(seed), path)
    return sha256_file(path)


def random_images(n: int, size: int = 32, seed: int = 0) -> np.ndarray:
    """uint8 (n, size, size, 3) smooth-ish random images (a random gradient plus noise), so features vary."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    base = rng.uniform(0, 255, (n, 1, 1, 3)) * (1 - yy[None, ..., None]) + rng.uniform(0, 255, (n, 1, 1, 3)) * \
        xx[None, ..., None]
    noise = rng.normal(0, 20, (n, size, size, 3))
    return np.clip(base + noise, 0, 255).astype(np.uint8)
