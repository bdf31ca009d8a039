"""ADM-protocol evaluation (IS, FID, sFID, precision, recall) on a PyTorch port of the 2015 TF Inception graph.

Typical use:
    extractor = build_extractor("pt_inception-2015-12-05-6726825d.pth", device="cuda")
    ref = load_reference_stats("VIRTUAL_imagenet256_labeled.npz")          # stored mu/sigma, no Inception pass
    fid = fid_from_images(images_uint8_nhwc, ref, extractor)                # in-training FID
    metrics = evaluate_npz("samples.npz", "VIRTUAL_imagenet256_labeled.npz", extractor)   # full ADM suite
"""
from .evaluate import compute_metrics, evaluate_npz, fid_from_images, format_report, protocol
from .extractor import Activations, InceptionExtractor
from .inception import FIDInceptionV3, resize_bilinear_tf1, spatial_features, tf32_disabled
from .metrics import (GaussianStats, RunningGaussian, frechet_distance, gaussian_stats, inception_score,
                      precision_recall)
from .npz_io import NpzImages, open_images, read_stats, save_reference
from .reference import (ReferenceBatch, ReferenceStats, adm_center_crop, build_reference, load_reference,
                        load_reference_stats)
from .weights import (PT_INCEPTION_SHA256, PT_INCEPTION_SIZE, PT_INCEPTION_URL, download_weights, load_inception,
                      sha256_file, verify_weight_file)


def build_extractor(weights, device="cpu", batch_size: int = 200,
                    expected_sha256: str | None = PT_INCEPTION_SHA256) -> InceptionExtractor:
    """Verify the weight file and build the reusable feature extractor (do this once).

    expected_sha256=None skips verification and is meant only for custom weights (e.g. tests).
    """
    return InceptionExtractor.from_weights(weights, device, batch_size, expected_sha256)


__all__ = [
    "Activations", "FIDInceptionV3", "GaussianStats", "InceptionExtractor", "NpzImages", "PT_INCEPTION_SHA256",
    "PT_INCEPTION_SIZE", "PT_INCEPTION_URL", "ReferenceBatch", "ReferenceStats", "RunningGaussian",
    "adm_center_crop", "build_extractor", "build_reference", "compute_metrics", "download_weights",
    "evaluate_npz", "fid_from_images", "format_report", "frechet_distance", "gaussian_stats", "inception_score",
    "load_inception", "load_reference", "load_reference_stats", "open_images", "precision_recall", "protocol",
    "read_stats", "resize_bilinear_tf1", "save_reference", "sha256_file", "spatial_features", "tf32_disabled",
    "verify_weight_file",
]
