"""Generation into ADM .npz files in one process: the file layout ADM reads, resume after a kill, half-precision sampling, input errors, and the digits example scored by the eval command."""

import json
import subprocess
import zipfile

import launch as _launch
from launch import export_random
import numpy as np
import pytest
from repo import ROOT, tool, tool_command

from maskdit_ds.model.export import load_pretrained
from maskdit_ds.generation import run as gen
from maskdit_ds.evaluation import NpzImages
from maskdit_ds.config import SamplerConfig


def small(**kw) -> gen.GenerateConfig:
    base = dict(num_images=7, chunk_size=3, batch_size=2, grid=4, sampler=SamplerConfig(steps=3, guidance=1.5))
    return gen.GenerateConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return export_random(tmp_path_factory.mktemp("m") / "export" / "step_0000007")


def test_npz_is_read_as_adm_reads_it(tmp_path, model):
    npz = gen.run_generation(model, tmp_path, small(), progress=False)
    with zipfile.ZipFile(npz) as zf:
        assert sorted(zf.namelist()) == ["arr_0.npy", "arr_1.npy"]
    with np.load(npz) as z:  # ADM: np.load(path)["arr_0"], then float32 batches
        images, labels = z["arr_0"], z["arr_1"]
    assert images.dtype == np.uint8 and images.shape == (7, 8, 8, 3) and labels.dtype == np.int64
    streamed = np.concatenate(list(NpzImages(npz).batches(3)))  # ADM's header parse + raw-byte reader
    assert np.array_equal(streamed, images)
    assert 0 <= labels.min() and labels.max() < 5
    # labels are the seeds' own draws: the same as sampling those seeds directly
    net = load_pretrained(model)
    direct, drawn = gen.sample_pixels(net, range(7), None, (3, 8, 8), small(), "cpu")
    assert np.array_equal(direct, images) and np.array_equal(drawn, labels)
    assert (tmp_path / "samples.png").is_file() and json.loads((tmp_path / "samples.json").read_text())[
        "rounding"] == "floor"


def test_killed_run_resumes_without_redoing_finished_chunks(tmp_path, model, monkeypatch):
    clean = gen.run_generation(model, tmp_path / "clean", small(), progress=False)
    real_write, calls = gen.write_chunk, []

    def dies_after_two(out, index, *args):
        if len(calls) == 2:
            raise KeyboardInterrupt("killed")
        calls.append(index)
        real_write(out, index, *args)

    monkeypatch.setattr(gen, "write_chunk", dies_after_two)
    with pytest.raises(KeyboardInterrupt, match="killed"):
        gen.run_generation(model, tmp_path / "run", small(), progress=False)
    monkeypatch.setattr(gen, "write_chunk", real_write)
    names = sorted(p.name for p in (tmp_path / "run/chunks").glob("*.npz"))
    assert names == ["chunk_000000.npz", "chunk_000001.npz"]
    (tmp_path / "run/chunks/chunk_000001.npz").write_bytes(b"torn by the kill")  # a half-written chunk is redone
    sampled = []
    real_sample = gen.sample_pixels
    monkeypatch.setattr(gen, "sample_pixels", lambda net, seeds, *a, **k: sampled.append(list(seeds))
                        or real_sample(net, seeds, *a, **k))
    resumed = gen.run_generation(model, tmp_path / "run", small(), progress=False)
    assert sampled == [[3, 4, 5], [6]]  # chunk 0 kept; torn chunk 1 and missing chunk 2 redone
    with np.load(clean) as a, np.load(resumed) as b:
        assert np.array_equal(a["arr_0"], b["arr_0"]) and np.array_equal(a["arr_1"], b["arr_1"])
    sampled.clear()
    gen.run_generation(model, tmp_path / "run", small(), progress=False)  # complete: nothing to do
    assert sampled == []


def test_bf16_autocast_keeps_the_solver_in_float64_and_stays_close(tmp_path, model):
    a = gen.run_generation(model, tmp_path / "fp32", small(), progress=False)
    b = gen.run_generation(model, tmp_path / "bf16", small(sampler=SamplerConfig(steps=3, guidance=1.5, precision="bf16")), progress=False)
    with np.load(a) as x, np.load(b) as y:
        diff = np.abs(x["arr_0"].astype(int) - y["arr_0"].astype(int))
        assert np.array_equal(x["arr_1"], y["arr_1"]) and diff.mean() < 8
    assert json.loads((tmp_path / "bf16/samples.json").read_text())["solver_dtype"] == "float64"


def test_bad_inputs_fail_early_with_the_reason(tmp_path, model):
    with pytest.raises(FileNotFoundError, match="no such export folder or run directory"):
        gen.run_generation(tmp_path / "nope", tmp_path / "o", small())
    latent = export_random(tmp_path / "latent", channels=4)
    with pytest.raises(ValueError, match="4-channel latents: pass a VAE"):
        gen.run_generation(latent, tmp_path / "o", small())
    with pytest.raises(ValueError, match="num_images must be positive, got 0; class_mode must be one of .* got 'sorted'"):
        gen.run_generation(model, tmp_path / "o", small(class_mode="sorted", num_images=0))
    gen.run_generation(model, tmp_path / "o", small(keep_chunks=True), progress=False)
    with pytest.raises(ValueError, match="other settings \\(sampler differ"):
        gen.run_generation(model, tmp_path / "o", small(keep_chunks=True, sampler=SamplerConfig(steps=4)))
    res = subprocess.run(tool_command("sample", latent, "--out", tmp_path / "x"), cwd=ROOT,
                         env=_launch.env(), capture_output=True, text=True, timeout=120)
    assert res.returncode != 0 and "error: generate: model MaskDiT-T/2 works on 4-channel latents" in res.stderr


def test_run_directory_uses_its_newest_export(tmp_path):
    run = tmp_path / "run"
    export_random(run / "export" / "step_0000002", seed=1)
    export_random(run / "export" / "step_0000010", seed=2)
    folder, config, data = gen.model_source(run)
    assert folder.name == "step_0000010" and config["step"] == 7 and data == {}


def test_balanced_labels_are_balanced_and_not_sorted():
    labels = gen.balanced_labels(1000, 10, seed=0)
    assert np.bincount(labels).tolist() == [100] * 10
    assert not np.array_equal(labels, np.sort(labels))
    assert np.array_equal(labels, gen.balanced_labels(1000, 10, seed=0))


def test_digits_samples_scored_end_to_end_by_eval_fid(tmp_path, inception_weights):
    """The example's shape (MaskDiT-Digits/2, 16 px, 1 channel, 10 classes): sample, build the real-digits
    reference, evaluate, all through the CLIs (in-process). Random Inception weights: plumbing, not quality."""
    model = export_random(tmp_path / "digits", name="MaskDiT-Digits/2", size=16, channels=1, classes=10)
    weights, sha = inception_weights
    tool("sample").main([str(model), "--out", str(tmp_path / "s"), "--num-images", "8", "--steps", "2",
                         "--no-progress"])
    tool("digits_reference").main(["--out", str(tmp_path / "real.npz"), "--resolution", "16"])
    with np.load(tmp_path / "real.npz") as real:
        assert real["arr_0"].shape == (1797, 16, 16, 3) and real["arr_0"].dtype == np.uint8
        assert real["arr_1"].shape == (1797,)
        few_real = real["arr_0"][:12]  # keep the CPU Inception passes short
    np.savez(tmp_path / "real12.npz", arr_0=few_real)
    common = ["--weights", str(weights), "--weights-sha256", sha, "--device", "cpu", "--batch-size", "12",
              "--no-progress"]
    eval_fid = tool("eval_fid")
    eval_fid.main(["ref", "--images", str(tmp_path / "real12.npz"), "--out", str(tmp_path / "ref.npz"), *common])
    with pytest.warns(UserWarning, match="FID-50K"):
        eval_fid.main([str(tmp_path / "s/samples.npz"), str(tmp_path / "ref.npz"), "--out", str(tmp_path / "m.json"),
                       "--fid-method", "eigh", *common])
    m = json.loads((tmp_path / "m.json").read_text())
    assert m["num_samples"] == 8 and m["num_reference_images"] == 12 and m["resolution"] == [16, 16]
    assert all(np.isfinite(m[k]) for k in ("inception_score", "fid", "sfid", "precision", "recall"))
    assert m["fid"] > 0 and m["reference_stats"] == "npz"
