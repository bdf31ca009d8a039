"""The diffusion process around the network: the masked EDM loss, the EDM sampler, schedules (docs/method.md §2-§6)."""
from .loss import MaskedEDMLoss
from .sampler import edm_sample, sample_seeds, sigma_schedule
from .schedules import ema_update, mask_ratio_at

__all__ = ["MaskedEDMLoss", "edm_sample", "ema_update", "mask_ratio_at", "sample_seeds", "sigma_schedule"]
