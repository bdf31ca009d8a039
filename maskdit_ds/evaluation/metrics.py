"""ADM's metric definitions (guided-diffusion evaluations/evaluator.py): FID, sFID, IS, precision/recall."""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import torch
from scipy import linalg

from .inception import tf32_disabled

IS_SPLIT_SIZE = 5000  # ADM: contiguous chunks in file order
PR_K = 3  # ADM nhood_sizes=(3,)
PR_BLOCK = 10_000  # ADM row/col batch size
SQRTM_EPS = 1e-6
FID_METHODS = ("sqrtm", "eigh")
MAX_IMAG_DIAG = 1e-3


@dataclass
class GaussianStats:
    """Mean and covariance of a feature set, float64 (ADM keeps sigma in float64; its mu is a float32 mean)."""

    mu: np.ndarray  # (D,)
    sigma: np.ndarray  # (D, D)

    def __post_init__(self):
        self.mu = np.atleast_1d(np.asarray(self.mu, dtype=np.float64))
        self.sigma = np.atleast_2d(np.asarray(self.sigma, dtype=np.float64))
        d = self.mu.shape[0]
        if self.mu.ndim != 1 or self.sigma.shape != (d, d):
            raise ValueError(f"Gaussian stats need mu (D,) and sigma (D, D); got {self.mu.shape}, {self.sigma.shape}")


def gaussian_stats(features: np.ndarray) -> GaussianStats:
    """ADM's statistics: np.mean of the float32 features and np.cov (unbiased, computed in float64)."""
    features = np.asarray(features, dtype=np.float32)
    if features.ndim != 2 or len(features) < 2:
        raise ValueError(f"need at least 2 feature rows (N, D) for a covariance, got shape {features.shape}")
    return GaussianStats(np.mean(features, axis=0), np.cov(features, rowvar=False))


class RunningGaussian:
    """Streaming mean/covariance in float64 for feature sets too large to hold (e.g. a whole training set).

    Sums are taken around the first batch's mean so the final subtraction does not cancel catastrophically.
    """

    def __init__(self):
        self.n = 0
        self.shift = self.sum = self.outer = None

    def update(self, features: np.ndarray):
        x = np.asarray(features, dtype=np.float64)
        if self.shift is None:
            self.shift = x.mean(axis=0)
            self.sum = np.zeros_like(self.shift)
            self.outer = np.zeros((x.shape[1], x.shape[1]))
        x = x - self.shift
        self.n += len(x)
        self.sum += x.sum(axis=0)
        self.outer += x.T @ x

    def stats(self) -> GaussianStats:
        if self.n < 2:
            raise ValueError(f"need at least 2 feature rows for a covariance, got {self.n}")
        mean = self.sum / self.n
        sigma = (self.outer - self.n * np.outer(mean, mean)) / (self.n - 1)
        return GaussianStats(self.shift + mean, sigma)


def _sqrtm(a: np.ndarray) -> np.ndarray:
    # ADM passed disp=False, deprecated since SciPy 1.16; without it SciPy only warns about singular input.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        return linalg.sqrtm(a)


def frechet_distance(sample: GaussianStats, ref: GaussianStats, method: str = "sqrtm",
                     eps: float = SQRTM_EPS) -> float:
    """||mu_s - mu_r||^2 + tr S_s + tr S_r - 2 tr sqrtm(S_s S_r).

    method "sqrtm" (default) is ADM's computation: scipy.linalg.sqrtm of sample @ reference; a non-finite result
    is retried with eps*I added to both covariances; a complex result is accepted only if its diagonal imaginary
    parts are within 1e-3. method "eigh" takes tr sqrt(S_s^1/2 S_r S_s^1/2) from symmetric eigendecompositions:
    the same value (to ~1e-8 relative) about 5x faster at 2048-d, for quick in-training FID.
    """
    if sample.mu.shape != ref.mu.shape:
        raise ValueError(f"cannot compare stats of dimension {sample.mu.shape[0]} with {ref.mu.shape[0]}")
    if method not in FID_METHODS:
        raise ValueError(f"FID method must be one of {FID_METHODS}, got {method!r}")
    diff = sample.mu - ref.mu
    trace_sqrt = _trace_sqrt_adm if method == "sqrtm" else _trace_sqrt_eigh
    tr_covmean = trace_sqrt(sample.sigma, ref.sigma, eps)
    return float(diff @ diff + np.trace(sample.sigma) + np.trace(ref.sigma) - 2 * tr_covmean)


def _trace_sqrt_adm(s1: np.ndarray, s2: np.ndarray, eps: float) -> float:
    covmean = _sqrtm(s1 @ s2)
    if not np.isfinite(covmean).all():
        warnings.warn(f"FID: sqrtm of the covariance product is not finite; adding {eps} to the diagonals")
        offset = np.eye(s1.shape[0]) * eps
        covmean = _sqrtm((s1 + offset) @ (s2 + offset))
    if np.iscomplexobj(covmean):
        imag = np.abs(np.diagonal(covmean).imag).max()
        if imag > MAX_IMAG_DIAG:
            raise ValueError(f"FID: sqrtm has imaginary diagonal components up to {imag:.3g} (> {MAX_IMAG_DIAG})")
        covmean = covmean.real
    return float(np.trace(covmean))


def _trace_sqrt_eigh(s1: np.ndarray, s2: np.ndarray, eps: float) -> float:
    # S1 S2 is similar to S1^1/2 S2 S1^1/2 (symmetric PSD), so their eigenvalues agree; tiny negative ones are
    # rounding noise of singular covariances and are clipped to 0.
    del eps  # always finite: no retry needed
    w, v = np.linalg.eigh(s1)
    root = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    inner = np.linalg.eigvalsh(root @ s2 @ root)
    return float(np.sqrt(np.clip(inner, 0, None)).sum())


def _softmax_f32(logits: np.ndarray) -> np.ndarray:
    return torch.softmax(torch.as_tensor(np.asarray(logits, dtype=np.float32)), dim=1).numpy()


def inception_score(logits: np.ndarray, split_size: int = IS_SPLIT_SIZE) -> float:
    """ADM's IS: softmax over 1008 classes, contiguous splits of `split_size` in input order (the last may be short),
    mean over splits of exp(mean_i KL(p_i || mean p)). float32 arithmetic as in ADM's numpy code.

    A probability that underflows to exactly 0 makes the score NaN, as in ADM.
    """
    preds = _softmax_f32(logits)  # (N, 1008)
    scores = []
    for start in range(0, len(preds), split_size):
        part = preds[start:start + split_size]
        with np.errstate(divide="ignore", invalid="ignore"):
            kl = part * (np.log(part) - np.log(np.mean(part, axis=0, keepdims=True)))
        scores.append(np.exp(np.mean(np.sum(kl, axis=1))))
    score = float(np.mean(scores))
    if np.isnan(score):
        warnings.warn("IS is NaN: some class probability underflowed to 0 (ADM's formula gives NaN too)")
    return score


def _sq_dists_fp32(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    nu = (u * u).sum(1, keepdim=True)
    nv = (v * v).sum(1)[None]
    return (nu - 2 * (u @ v.T) + nv).clamp_min_(0)


def _sq_dists_adm_fp16(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """ADM's distance block: max(|u|^2 - 2 u.v + |v|^2, 0) with every op in float16, then cast to float32.

    Products of fp16 values are exact in fp32, so an fp32 matmul of the fp16-rounded inputs rounded once to fp16
    is a half matmul with fp32 accumulation (what the GPU does), and it runs on any device.
    Falls back to float32 for the whole block when it is not finite, as ADM does.
    """
    u16, v16 = u.half(), v.half()
    nu = (u16 * u16).float().sum(1).half()[:, None]  # fp16 squares, fp32 accumulation, rounded to fp16
    nv = (v16 * v16).float().sum(1).half()[None]
    mm = (u16.float() @ v16.float().T).half()
    d = ((nu - 2 * mm) + nv).clamp_min_(0)
    if not torch.isfinite(d).all():
        return _sq_dists_fp32(u, v)
    return d.float()


def _dist_fn(mode: str):
    if mode not in ("adm-fp16", "fp32"):
        raise ValueError(f"precision/recall distance mode must be 'adm-fp16' or 'fp32', got {mode!r}")
    return _sq_dists_adm_fp16 if mode == "adm-fp16" else _sq_dists_fp32


def manifold_radii(features: torch.Tensor, k: int = PR_K, block: int = PR_BLOCK, mode: str = "adm-fp16"):
    """(N,) squared distance of each point to its (k+1)-th nearest point in the same set, itself included."""
    dist = _dist_fn(mode)
    n = len(features)
    if n < k + 1:
        raise ValueError(f"precision/recall with k={k} needs at least {k + 1} points per set, got {n}")
    radii = torch.empty(n, dtype=torch.float32, device=features.device)
    for r0 in range(0, n, block):
        rows = features[r0:r0 + block]
        best = None  # (rows, k+1) smallest distances seen so far
        for c0 in range(0, n, block):
            d = dist(rows, features[c0:c0 + block])
            cand = d if best is None else torch.cat([best, d], 1)
            best = cand.topk(min(k + 1, cand.shape[1]), dim=1, largest=False).values
        radii[r0:r0 + block] = best[:, k]
    return radii


def precision_recall(ref: np.ndarray, sample: np.ndarray, k: int = PR_K, block: int = PR_BLOCK,
                     mode: str = "adm-fp16", device="cpu") -> tuple[float, float]:
    """Improved precision/recall (Kynkaanniemi et al. 2019) as ADM computes it on pool3 features.

    Precision: fraction of samples within some reference point's radius; recall: fraction of reference points
    within some sample's radius; squared distances, `<=` membership. ref (M, D), sample (N, D) float32.
    """
    dev = torch.device(device)
    with tf32_disabled():
        r = torch.as_tensor(np.asarray(ref, dtype=np.float32), device=dev)
        s = torch.as_tensor(np.asarray(sample, dtype=np.float32), device=dev)
        r_rad, s_rad = manifold_radii(r, k, block, mode), manifold_radii(s, k, block, mode)
        dist = _dist_fn(mode)
        ref_in = torch.zeros(len(r), dtype=torch.bool, device=dev)
        smp_in = torch.zeros(len(s), dtype=torch.bool, device=dev)
        for i in range(0, len(r), block):
            for j in range(0, len(s), block):
                d = dist(r[i:i + block], s[j:j + block])  # (ref rows, sample cols)
                ref_in[i:i + block] |= (d <= s_rad[None, j:j + block]).any(1)
                smp_in[j:j + block] |= (d <= r_rad[i:i + block, None]).any(0)
    return smp_in.float().mean().item(), ref_in.float().mean().item()
