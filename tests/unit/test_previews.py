"""Training previews: sample grids of latent models decode with the configured VAE."""
import torch


def test_grids_of_latent_models_decode_with_the_configured_vae(tmp_path):
    from data_helpers import save_tiny_vae

    from maskdit_ds.config import load_config
    from maskdit_ds.training.previews import decode_latents, grid_vae

    spec = save_tiny_vae(tmp_path / "vae", blocks=4)  # x8 downsampling, like the SD VAE
    cfg = load_config("digits", [f"data.vae={spec}", "model.in_channels=4"])
    images = decode_latents(torch.randn(3, 4, 2, 2), cfg)
    assert images.shape == (3, 3, 16, 16) and images.abs().max() <= 1
    assert grid_vae(spec) is grid_vae(spec)  # loaded once per run
