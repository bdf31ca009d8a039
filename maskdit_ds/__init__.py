"""maskdit_ds: MaskDiT (Zheng et al., TMLR 2024) pre-training on DeepSpeed ZeRO-2. See docs/method.md.

Layers, each importing only from the ones above it:
  errors, io, hardware, dist     the ground floor: exit codes, atomic writes, what the machine can do, ranks
  registry, optimizers           the Registry every extension point is (docs/extending.md); AdamW kernels
  config                         the typed run config, presets, validation
  data                           datasets, transforms, the VAE, latent caches, the resumable loader
  model                          the networks (pure torch), masking, FLOPs, export folders, alignment
  diffusion                      the masked EDM loss, the EDM sampler, schedules
  evaluation                     the ADM protocol (FID, sFID, IS, precision, recall), quality-vs-cost reports
  generation                     many-rank sampling into ADM .npz files
  training                       the loop on DeepSpeed (engine.py is the only deepspeed import), checkpoints
  convert                        foreign checkpoints and Hub folders
  cli                            `python -m maskdit_ds <command>`
"""
from .model import MODELS, build_denoiser
from .model.export import load_pretrained

__all__ = ["load_pretrained", "build_denoiser", "MODELS"]
