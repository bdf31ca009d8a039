"""Find, verify (size, sha256) and load the FID Inception weights, pt_inception-2015-12-05-6726825d.pth."""
from __future__ import annotations

import os
import pickle
import tempfile
import urllib.request
from pathlib import Path

import torch

from ..errors import InputError, one_line
from ..io import atomic_torch_save, sha256_file
from .inception import FIDInceptionV3

# pytorch-fid's conversion of the 2015 TF graph; torch-fidelity's copy has the same bytes.
PT_INCEPTION_URL = (
    "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth"
)
PT_INCEPTION_FILENAME = "pt_inception-2015-12-05-6726825d.pth"
PT_INCEPTION_SIZE = 95_628_359
PT_INCEPTION_SHA256 = "6726825d0af5f729cebd5821db510b11b1cfad8faad88a03f1befd49fb9129b2"


def verify_weight_file(path, expected_sha256: str | None = PT_INCEPTION_SHA256) -> str:
    """Check the weight file and return its sha256.

    With the default hash the size is checked first, so a truncated download is reported as such.
    `expected_sha256=None` skips verification; it exists for custom weights (tests, other conversions) only.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Inception weight file {path} does not exist (expected {PT_INCEPTION_FILENAME}, "
                                f"download it from {PT_INCEPTION_URL})")
    if expected_sha256 == PT_INCEPTION_SHA256:
        size = path.stat().st_size
        if size != PT_INCEPTION_SIZE:
            raise ValueError(f"Inception weight file {path} has {size:,} bytes, expected {PT_INCEPTION_SIZE:,}: "
                             f"the file is truncated or is not {PT_INCEPTION_FILENAME}")
    digest = sha256_file(path)
    if expected_sha256 is not None and digest != expected_sha256.lower():
        raise ValueError(f"Inception weight file {path} has sha256 {digest}, expected {expected_sha256}: wrong file "
                         "(for custom weights pass their own hash, or skip verification explicitly)")
    return digest


def download_weights(dest_dir=None) -> Path:
    """Download the pytorch-fid weights into dest_dir (default ~/.cache/maskdit_ds) and verify them.

    For machines with internet access; an existing verified file is reused.
    """
    dest_dir = Path(dest_dir or Path.home() / ".cache" / "maskdit_ds")
    dest = dest_dir / PT_INCEPTION_FILENAME
    if dest.is_file():
        verify_weight_file(dest)
        return dest
    dest_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest_dir, suffix=".part")
    os.close(fd)
    try:
        urllib.request.urlretrieve(PT_INCEPTION_URL, tmp)
        verify_weight_file(tmp)
        os.replace(tmp, dest)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return dest


def load_inception(path, expected_sha256: str | None = PT_INCEPTION_SHA256) -> tuple[FIDInceptionV3, str]:
    """Verify `path`, build the port and load the state dict. Returns (network in eval mode on CPU, file sha256)."""
    digest = verify_weight_file(path, expected_sha256)
    try:  # weights_only: a pickle that needs anything but tensors and containers is refused, never run
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError) as err:
        raise InputError(f"Inception weight file {path} is refused by the safe loader ({one_line(err)})") from None
    if not isinstance(state, dict):
        raise ValueError(f"Inception weight file {path} holds a {type(state).__name__}, expected a state dict")
    net = FIDInceptionV3()
    # BatchNorm's num_batches_tracked is unused in eval mode and absent from pytorch-fid's file.
    wanted = {k for k in net.state_dict() if not k.endswith("num_batches_tracked")}
    given = {k for k in state if not k.endswith("num_batches_tracked")}
    if wanted != given:
        missing, extra = sorted(wanted - given), sorted(given - wanted)
        raise ValueError(f"Inception weight file {path} does not match the FID Inception layout: "
                         f"missing keys {missing[:5]}{'...' if len(missing) > 5 else ''} ({len(missing)}), "
                         f"unexpected keys {extra[:5]}{'...' if len(extra) > 5 else ''} ({len(extra)})")
    net.load_state_dict(state, strict=False)  # shapes are still checked
    return net.eval(), digest


def random_inception_state(seed: int = 0) -> dict:
    """A state dict with the pt_inception keys and shapes and seeded random values, scaled so that activations
    stay O(0.1..1) (He-normal convs, random BN statistics; PyTorch's default init would shrink pool3 to ~1e-8).
    For checks that exercise the evaluation plumbing without the real file (tests, tools/gpu_check.py): its
    FIDs mean nothing."""
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


def write_random_weights(path, seed: int = 0) -> str:
    """Save random_inception_state(seed) to `path`; returns its sha256 (the expected hash to pass with it)."""
    atomic_torch_save(random_inception_state(seed), path)
    return sha256_file(path)
