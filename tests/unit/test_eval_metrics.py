"""ADM metric formulas (FID, IS, precision/recall) against independent computations on synthetic features."""

import numpy as np
import pytest
import torch

from maskdit_ds.evaluation import metrics
from maskdit_ds.evaluation.metrics import (GaussianStats, RunningGaussian, frechet_distance, gaussian_stats,
                                           inception_score, manifold_radii, precision_recall)


# ------------------------------------------------------------------------------------------------ FID


def _spd(rng, d):
    a = rng.normal(size=(d, d))
    return a @ a.T / d + 0.1 * np.eye(d)


def test_fid_of_identical_sets_is_zero():
    feats = np.random.default_rng(0).normal(size=(400, 32)).astype(np.float32)
    s = gaussian_stats(feats)
    assert abs(frechet_distance(s, s)) < 1e-6


def test_fid_matches_closed_form_for_diagonal_gaussians():
    rng = np.random.default_rng(1)
    mu1, mu2 = rng.normal(size=20), rng.normal(size=20)
    a, b = rng.uniform(0.1, 3, 20), rng.uniform(0.1, 3, 20)
    # Frechet distance of N(mu1, diag a) and N(mu2, diag b): |mu1 - mu2|^2 + sum (sqrt a - sqrt b)^2
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    got = frechet_distance(GaussianStats(mu1, np.diag(a)), GaussianStats(mu2, np.diag(b)))
    assert got == pytest.approx(expected, rel=1e-10)  # float64 LAPACK on 20x20: ~1e-14 on any CPU


def test_fid_matches_symmetric_eigh_route_on_full_covariances():
    rng = np.random.default_rng(2)
    s1, s2 = _spd(rng, 30), _spd(rng, 30)
    mu1, mu2 = rng.normal(size=30), rng.normal(size=30)
    # tr sqrt(S1 S2) = tr sqrt(S1^1/2 S2 S1^1/2), computed with symmetric eigendecompositions only
    w, v = np.linalg.eigh(s1)
    root1 = v @ np.diag(np.sqrt(w)) @ v.T
    inner = np.linalg.eigvalsh(root1 @ s2 @ root1)
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.sum(np.sqrt(inner))
    assert frechet_distance(GaussianStats(mu1, s1), GaussianStats(mu2, s2)) == pytest.approx(expected, rel=1e-9)  # float64, 30x30 SPD


@pytest.mark.parametrize("rank", [40, 12])
def test_eigh_route_agrees_with_adm_sqrtm(rank):
    rng = np.random.default_rng(rank)
    x = rng.normal(size=(rank + 1, 40)).astype(np.float32)  # rank 12: singular sample covariance
    s = gaussian_stats(x @ rng.normal(size=(40, 40)).astype(np.float32))
    r = gaussian_stats(rng.normal(0.3, 1.2, size=(500, 40)).astype(np.float32))
    assert frechet_distance(s, r, "eigh") == pytest.approx(frechet_distance(s, r, "sqrtm"), rel=1e-8)
    with pytest.raises(ValueError, match="FID method"):
        frechet_distance(s, r, "eig")


def test_gaussian_stats_follow_adm_dtypes():
    feats = np.random.default_rng(3).normal(2.0, 1.5, size=(300, 8)).astype(np.float32)
    s = gaussian_stats(feats)
    assert s.mu.dtype == np.float64 and s.sigma.dtype == np.float64
    np.testing.assert_array_equal(s.mu, np.mean(feats, axis=0).astype(np.float64))  # float32 mean, as ADM
    np.testing.assert_allclose(s.sigma, np.cov(feats.astype(np.float64), rowvar=False), rtol=1e-12)
    # unbiased: divides by N - 1
    centred = feats.astype(np.float64) - feats.astype(np.float64).mean(0)
    np.testing.assert_allclose(s.sigma, centred.T @ centred / (len(feats) - 1), rtol=1e-10)


def test_running_gaussian_matches_batch_stats():
    feats = np.random.default_rng(4).normal(50.0, 2.0, size=(1000, 6)).astype(np.float32)
    acc = RunningGaussian()
    for chunk in np.array_split(feats, 7):
        acc.update(chunk)
    s = acc.stats()
    np.testing.assert_allclose(s.mu, feats.astype(np.float64).mean(0), rtol=1e-12)
    np.testing.assert_allclose(s.sigma, np.cov(feats.astype(np.float64), rowvar=False), rtol=1e-9, atol=1e-12)


def test_fid_eps_retry_when_sqrtm_is_not_finite(monkeypatch):
    real_sqrtm, calls = metrics._sqrtm, []

    def flaky(a):  # first call fails the way a singular product can
        calls.append(a)
        return np.full_like(a, np.nan) if len(calls) == 1 else real_sqrtm(a)

    monkeypatch.setattr(metrics, "_sqrtm", flaky)
    a, b = np.array([1.0, 2.0, 0.5]), np.array([0.5, 4.0, 1.0])
    eps = metrics.SQRTM_EPS
    with pytest.warns(UserWarning, match="not finite"):
        got = frechet_distance(GaussianStats(np.zeros(3), np.diag(a)), GaussianStats(np.zeros(3), np.diag(b)))
    # ADM adds eps*I to both covariances inside sqrtm only; the traces stay unshifted
    expected = a.sum() + b.sum() - 2 * np.sum(np.sqrt((a + eps) * (b + eps)))
    assert len(calls) == 2 and got == pytest.approx(expected, rel=1e-10)  # float64 3x3: ~1e-15 on any CPU


@pytest.mark.parametrize("imag, fails", [(1e-4, False), (1e-2, True)])
def test_fid_rejects_large_imaginary_diagonal(monkeypatch, imag, fails):
    monkeypatch.setattr(metrics, "_sqrtm", lambda a: np.eye(len(a)) * (1 + 1j * imag))
    s = GaussianStats(np.zeros(2), np.eye(2))
    if fails:
        with pytest.raises(ValueError, match="imaginary"):
            frechet_distance(s, s)
    else:
        assert frechet_distance(s, s) == pytest.approx(0.0)  # real part kept: 2 + 2 - 2 * 2


def test_fid_dimension_mismatch_is_an_error():
    with pytest.raises(ValueError, match="dimension"):
        frechet_distance(GaussianStats(np.zeros(3), np.eye(3)), GaussianStats(np.zeros(4), np.eye(4)))


# ------------------------------------------------------------------------------------------------ IS


def _class_logits(classes, num_classes=1008, peak=30.0):
    logits = np.zeros((len(classes), num_classes), np.float32)
    logits[np.arange(len(classes)), classes] = peak
    return logits


def _is_float64(logits, split):
    """Independent IS: float64 log-softmax, explicit KL per split."""
    logits = logits.astype(np.float64)
    logp = logits - logits.max(1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(1, keepdims=True))
    scores = []
    for s in range(0, len(logp), split):
        part = logp[s:s + split]
        log_marg = np.log(np.exp(part).mean(0))
        scores.append(np.exp(np.mean(np.sum(np.exp(part) * (part - log_marg), 1))))
    return np.mean(scores)


def test_is_of_uniform_predictions_is_one():
    assert inception_score(np.zeros((100, 1008), np.float32)) == pytest.approx(1.0, abs=1e-5)  # float32 rounding


def test_is_of_confident_distinct_classes_is_the_class_count():
    logits = _class_logits(np.arange(1000) % 10)
    got = inception_score(logits)
    assert got == pytest.approx(10.0, rel=1e-4)
    assert got == pytest.approx(_is_float64(logits, 5000), rel=1e-5)


def test_is_splits_contiguously_in_file_order():
    # 12,345 rows -> splits of 5000, 5000, 2345 holding 2, 4 and 5 classes (each class-balanced within its split)
    classes = np.concatenate([np.arange(5000) % 2, 10 + np.arange(5000) % 4, 20 + np.arange(2345) % 5])
    logits = _class_logits(classes)
    got = inception_score(logits)
    assert got == pytest.approx((2 + 4 + 5) / 3, rel=1e-4)
    assert got == pytest.approx(_is_float64(logits, 5000), rel=1e-5)
    # equal-size or shuffled splits (torch-fidelity/torchmetrics) would mix the class groups: not ADM's number
    assert abs(_is_float64(logits, 4115) - got) > 0.1


def test_is_class_sorted_file_caps_the_score():
    sorted_classes = np.repeat(np.arange(20), 50)  # 1000 samples, class-sorted, split size 500
    assert inception_score(_class_logits(sorted_classes), split_size=500) == pytest.approx(10.0, rel=1e-4)
    assert inception_score(_class_logits(np.arange(1000) % 20), split_size=500) == pytest.approx(20.0, rel=1e-4)


def test_is_underflowed_probability_gives_nan_like_adm():
    logits = _class_logits(np.arange(10) % 2, peak=200.0)  # exp(-200) underflows to 0 in float32
    with pytest.warns(UserWarning, match="underflow"):
        assert np.isnan(inception_score(logits))


# ------------------------------------------------------------------------------------------------ P/R


def _line(xs):
    """1-D points embedded in 2-D."""
    return np.stack([np.asarray(xs, np.float32), np.zeros(len(xs), np.float32)], 1)


REF = [0, 1, 2, 3, 9]  # squared radii (4th smallest incl. self): 9, 4, 4, 9, 64
SMP = [12, 13, 14, 15, 17, 19]  # squared radii: 9, 4, 4, 4, 9, 25


@pytest.mark.parametrize("mode", ["adm-fp16", "fp32"])
def test_manifold_radii_hand_computed(mode):
    np.testing.assert_array_equal(manifold_radii(torch.tensor(_line(REF)), mode=mode).numpy(), [9, 4, 4, 9, 64])
    np.testing.assert_array_equal(manifold_radii(torch.tensor(_line(SMP)), mode=mode).numpy(), [9, 4, 4, 4, 9, 25])


@pytest.mark.parametrize("mode", ["adm-fp16", "fp32"])
def test_precision_recall_hand_computed_with_ties(mode):
    # precision: 12..15 lie within ref 9's ball (r=64); 17 is at exactly 64 (tie counts); 19 at 100 does not.
    # recall: ref 9 is at exactly 9 from sample 12 (r=9, tie counts); refs 0..3 are outside every sample ball.
    # With a strict < both ties would drop out: 4/6 and 0.
    p, r = precision_recall(_line(REF), _line(SMP), mode=mode)
    assert p == pytest.approx(5 / 6) and r == pytest.approx(1 / 5)
    # swapping the roles swaps the numbers
    p2, r2 = precision_recall(_line(SMP), _line(REF), mode=mode)
    assert p2 == pytest.approx(1 / 5) and r2 == pytest.approx(5 / 6)


def _brute_force_pr(ref, smp, k=3):
    """Exact integer arithmetic: squared distances, radius = (k+1)-th smallest incl. self, <= membership."""
    ref, smp = ref.astype(np.int64), smp.astype(np.int64)
    d = lambda a, b: ((a[:, None, :] - b[None, :, :]) ** 2).sum(-1)  # noqa: E731
    r_ref, r_smp = np.sort(d(ref, ref), 1)[:, k], np.sort(d(smp, smp), 1)[:, k]
    cross = d(ref, smp)  # (M, N)
    return (cross <= r_ref[:, None]).any(0).mean(), (cross <= r_smp[None, :]).any(1).mean()


@pytest.mark.parametrize("mode", ["adm-fp16", "fp32"])
@pytest.mark.parametrize("block", [7, 64, 10_000])
def test_precision_recall_matches_brute_force_on_integer_features(mode, block):
    # small integers keep every fp16 intermediate exact (norms <= 16*49 < 2048) and make ties frequent
    rng = np.random.default_rng(5)
    ref, smp = rng.integers(0, 8, (60, 16)), rng.integers(0, 8, (45, 16))
    p, r = precision_recall(ref.astype(np.float32), smp.astype(np.float32), block=block, mode=mode)
    bp, br = _brute_force_pr(ref, smp)
    assert (p, r) == (pytest.approx(bp), pytest.approx(br))
    assert 0 < bp < 1 and 0 < br < 1


def test_fp16_overflow_falls_back_to_fp32():
    rng = np.random.default_rng(6)
    ref, smp = rng.integers(0, 300, (30, 8)), rng.integers(100, 400, (25, 8))  # norms up to ~1e6 >> 65504
    p, r = precision_recall(ref.astype(np.float32), smp.astype(np.float32), block=16, mode="adm-fp16")
    bp, br = _brute_force_pr(ref, smp)
    assert (p, r) == (pytest.approx(bp), pytest.approx(br))


def test_adm_fp16_distances_are_half_precision_values():
    rng = np.random.default_rng(7)
    u, v = (torch.tensor(rng.normal(0, 1, (50, 64)), dtype=torch.float32) for _ in range(2))
    d16, d32 = metrics._sq_dists_adm_fp16(u, v), metrics._sq_dists_fp32(u, v)
    assert d16.dtype == torch.float32
    torch.testing.assert_close(d16, d16.half().float(), rtol=0, atol=0)  # every entry is an fp16 number
    assert (d16 != d32).float().mean() > 0.5  # and it is not the fp32 computation
    # numpy emulation of ADM's TF graph: fp16 squares, fp32-accumulated sums and matmul rounded to fp16
    u16, v16 = u.numpy().astype(np.float16), v.numpy().astype(np.float16)
    nu = (u16 * u16).sum(1, dtype=np.float32).astype(np.float16)[:, None]
    nv = (v16 * v16).sum(1, dtype=np.float32).astype(np.float16)[None]
    mm = (u16.astype(np.float32) @ v16.astype(np.float32).T).astype(np.float16)
    ref = np.maximum((nu - np.float16(2) * mm) + nv, np.float16(0)).astype(np.float32)
    assert (d16.numpy() == ref).mean() > 0.99  # fp32 summation order may flip a few last fp16 bits
    np.testing.assert_allclose(d16.numpy(), ref, rtol=2e-3, atol=1e-2)


def test_precision_recall_needs_k_plus_one_points():
    with pytest.raises(ValueError, match="at least 4 points"):
        precision_recall(_line([0, 1, 2]), _line([0, 1, 2, 3]))
    with pytest.raises(ValueError, match="adm-fp16"):
        precision_recall(_line(REF), _line(SMP), mode="fp64")
