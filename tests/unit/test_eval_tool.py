"""Sample/reference .npz handling, the evaluation pipeline, and tools/eval_fid.py end to end on random weights."""

import json
import os
import re
import subprocess

import numpy as np
import pytest
from eval_helpers import random_images
from PIL import Image

from maskdit_ds.evaluation import (Activations, GaussianStats, InceptionExtractor, NpzImages, adm_center_crop,
                                   evaluate_npz, frechet_distance, gaussian_stats, load_reference_stats,
                                   open_images, read_stats)
from repo import ROOT, tool, tool_command

# ------------------------------------------------------------------------------------------------ npz reading


@pytest.mark.parametrize("save", [np.savez, np.savez_compressed])
def test_arr0_streams_like_adm_reads_it(tmp_path, save):
    images = random_images(10, size=8)
    save(tmp_path / "s.npz", images, np.arange(10))  # positional: arr_0 images, arr_1 labels (ignored)
    arr = NpzImages(tmp_path / "s.npz")
    assert arr.shape == (10, 8, 8, 3) and arr.dtype == np.uint8 and set(arr.keys) == {"arr_0", "arr_1"}
    batches = list(arr.batches(4))
    assert [len(b) for b in batches] == [4, 4, 2]
    np.testing.assert_array_equal(np.concatenate(batches), images)
    np.testing.assert_array_equal(np.concatenate(list(arr.batches(3, limit=7))), images[:7])
    np.testing.assert_array_equal(arr.read(), np.load(tmp_path / "s.npz")["arr_0"])


def test_fortran_order_falls_back_to_full_load(tmp_path):
    images = np.asfortranarray(random_images(5, size=6))
    np.savez(tmp_path / "f.npz", arr_0=images)
    np.testing.assert_array_equal(NpzImages(tmp_path / "f.npz").read(), images)


def test_missing_arr0_names_the_keys(tmp_path):
    np.savez(tmp_path / "k.npz", images=random_images(2, size=4))
    with pytest.raises(KeyError, match=r"no array 'arr_0' \(found keys \['images'\]\)"):
        NpzImages(tmp_path / "k.npz")


@pytest.mark.parametrize("array, match", [
    (random_images(4, size=8).astype(np.float32) / 255, r"dtype float32, expected uint8 .*values in \[0, 1\]"),
    (random_images(4, size=8).astype(np.float32) / 127.5 - 1, r"dtype float32.*values in \[-1, 1\]"),
    (random_images(4, size=8).transpose(0, 3, 1, 2).copy(), r"\(4, 3, 8, 8\), expected NHWC .*looks like NCHW"),
    (random_images(4, size=8)[..., 0].copy(), r"shape \(4, 8, 8\), expected 4 dims"),
    (random_images(4, size=8)[..., :1].copy(), r"expected NHWC RGB"),
])
def test_bad_sample_arrays_are_rejected(tmp_path, array, match):
    np.savez(tmp_path / "bad.npz", array)
    with pytest.raises(ValueError, match=match) as err:
        open_images(tmp_path / "bad.npz")
    assert "bad.npz" in str(err.value)


def test_wrong_resolution_and_too_few_images_are_rejected(tmp_path):
    np.savez(tmp_path / "s.npz", random_images(4, size=8))
    with pytest.raises(ValueError, match=r"has 8x8 images, the reference batch has 16x16"):
        open_images(tmp_path / "s.npz", resolution=(16, 16))
    with pytest.raises(ValueError, match=r"has 4 images in arr_0, but 5 were asked for"):
        open_images(tmp_path / "s.npz", num_images=5)


def test_reference_stats_are_read_as_float64_and_must_be_complete(tmp_path):
    rng = np.random.default_rng(0)
    stats = dict(mu=rng.normal(size=2048).astype(np.float32), sigma=np.eye(2048, dtype=np.float32),
                 mu_s=np.zeros(2023, np.float32), sigma_s=np.eye(2023, dtype=np.float32))
    np.savez(tmp_path / "ref.npz", arr_0=random_images(4, size=8), **stats)
    pool3, spatial = read_stats(tmp_path / "ref.npz")
    assert pool3.mu.dtype == np.float64 and spatial.sigma.dtype == np.float64
    np.testing.assert_array_equal(pool3.mu, stats["mu"].astype(np.float64))
    del stats["sigma_s"]
    np.savez(tmp_path / "partial.npz", arr_0=random_images(4, size=8), **stats)
    with pytest.raises(ValueError, match=r"lacks \['sigma_s'\]"):
        read_stats(tmp_path / "partial.npz")
    np.savez(tmp_path / "plain.npz", random_images(2, size=4))
    assert read_stats(tmp_path / "plain.npz") is None


def test_adm_center_crop():
    wide = Image.fromarray(random_images(1, size=80)[0]).resize((160, 90))
    out = adm_center_crop(wide, 32)  # 90 >= 64: BOX-halve to 80x45, bicubic short side to 32 (57x32), crop
    assert out.shape == (32, 32, 3) and out.dtype == np.uint8
    half = wide.resize((80, 45), resample=Image.Resampling.BOX)
    expected = np.asarray(half.resize((57, 32), resample=Image.Resampling.BICUBIC))[:, 12:44]
    np.testing.assert_array_equal(out, expected)


# ------------------------------------------------------------------------------------------------ pipeline


class PixelExtractor(InceptionExtractor):
    """Stand-in for the network in pipeline tests: fixed random projections of the pixels to small feature
    sizes (2048-d FIDs cost ~30 s of scipy sqrtm each on this CPU); counts the images it sees."""

    feature_dims = (16, 12)

    def __init__(self, pixels: int):
        rng = np.random.default_rng(0)
        self.proj = [rng.normal(0, 0.05, (pixels, d)).astype(np.float32) for d in (16, 12, 10)]
        self.device, self.batch_size, self.weights_sha256, self.images_seen = "cpu", 8, "ab" * 32, 0

    def __call__(self, images):
        x = np.asarray(images).reshape(len(images), -1).astype(np.float32) / 255
        self.images_seen += len(x)
        return Activations(*(x @ p for p in self.proj))


def test_stored_reference_stats_are_used_and_activations_cached(tmp_path):
    samples, real = random_images(12, size=8, seed=1), random_images(10, size=8, seed=2)
    ex = PixelExtractor(8 * 8 * 3)
    other = ex(random_images(30, size=8, seed=3))  # stats of another set: FID must use these, not arr_0's
    ex.images_seen = 0
    stored = gaussian_stats(other.pool3), gaussian_stats(other.spatial)
    np.savez(tmp_path / "ref.npz", arr_0=real, mu=stored[0].mu, sigma=stored[0].sigma, mu_s=stored[1].mu,
             sigma_s=stored[1].sigma)
    np.savez(tmp_path / "s.npz", samples)
    with pytest.warns(UserWarning, match="ADM's FID-50K uses 50000"):
        m = evaluate_npz(tmp_path / "s.npz", tmp_path / "ref.npz", ex, cache_dir=tmp_path / "cache", progress=False)
    assert ex.images_seen == 22  # arr_0 still goes through the network (precision/recall)
    acts = ex(samples)
    # rel 1e-6: evaluate_npz extracts features in batches of 8, this line in one batch; float32 matmuls block
    # differently by batch size and CPU kernel (~1e-7 relative per feature; 2.5e-8 seen in the FID on an AVX2 CPU)
    assert m["fid"] == pytest.approx(frechet_distance(gaussian_stats(acts.pool3), stored[0]), rel=1e-6)
    assert m["sfid"] == pytest.approx(frechet_distance(gaussian_stats(acts.spatial), stored[1]), rel=1e-6)
    assert m["reference_stats"] == "npz" and m["num_reference_images"] == 10 and m["num_samples"] == 12
    assert len(list((tmp_path / "cache").glob("ref.acts-*-abababababababab-v1.npz"))) == 1
    ex.images_seen = 0
    with pytest.warns(UserWarning):
        again = evaluate_npz(tmp_path / "s.npz", tmp_path / "ref.npz", ex, cache_dir=tmp_path / "cache",
                             progress=False)
    assert ex.images_seen == 12 and again["fid"] == m["fid"] and again["recall"] == m["recall"]  # cache hit
    ex.images_seen = 0
    assert load_reference_stats(tmp_path / "ref.npz", ex).pool3.mu == pytest.approx(stored[0].mu)
    assert ex.images_seen == 0  # stored stats: no network pass


def test_bad_inputs_fail_before_any_inception_pass(tmp_path):
    ex = PixelExtractor(8 * 8 * 3)
    np.savez(tmp_path / "ref.npz", random_images(6, size=8))
    np.savez(tmp_path / "s16.npz", random_images(6, size=16))
    np.savez(tmp_path / "s8.npz", random_images(6, size=8))
    with pytest.raises(ValueError, match="16x16 images, the reference batch has 8x8"):
        evaluate_npz(tmp_path / "s16.npz", tmp_path / "ref.npz", ex, progress=False)
    with pytest.raises(ValueError, match="6 images in arr_0, but 7 were asked for"):
        evaluate_npz(tmp_path / "s8.npz", tmp_path / "ref.npz", ex, num_samples=7, progress=False)
    assert ex.images_seen == 0


def test_sample_file_with_stats_uses_them_like_adm(tmp_path):
    ex = PixelExtractor(8 * 8 * 3)
    images = random_images(8, size=8)
    acts = ex(images)
    ref = gaussian_stats(acts.pool3), gaussian_stats(acts.spatial)
    np.savez(tmp_path / "ref.npz", arr_0=images, mu=ref[0].mu, sigma=ref[0].sigma, mu_s=ref[1].mu, sigma_s=ref[1].sigma)
    shifted = GaussianStats(ref[0].mu + 1.0, ref[0].sigma)  # FID exactly 16 * 1^2 against ref
    np.savez(tmp_path / "s.npz", arr_0=images, mu=shifted.mu, sigma=shifted.sigma, mu_s=ref[1].mu,
             sigma_s=ref[1].sigma)
    with pytest.warns(UserWarning, match="stores mu/sigma"):
        m = evaluate_npz(tmp_path / "s.npz", tmp_path / "ref.npz", ex, use_cache=False, progress=False)
    assert m["fid"] == pytest.approx(16.0, rel=1e-6) and m["sample_stats"] == "npz"
    assert m["precision"] == 1.0 and m["recall"] == 1.0  # P/R still from the images


# ------------------------------------------------------------------------------------------------ CLI


def _strs(*args):
    return [str(a) for a in args]


def _run_tool(*args):
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    return subprocess.run(tool_command("eval_fid", *args), capture_output=True, text=True, timeout=300, env=env,
                          cwd=ROOT)


def test_cli_identical_sets(tmp_path, inception_weights):
    path, sha = inception_weights
    images = random_images(8, size=32, seed=4)
    np.savez(tmp_path / "samples.npz", images)  # positional, like MaskDiT's png2npz
    np.savez_compressed(tmp_path / "ref.npz", arr_0=images)  # no stats: computed from arr_0
    res = _run_tool(tmp_path / "samples.npz", tmp_path / "ref.npz", "--weights", path, "--weights-sha256", sha,
                    "--out", tmp_path / "m.json", "--batch-size", 6, "--device", "cpu", "--no-progress",
                    "--fid-method", "eigh")  # ADM's scipy sqrtm takes ~30 s per 2048-d FID here
    assert res.returncode == 0, res.stderr
    lines = [ln.split(":")[0] for ln in res.stdout.splitlines()[:5]]
    assert lines == ["Inception Score", "FID", "sFID", "Precision", "Recall"]  # ADM's order
    m = json.loads((tmp_path / "m.json").read_text())
    assert abs(m["fid"]) < 1e-3 and abs(m["sfid"]) < 1e-3  # 8 points: rank-7 covariances, rounding ~1e-5
    assert m["precision"] == 1.0 and m["recall"] == 1.0 and m["inception_score"] >= 1.0
    assert m["weights_sha256"] == sha and m["num_samples"] == 8 and m["num_reference_images"] == 8
    assert m["reference_stats"] == "arr_0" and "tf1-legacy" in m["protocol"]["resize"]
    assert len(list(tmp_path.glob("ref.acts-*.npz"))) == 1  # reference activations cached next to the ref


def test_cli_rejects_weights_that_are_not_the_official_file(tmp_path, inception_weights, capsys):
    eval_fid = tool("eval_fid")
    path, _ = inception_weights  # random weights, checked against the official size/hash unless told otherwise
    np.savez(tmp_path / "s.npz", random_images(4, size=8))
    assert eval_fid.main(_strs(tmp_path / "s.npz", tmp_path / "s.npz", "--weights", path, "--no-progress")) == 2
    assert re.fullmatch(r"error: Inception weight file .*random_inception.pth has [0-9,]+ bytes, expected "
                        r"95,628,359: .*\n", capsys.readouterr().err)
    assert eval_fid.main(_strs(tmp_path / "s.npz", tmp_path / "s.npz", "--weights", path,
                               "--weights-sha256", "1" * 64)) == 2
    assert re.fullmatch(r"error: .* has sha256 .*, expected 1{64}: wrong file .*\n", capsys.readouterr().err)


def test_cli_ref_subcommand_builds_a_reference_that_evaluates(tmp_path, inception_weights, monkeypatch):
    eval_fid = tool("eval_fid")  # in-process: saves a second interpreter start
    path, sha = inception_weights
    folder = tmp_path / "real"
    for i, (w, h) in enumerate([(48, 40), (64, 64), (40, 56), (33, 33), (80, 36)]):
        (folder / f"class{i % 2}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(random_images(1, size=96, seed=10 + i)[0]).resize((w, h)).save(folder / f"class{i % 2}/{i}.png")
    eval_fid.main(_strs("ref", "--images", folder, "--out", tmp_path / "REF.npz", "--resolution", 32,
                        "--weights", path, "--weights-sha256", sha, "--device", "cpu", "--batch-size", 5,
                        "--no-progress"))
    with np.load(tmp_path / "REF.npz") as ref:
        assert ref["arr_0"].shape == (5, 32, 32, 3) and ref["arr_0"].dtype == np.uint8
        assert ref["mu"].shape == (2048,) and ref["sigma"].shape == (2048, 2048)
        assert ref["mu_s"].shape == (2023,) and ref["sigma_s"].shape == (2023, 2023)
        np.testing.assert_allclose(ref["sigma"], ref["sigma"].T)
    np.savez(tmp_path / "samples.npz", random_images(6, size=32, seed=5))
    with pytest.warns(UserWarning, match="FID-50K"):
        eval_fid.main(_strs(tmp_path / "samples.npz", tmp_path / "REF.npz", "--weights", path, "--weights-sha256",
                            sha, "--out", tmp_path / "m.json", "--device", "cpu", "--batch-size", 6, "--no-progress",
                            "--fid-method", "eigh"))
    m = json.loads((tmp_path / "m.json").read_text())
    assert m["reference_stats"] == "npz" and m["fid"] > 0 and all(
        np.isfinite(m[k]) for k in ("inception_score", "fid", "sfid", "precision", "recall"))
