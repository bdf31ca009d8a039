"""The ADM evaluation suite end to end: sample .npz vs reference batch -> IS, FID, sFID, precision, recall."""
from __future__ import annotations

import platform
import warnings
from pathlib import Path

import numpy as np
import scipy
import torch

from .extractor import Activations, InceptionExtractor
from .metrics import IS_SPLIT_SIZE, PR_K, frechet_distance, gaussian_stats, inception_score, precision_recall
from .npz_io import open_images, read_stats
from .reference import ReferenceBatch, ReferenceStats, load_reference

ADM_NUM_SAMPLES = 50_000  # "FID-50K"


def protocol(pr_mode: str = "adm-fp16", fid_method: str = "sqrtm") -> dict:
    """How the numbers were computed; written into every metrics JSON."""
    return {
        "name": "adm-tf1-inception-2015-12-05",
        "network": "pt_inception-2015-12-05 (TF graph port, 1008 classes)",
        "resize": "tf1-legacy-bilinear to 299 (src = d*in/out, no antialias), inside the network",
        "normalise": "(x - 128) / 128",
        "fid": "pool3 2048-d; mu float32 mean, sigma float64 unbiased; " + (
            "scipy sqrtm(S_sample @ S_ref), eps 1e-6 retry" if fid_method == "sqrtm" else
            "tr sqrt via symmetric eigh (not ADM's sqrtm; same value to ~1e-8)"),
        "sfid": "Mixed_6d.branch1x1 post-ReLU, channels 0..6, NHWC flatten, 2023-d",
        "inception_score": f"softmax(pool3 @ fc.weight.T) (no bias), contiguous splits of {IS_SPLIT_SIZE}",
        "precision_recall": f"k={PR_K}, squared distances, radius incl. self, <=, distances {pr_mode}",
        "tf32": "disabled",
    }


def compute_metrics(samples: Activations, ref: ReferenceBatch, sample_stats: tuple | None = None,
                    pr_mode: str = "adm-fp16", device="cpu", fid_method: str = "sqrtm") -> dict:
    """The five ADM numbers from sample activations. sample_stats (pool3, spatial) overrides the statistics
    computed from the activations (ADM does this when the sample npz stores mu/sigma)."""
    pool3, spatial = sample_stats or (gaussian_stats(samples.pool3), gaussian_stats(samples.spatial))
    precision, recall = precision_recall(ref.pool3, samples.pool3, mode=pr_mode, device=device)
    return {
        "inception_score": inception_score(samples.logits),
        "fid": frechet_distance(pool3, ref.stats.pool3, fid_method),
        "sfid": frechet_distance(spatial, ref.stats.spatial, fid_method),
        "precision": precision,
        "recall": recall,
    }


def evaluate_npz(sample_path, ref_path, extractor: InceptionExtractor, num_samples: int | None = None,
                 cache_dir=None, use_cache: bool = True, pr_mode: str = "adm-fp16", fid_method: str = "sqrtm",
                 progress: bool = True) -> dict:
    """ADM's evaluator: metrics plus provenance (counts, hashes, protocol, versions), ready for JSON.

    Both files are validated (layout, resolution, image count) before any Inception pass.
    num_samples: use the first N sample images (all if None; a warning when that is not 50,000).
    """
    ref_images = open_images(ref_path, role="reference")
    samples = open_images(sample_path, role="sample", num_images=num_samples, resolution=ref_images.shape[1:3])
    read_stats(ref_path, extractor.feature_dims)  # malformed reference statistics fail here, before the long passes
    n = num_samples or len(samples)
    if n != ADM_NUM_SAMPLES:
        warnings.warn(f"evaluating {n} samples; ADM's FID-50K uses {ADM_NUM_SAMPLES} (FID is biased in N)")
    sample_stats = read_stats(sample_path, extractor.feature_dims)
    if sample_stats is not None:
        warnings.warn(f"{sample_path} stores mu/sigma: FID/sFID use them instead of its images, as ADM does")
    ref = load_reference(ref_path, extractor, cache_dir, use_cache, progress)
    acts = extractor.run(samples.batches(extractor.batch_size, n), total=n, desc="samples", progress=progress)
    metrics = compute_metrics(acts, ref, sample_stats, pr_mode, extractor.device, fid_method)
    return {
        **metrics,
        "num_samples": n,
        "num_reference_images": len(ref.pool3),
        "samples": str(Path(sample_path).resolve()),
        "sample_stats": "npz" if sample_stats is not None else "images",
        "reference": str(ref.path.resolve()),
        "reference_sha256": ref.sha256,
        "reference_stats": ref.stats.source,
        "resolution": list(ref.resolution),
        "weights_sha256": extractor.weights_sha256,
        "protocol": protocol(pr_mode, fid_method),
        "environment": {"device": str(extractor.device), "torch": torch.__version__, "numpy": np.__version__,
                        "scipy": scipy.__version__, "python": platform.python_version()},
    }


def fid_from_images(images, ref_stats: ReferenceStats, extractor: InceptionExtractor,
                    batch_size: int | None = None, with_sfid: bool = False, fid_method: str = "sqrtm"):
    """In-training FID of uint8 (N, H, W, 3) images (numpy or torch) against reference statistics.

    Returns the FID (or (FID, sFID) with with_sfid=True). FID is biased in N: compare values at equal N only.
    fid_method="eigh" gives the same value several times faster than ADM's scipy sqrtm (see frechet_distance).
    """
    if batch_size is not None and batch_size != extractor.batch_size:
        extractor = InceptionExtractor(extractor.net, extractor.device, batch_size, extractor.weights_sha256)
    acts = extractor.images(images)
    fid = frechet_distance(gaussian_stats(acts.pool3), ref_stats.pool3, fid_method)
    if not with_sfid:
        return fid
    return fid, frechet_distance(gaussian_stats(acts.spatial), ref_stats.spatial, fid_method)


def format_report(metrics: dict) -> str:
    """ADM's console lines, in its order."""
    return "\n".join([
        f"Inception Score: {metrics['inception_score']}",
        f"FID: {metrics['fid']}",
        f"sFID: {metrics['sfid']}",
        f"Precision: {metrics['precision']}",
        f"Recall: {metrics['recall']}",
    ])
