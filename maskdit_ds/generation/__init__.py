"""Many-rank sampling of an exported model into an ADM .npz, resumably (docs/method.md §6)."""
from .run import (CLASS_MODES, GenerateConfig, balanced_labels, model_source, run_generate_config, run_generation,
                  sample_pixels, write_adm_npz)

__all__ = ["CLASS_MODES", "GenerateConfig", "balanced_labels", "model_source", "run_generate_config",
           "run_generation", "sample_pixels", "write_adm_npz"]
