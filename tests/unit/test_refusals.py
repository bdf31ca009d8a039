"""The refusal table (errors.py): every command answers a bad input, a full disk or a hostile file with one line
and the same exit code, through the real CLI (maskdit_ds.__main__.main) where that is cheap."""
import errno
import json
import os
import re

import numpy as np
import pytest
import torch

from maskdit_ds.errors import (EXIT_CONFIG, EXIT_DIVERGED, EXIT_STORAGE, ConfigError, InputError, StorageError,
                               TrainingError, refusal)

from eval_helpers import write_weights
from launch import export_random


def run_cli(capsys, *argv) -> tuple[int, str]:
    from maskdit_ds.__main__ import main

    code = main([str(a) for a in argv])
    return code, capsys.readouterr().err


def one_line(err: str, pattern: str) -> None:
    """stderr is exactly one line matching `pattern` (a regex anchored at both ends)."""
    assert err.count("\n") == 1 and re.fullmatch(pattern + r"\n", err), err


# ------------------------------------------------------------------------------------------------ the table


@pytest.mark.parametrize("err, expected", [
    (ConfigError("x"), ("config error", EXIT_CONFIG)),
    (InputError("x"), ("error", EXIT_CONFIG)),
    (TrainingError("x"), ("training stopped", EXIT_DIVERGED)),
    (StorageError("x"), ("storage error", EXIT_STORAGE)),
    (OSError(errno.ENOSPC, "No space left on device"), ("storage error", EXIT_STORAGE)),
    (OSError(errno.EIO, "Input/output error"), ("storage error", EXIT_STORAGE)),
    # what torch.save and safetensors raise on a full disk (seen on a 1 MiB tmpfs)
    (RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598"),
     ("storage error", EXIT_STORAGE)),
    (RuntimeError("write(): fd 3 failed with No space left on device"), ("storage error", EXIT_STORAGE)),
    (Exception("Error while serializing: I/O error: No space left on device (os error 28)"),
     ("storage error", EXIT_STORAGE)),
    (FileNotFoundError(errno.ENOENT, "x"), ("error", EXIT_CONFIG)),
    (KeyError("x"), None),  # not a refusal: a bug keeps its traceback
    (RuntimeError("[enforce fail at inline_container.cc:325] . PytorchStreamReader failed reading zip archive"),
     None),  # a read, not a write: not the storage error
])
def test_the_refusal_table(err, expected):
    assert refusal(err) == expected


# ------------------------------------------------------------------------------------------------ config


@pytest.mark.parametrize("name", ["../x", "a/../../x", "..", "/tmp/elsewhere", "."])
def test_run_names_that_leave_out_dir_are_refused_before_anything_is_written(tmp_path, capsys, name):
    code, err = run_cli(capsys, "train", "--config", "digits", f"run.out_dir={tmp_path / 'runs'}",
                        f"run.name={name}", "--dry-run")
    assert code == EXIT_CONFIG
    one_line(err, re.escape(f"config error: run.name: {name!r} must name a folder inside run.out_dir") + ".*")
    assert not (tmp_path / "runs").exists() and sorted(os.listdir(tmp_path)) == []


def test_nested_run_names_inside_out_dir_are_fine(capsys):
    code, err = run_cli(capsys, "train", "--config", "digits", "run.name=sweep/lr_1e-3", "--dry-run")
    assert code == 0, err


# ------------------------------------------------------------------------------------------------ export folders


@pytest.fixture
def export(tmp_path):
    return export_random(tmp_path / "export")  # MaskDiT-T/2, 8x8x3, 5 classes


def write_config(folder, **model):
    path = folder / "config.json"
    config = json.loads(path.read_text())
    config["model"].update(model)
    path.write_text(json.dumps(config))


def drop_record(folder):
    from safetensors.torch import load_file, save_file

    save_file(load_file(str(folder / "model.safetensors")), str(folder / "model.safetensors"), {"format": "pt"})


def test_a_sound_export_loads(export):
    from maskdit_ds import load_pretrained

    assert load_pretrained(export).num_classes == 5


@pytest.mark.parametrize("damage, message", [
    (lambda f: (f / "model.safetensors").write_bytes((f / "model.safetensors").read_bytes()[:1000]),
     r"model.safetensors: not a readable safetensors file \(.*\)"),
    (lambda f: (f / "model.safetensors").write_bytes(b"\x00garbage" * 100),
     r"model.safetensors: not a readable safetensors file \(.*\)"),
    (lambda f: (f / "config.json").write_text("{not json"), r"config.json: not a readable JSON file \(.*\)"),
    (lambda f: write_config(f, name="MaskDiT-Q/2"),
     r"config.json: model.name 'MaskDiT-Q/2' is not a registered model; known: .*"),
    (lambda f: write_config(f, name="MaskDiT-S/2"),
     r"model.safetensors holds weights of .*'MaskDiT-T/2'.*, but config.json describes .*'MaskDiT-S/2'.*"),
    # an export written before the weights carried their record: the shapes still tell
    (lambda f: (drop_record(f), write_config(f, name="MaskDiT-S/2")),
     r"model.safetensors does not hold the MaskDiT-S/2 weights config.json describes: .*shape mismatches.*"),
    (lambda f: (drop_record(f), write_config(f, name="UViT-T/2")),
     r"model.safetensors does not hold the UViT-T/2 weights config.json describes: .*missing keys.*"),
    (lambda f: write_config(f, input_size=16),  # no weight's shape depends on it: the weights' record says 8
     r"model.safetensors holds weights of .*'input_size': 8.*, but config.json describes .*'input_size': 16.*"),
    (lambda f: write_config(f, input_size=7), r"config.json: model.input_size 7 is not a multiple of the patch .*"),
])
def test_a_damaged_export_is_refused_naming_the_file(export, capsys, tmp_path, damage, message):
    from maskdit_ds import load_pretrained

    damage(export)
    with pytest.raises(InputError, match=re.escape(str(export)) + "/" + message):
        load_pretrained(export)
    code, err = run_cli(capsys, "sample", export, "--out", tmp_path / "samples", "--num-images", 2,
                        "--no-progress")
    assert code == EXIT_CONFIG
    one_line(err, "error: " + re.escape(str(export)) + "/" + message)


def test_init_from_refuses_an_export_of_another_model(export):
    from maskdit_ds.config import load_config
    from maskdit_ds.model import build_denoiser
    from maskdit_ds.training.checkpoint.start import export_record, load_init_weights

    cfg = load_config("digits", ["model.name=MaskDiT-T/2", "model.input_size=16", "model.in_channels=3",
                                 "model.num_classes=5"])
    with pytest.raises(ConfigError, match=r"train.init_from: .*/export/config.json is an export of another model: "
                                          r"input_size 8 \(wanted 16\)"):
        export_record(export, cfg)
    (export / "model.safetensors").write_bytes(b"junk")
    net = build_denoiser(cfg.model)
    with pytest.raises(ConfigError, match=r"train.init_from: .*model.safetensors: not a readable safetensors"):
        load_init_weights(export, net, build_denoiser(cfg.model), reset_ema=False)


# ------------------------------------------------------------------------------------------------ hostile files


class RunsCode:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_pickle_in_an_eval_npz_is_refused_in_one_line(tmp_path, capsys):
    marker = tmp_path / "pwned"
    hostile = tmp_path / "samples.npz"
    np.savez(hostile, arr_0=np.array([RunsCode(marker)], dtype=object))
    weights = tmp_path / "w.pth"
    sha = write_weights(weights)  # random Inception weights: the samples are refused before they matter
    code, err = run_cli(capsys, "eval", hostile, hostile, "--weights", weights, "--weights-sha256", sha,
                        "--device", "cpu", "--no-progress")
    assert code == EXIT_CONFIG and not marker.exists()
    one_line(err, re.escape(f"error: {hostile}: array 'arr_0' is refused (Object arrays cannot be loaded when "
                            "allow_pickle=False)") + ".*")


def test_a_pickle_in_inception_weights_is_refused_in_one_line(tmp_path, capsys):
    marker = tmp_path / "pwned"
    weights = tmp_path / "pt_inception.pth"
    torch.save({"w": RunsCode(marker)}, weights)
    samples = tmp_path / "s.npz"
    np.savez(samples, arr_0=np.zeros((2, 8, 8, 3), np.uint8))
    code, err = run_cli(capsys, "eval", samples, samples, "--weights", weights, "--no-verify-weights",
                        "--device", "cpu", "--no-progress")
    assert code == EXIT_CONFIG and not marker.exists()
    one_line(err, re.escape(f"error: Inception weight file {weights} is refused by the safe loader (") + ".*")


# ------------------------------------------------------------------------------------------------ the other commands


@pytest.mark.parametrize("argv, message", [
    (["convert", "paper", "{tmp}/missing.pt", "--out", "{tmp}/o"], r"error: {tmp}/missing.pt: no such file"),
    (["import-latents", "--reference", "{tmp}/missing", "--out", "{tmp}/o"], r"error: .*{tmp}/missing.*"),
    (["report", "{tmp}/missing", "--out", "{tmp}/o"], r"error: .*{tmp}/missing.*"),
    (["sample", "{tmp}/missing", "--out", "{tmp}/o"], r"error: {tmp}/missing: no such export folder or run "
                                                      r"directory"),
    (["eval", "{tmp}/missing.npz", "{tmp}/missing.npz"], r"error: pass --weights PATH .*"),
])
def test_every_command_refuses_in_one_line_with_the_same_code(tmp_path, capsys, argv, message):
    code, err = run_cli(capsys, *[a.format(tmp=tmp_path) for a in argv])
    assert code == EXIT_CONFIG
    one_line(err, message.format(tmp=re.escape(str(tmp_path))))


def test_a_ds_config_that_sets_the_optimizer_is_refused_before_the_run_directory_is_touched(tmp_path):
    """The real command, in its own process (it starts a process group): an existing run keeps its config."""
    import subprocess
    import sys

    from launch import ROOT, env

    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"optimizer": {"type": "SGD"}, "zero_optimization": {"stage": 2}, "fp32": {}}))
    run = tmp_path / "runs" / "r"
    run.mkdir(parents=True)
    (run / "config.yaml").write_text("run: {name: r}\n# the earlier run's config\n")
    before = sorted(p.name for p in run.iterdir())
    done = subprocess.run([sys.executable, "-m", "maskdit_ds", "train", "--config", "digits",
                           f"run.out_dir={tmp_path / 'runs'}", "run.name=r", "engine.precision=fp32",
                           f"engine.ds_config={bad}"], cwd=ROOT, env=env(), capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == EXIT_CONFIG
    assert re.search(r"^config error: engine.ds_config: .*bad.json sets optimizer; .*$", done.stderr, re.M), \
        done.stderr[-2000:]
    assert (run / "config.yaml").read_text() == "run: {name: r}\n# the earlier run's config\n"
    assert sorted(p.name for p in run.iterdir()) == before


@pytest.mark.parametrize("command", ["train", "sample", "eval", "cache", "import-latents", "convert", "bench",
                                     "report"])
def test_every_command_builds_its_parser_the_one_way(command, capsys):
    """cli.parser: the command's name in the usage line and its module docstring kept as written."""
    from maskdit_ds.__main__ import COMMANDS, main

    with pytest.raises(SystemExit, match="^0$"):
        main([command, "--help"])
    out = capsys.readouterr().out
    doc = __import__(f"maskdit_ds.cli.{COMMANDS[command]}", fromlist=["_"]).__doc__
    assert out.startswith(f"usage: python -m maskdit_ds {command} ") and doc.splitlines()[0] in out
