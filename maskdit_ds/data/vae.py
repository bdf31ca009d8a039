"""The frozen Stable Diffusion KL-f8 VAE (docs/method.md §5): load from a folder, a hub id or one original-layout
file; encode images to posterior moments, decode latents to images."""

import functools
import hashlib
import json
import tempfile
from pathlib import Path

import torch

from ..hardware import DTYPES
from ..io import sha256_file

WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin",
                "diffusion_pytorch_model.fp16.safetensors", "diffusion_pytorch_model.fp16.bin")
SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")

# diffusers config of the original SD KL-f8 autoencoder (U-ViT's autoencoder_kl.pth, sd-vae-ft-*). It lets
# from_single_file convert an original-layout file offline instead of fetching a config from the hub.
SD_KL_F8_CONFIG = {
    "_class_name": "AutoencoderKL", "in_channels": 3, "out_channels": 3, "latent_channels": 4,
    "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [128, 256, 512, 512], "layers_per_block": 2, "act_fn": "silu",
    "norm_num_groups": 32, "sample_size": 256, "scaling_factor": 0.18215,
}


def sha256_state_dict(module: torch.nn.Module) -> str:
    """Content hash of the weights (names, shapes, fp32 bytes) when no weight file can be located."""
    h = hashlib.sha256()
    for k, v in sorted(module.state_dict().items()):
        h.update(f"{k}:{tuple(v.shape)}".encode())
        h.update(v.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _folder_weights(folder: Path) -> Path | None:
    return next((Path(folder) / name for name in WEIGHT_FILES if (Path(folder) / name).is_file()), None)


def _hub_weights(repo_id: str, subfolder: str):
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    for name in WEIGHT_FILES:
        found = try_to_load_from_cache(repo_id, f"{subfolder}/{name}" if subfolder else name)
        if isinstance(found, str):
            return found
    return None


def load_vae(spec: str, dtype: str = "fp32", device="cpu", subfolder: str = None, config: str = None):
    """Load a diffusers AutoencoderKL and describe it.

    spec: a diffusers folder (config.json + weights, or a pipeline folder with vae/), a single
    original-layout SD VAE file (.safetensors/.ckpt/.pt/.pth; converted by from_single_file with
    `config` or the built-in SD KL-f8 config), or a hub id (needs the hub or its cache).
    Returns (vae in eval mode on device, info dict with id, sha256, hash_of, dtype, latent_channels,
    downsample, scaling_factor).
    """
    from diffusers import AutoencoderKL

    if dtype not in DTYPES:
        raise ValueError(f"VAE dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    torch_dtype = DTYPES[dtype]
    weights = None
    if Path(spec).is_file():
        if not spec.endswith(SINGLE_FILE_SUFFIXES):
            raise ValueError(f"VAE file {spec} should end in one of {SINGLE_FILE_SUFFIXES}")
        vae = _from_single_file(AutoencoderKL, spec, config, torch_dtype)
        weights, vae_id = spec, str(Path(spec).absolute())
    elif Path(spec).is_dir():
        if subfolder is None and not (Path(spec) / "config.json").is_file() \
                and (Path(spec) / "vae" / "config.json").is_file():
            subfolder = "vae"  # a whole SD pipeline folder
        folder = Path(spec) / subfolder if subfolder else Path(spec)
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(f"VAE folder {folder} has no config.json (expected a diffusers AutoencoderKL folder)")
        vae = AutoencoderKL.from_pretrained(str(folder), torch_dtype=torch_dtype)
        weights, vae_id = _folder_weights(folder), str(folder.absolute())
    else:
        vae = AutoencoderKL.from_pretrained(spec, subfolder=subfolder, torch_dtype=torch_dtype)
        weights, vae_id = _hub_weights(spec, subfolder), spec + (f"/{subfolder}" if subfolder else "")
    vae = vae.to(device).eval().requires_grad_(False)
    if torch.device(device).type == "cuda":  # a convolutional network at a few fixed shapes: let cuDNN time its
        torch.backends.cudnn.benchmark = True  # algorithms once per shape and keep the fastest
    cfg = vae.config
    info = {
        "id": vae_id,
        "sha256": sha256_file(weights) if weights else sha256_state_dict(vae),
        "hash_of": "file" if weights else "state_dict",
        "dtype": dtype,
        "latent_channels": int(cfg.latent_channels),
        "downsample": 2 ** (len(cfg.block_out_channels) - 1),
        "scaling_factor": float(cfg.scaling_factor),
    }
    return vae, info


def _from_single_file(cls, path, config, torch_dtype):
    if config is not None:
        return cls.from_single_file(path, config=config, torch_dtype=torch_dtype, local_files_only=True)
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "config.json").write_text(json.dumps(SD_KL_F8_CONFIG))
        return cls.from_single_file(path, config=tmp, torch_dtype=torch_dtype, local_files_only=True)


@torch.inference_mode()
def encode_moments(vae, x: torch.Tensor) -> torch.Tensor:
    """x float (B, 3, H, W) in [-1, 1] -> posterior moments float32 (B, 2C, H/f, W/f): the mean, then
    the log-variance, which diffusers already clamps to [-30, 20] (the clamp sample_latent applies)."""
    dist = vae.encode(x.to(device=vae.device, dtype=vae.dtype)).latent_dist
    return torch.cat([dist.mean.float(), dist.logvar.float()], dim=1)


@functools.lru_cache(maxsize=1)
def load_decoder(spec: str, device, precision: str = "fp32"):
    """diffusers AutoencoderKL in eval mode plus its description (sha256 etc.), or (None, None) for pixel models.
    precision: the weights' dtype, the sampler's (sampling_precision: bf16/fp16 on GPUs, fp32 on CPUs or on
    request). Cached: sample grids, in-training FID and final samples of one run share one VAE (loaded and hashed
    once)."""
    if not spec:
        return None, None
    return load_vae(spec, dtype=precision, device=device)


def decode(vae, latents: torch.Tensor, latent_scale: float, batch: int) -> tuple[torch.Tensor, int]:
    """latents (N, 4, h, w) -> images (N, 3, 8h, 8w) in [-1, 1] on CPU. Halves the batch on CUDA out-of-memory;
    returns the batch size that worked, for the next call."""
    out, start = [], 0
    while start < len(latents):
        z = latents[start:start + batch].to(vae.device, vae.dtype) / latent_scale
        try:
            with torch.no_grad():
                out.append(vae.decode(z).sample.float().clamp(-1, 1).cpu())
        except torch.cuda.OutOfMemoryError:
            if batch == 1:
                raise
            batch = max(1, batch // 2)
            torch.cuda.empty_cache()
            continue
        start += len(z)
    return torch.cat(out), batch
