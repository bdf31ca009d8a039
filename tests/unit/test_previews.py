"""Training previews: sample grids of latent models decode with the configured VAE, in the sampler's precision."""
import torch


def test_grids_of_latent_models_decode_with_the_configured_vae(tmp_path):
    from data_helpers import save_tiny_vae

    from maskdit_ds.config import load_config
    from maskdit_ds.training.previews import decode_latents, run_vae

    spec = save_tiny_vae(tmp_path / "vae", blocks=4)  # x8 downsampling, like the SD VAE
    cfg = load_config("digits", [f"data.vae={spec}", "model.in_channels=4"])
    images = decode_latents(torch.randn(3, 4, 2, 2), cfg)
    assert images.shape == (3, 3, 16, 16) and images.abs().max() <= 1
    assert run_vae(spec, "auto") is run_vae(spec, "auto")  # loaded once per run
    assert next(run_vae(spec, "auto").parameters()).dtype == torch.float32  # auto on a CPU: fp32


def test_the_vae_follows_the_sampler_precision_and_bf16_pixels_stay_close_to_fp32(tmp_path, monkeypatch):
    """GPUs decode in the sampler's half precision (sampling_precision); on a CPU bf16 is there on request. A
    bf16 decode of the same latents lands within a few grey levels of the fp32 decode: bf16 keeps 8 bits of
    mantissa (relative error 2^-9 per op, a few of them compounding through the decoder), and a grey level is
    2/255 of the [-1, 1] range."""
    from data_helpers import save_tiny_vae

    from maskdit_ds import hardware
    from maskdit_ds.data.transforms import to_uint8
    from maskdit_ds.data.vae import decode, load_decoder

    spec = save_tiny_vae(tmp_path / "vae", blocks=4)
    latents = torch.randn(4, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    fp32, bf16 = (load_decoder(spec, "cpu", p)[0] for p in ("fp32", "bf16"))
    assert next(bf16.parameters()).dtype == torch.bfloat16
    exact, half = (torch.from_numpy(to_uint8(decode(v, latents, 0.18215, batch=4)[0])).int() for v in (fp32, bf16))
    assert (exact - half).abs().float().mean() <= 2 and (exact - half).abs().max() <= 12
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))
    assert hardware.sampling_precision("auto") == "bf16" and hardware.sampling_precision("fp32") == "fp32"
