"""Every write goes through one guard (io.atomic_path / io.storage_guard): a full disk or an I/O error becomes
StorageError naming the path and the free space, whichever library was writing, and no partial file is left."""
import re
import subprocess

import numpy as np
import pytest
import torch

from maskdit_ds import io
from maskdit_ds.config import ModelConfig
from maskdit_ds.errors import EXIT_STORAGE, StorageError
from maskdit_ds.model.export import export_state

from launch import export_random

FULL = r"could not write .*: (no space left on device|.*\(the filesystem is full\)) \(0\.0 GiB free of 0\.0 GiB.*\)"
WRITERS = {
    "torch.save": lambda d: io.atomic_torch_save({"w": torch.zeros(100_000)}, d / "state.pt"),
    "safetensors": lambda d: io.atomic_save_safetensors({"w": torch.zeros(100_000)}, d / "w.safetensors"),
    "npz": lambda d: io.atomic_save_npz(d / "x.npz", arr_0=np.zeros(100_000, np.float32)),
    "text": lambda d: io.atomic_write_text(d / "x.json", "x" * 400_000),
    "export": lambda d: export_state(d / "export", {"w": torch.zeros(100_000)}, ModelConfig(), {"step": 1}),
}


@pytest.fixture
def small_disk(tmp_path):
    """A 1 MiB tmpfs (root only; elsewhere test_library_storage_errors_become_the_storage_error covers the
    same failures by injection)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(disk)], capture_output=True,
                             text=True)
    if mounted.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    yield disk
    subprocess.run(["umount", str(disk)], check=True)


def fill(disk, free_bytes: int) -> None:
    """Leave about `free_bytes` free on the disk."""
    (disk / "filler").unlink(missing_ok=True)
    with open(disk / "filler", "wb") as f:
        try:
            f.write(b"\0" * max(0, 1024 * 1024 - free_bytes))
        except OSError:
            pass  # the disk is as full as it gets


@pytest.mark.parametrize("writer", sorted(WRITERS))
def test_every_writer_at_every_fill_level_succeeds_or_raises_the_storage_error(small_disk, writer):
    outcomes = set()
    for free in (900_000, 500_000, 420_000, 400_000, 300_000, 100_000, 4096, 0):
        fill(small_disk, free)
        try:
            WRITERS[writer](small_disk)
            outcomes.add("written")
        except StorageError as err:
            assert re.fullmatch(FULL, str(err)), err
            outcomes.add("refused")
        left = [p.name for p in small_disk.iterdir() if io.is_temp_name(p.name)]
        assert not left, f"a partial write was left at {free} bytes free: {left}"
        for path in small_disk.iterdir():
            io.remove(path)
    assert outcomes == {"written", "refused"}  # the levels span both sides of each write's size


def test_sample_onto_a_full_disk_exits_with_the_storage_error(small_disk, tmp_path, capsys):
    from maskdit_ds.__main__ import main

    export = export_random(tmp_path / "export")
    fill(small_disk, 2048)
    code = main(["sample", str(export), "--out", str(small_disk / "samples"), "--num-images", "4",
                 "--no-progress", "--grid", "0"])
    err = capsys.readouterr().err
    assert code == EXIT_STORAGE
    assert err.count("\n") == 1 and re.fullmatch(r"storage error: " + FULL + r"\n", err), err


@pytest.mark.parametrize("library_error", [
    RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598"),  # torch.save, zip
    RuntimeError("write(): fd 3 failed with No space left on device"),  # torch.save, legacy format
    RuntimeError("Error while serializing: I/O error: No space left on device (os error 28)"),  # safetensors
    OSError(5, "Input/output error"),
])
def test_library_storage_errors_become_the_storage_error(tmp_path, monkeypatch, library_error):
    def failing_save(obj, path, *args, **kwargs):
        open(path, "wb").write(b"partial")
        raise library_error

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(StorageError, match=re.escape(f"could not write file {tmp_path / 'state.pt'}: ")):
        io.atomic_torch_save({"w": torch.zeros(3)}, tmp_path / "state.pt")
    assert list(tmp_path.iterdir()) == []  # the partial temporary is gone


def test_other_errors_inside_a_write_keep_their_type(tmp_path):
    with pytest.raises(TypeError, match="unsupported"):
        with io.atomic_path(tmp_path / "x") as tmp:
            tmp.write_text("partial")
            raise TypeError("unsupported")
    assert list(tmp_path.iterdir()) == []
