"""The U-ViT backbone (model/uvit.py): forward contract, masking, zero-init, precision, FLOPs, build_denoiser."""
import types

import pytest
import torch

from maskdit_ds.model import EDMPrecond, build_denoiser
from maskdit_ds.model.layers import sincos_2d_table
from maskdit_ds.model.flops import forward_flops
from maskdit_ds.model.masking import Masker, kept_tokens, make_mask
from maskdit_ds.model.registry import MODELS, ModelSize
from maskdit_ds.model.uvit import UViT, uvit_forward_flops
from model_helpers import patch_sensitivity

SIZES = {name: MODELS[name] for name in ("UViT-T/2", "UViT-Digits/2")}  # tiny sizes from the registry


def tiny(input_size=8, channels=3, classes=5, seed=0, depth=3) -> UViT:
    torch.manual_seed(seed)
    size = ModelSize(depth, 64, 4, 2, decoder_depth=1, decoder_hidden=32, decoder_heads=4, backbone="uvit")
    return UViT(size, input_size, channels, classes)


def inputs(n=4, channels=3, size=8, classes=5, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, channels, size, size, generator=g)
    c_noise = torch.randn(n, generator=g)
    y = torch.nn.functional.one_hot(torch.arange(n) % classes, classes).float()
    return x, c_noise, y


def randomise(model: torch.nn.Module, seed=2) -> None:
    """Give every parameter (zero-initialised output included) a random value so outputs are not trivially 0."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def test_attributes_and_block_layout():
    m = tiny(depth=5)
    assert (m.num_classes, m.num_tokens, m.input_size, m.in_channels) == (5, 16, 8, 3)
    assert (len(m.in_blocks), len(m.mid_blocks), len(m.out_blocks)) == (2, 1, 2)
    assert all(b.skip_linear is not None for b in m.out_blocks)
    assert all(b.skip_linear is None for b in [*m.in_blocks, *m.mid_blocks, *m.decoder_blocks])
    even = tiny(depth=4)
    assert (len(even.in_blocks), len(even.mid_blocks), len(even.out_blocks)) == (2, 0, 2)


def test_shapes_with_and_without_masking():
    m = tiny().train()
    x, c, y = inputs()
    assert m(x, c, y).shape == x.shape
    record = make_mask("random", 4, 4, 0.75)
    assert m(x, c, y, record).shape == x.shape and record.ids_keep.shape == (4, 4) and record.mask.shape == (4, 16)
    assert m(x, c, y, make_mask("block", 4, 4, 0.5, block=2)).shape == x.shape


def test_masked_tokens_never_reach_the_trunk():
    """Changing the pixels of removed patches leaves the output unchanged (they are dropped before the trunk)."""
    m = tiny().train()
    randomise(m)
    x, c, y = inputs()
    record = make_mask("block", 4, 4, 0.75, block=2, generator=torch.Generator().manual_seed(3))
    mask = record.mask  # (N, 16)
    pixel_mask = mask.reshape(4, 1, 4, 1, 4, 1).expand(-1, 3, -1, 2, -1, 2).reshape(4, 3, 8, 8)
    x2 = x + pixel_mask * torch.randn_like(x) * 5  # change only removed patches
    assert torch.allclose(m(x, c, y, record), m(x2, c, y, record), atol=1e-5)
    full1, full2 = m(x, c, y), m(x2, c, y)
    assert not torch.allclose(full1, full2, atol=1e-3)  # unmasked, the same change does matter


def test_zero_init_gives_c_skip_x():
    torch.manual_seed(0)
    net = EDMPrecond(UViT(SIZES["UViT-T/2"], 8, 3, 5), sigma_data=0.5).train()
    x, _, _ = inputs()
    sigma = torch.tensor([0.1, 0.5, 2.0, 30.0])
    c_skip = 0.25 / (sigma**2 + 0.25)
    for record in (None, make_mask("random", 4, 4, 0.75)):
        d = net(x, sigma, torch.tensor([0, 1, 2, 3]), record=record)
        assert torch.allclose(d, c_skip.view(-1, 1, 1, 1) * x, atol=1e-6)


def test_without_a_record_every_token_is_seen_and_a_record_changes_the_output():
    m = tiny()
    randomise(m)
    x, c, y = inputs()
    ref = m.eval()(x, c, y)
    assert torch.equal(ref, m.train()(x, c, y))  # no mode-dependent masking
    for mode in (m.train, m.eval):
        mode()
        assert torch.all(patch_sensitivity(m, x, c, y, 2) > 0)  # every one of the 16 patches reaches the output
    record = make_mask("random", 4, 4, 0.9)
    masked = m(x, c, y, record)
    assert not torch.allclose(masked, ref, atol=1e-4)
    assert torch.equal(patch_sensitivity(m, x, c, y, 2, record) > 0, record.mask == 0)  # only the kept ones


def test_unconditional_label_embeds_to_zero_and_labels_matter():
    m = tiny()
    randomise(m)
    m.eval()
    assert m.y_embedder.embedding_table.bias is None
    assert torch.equal(m.y_embedder(torch.zeros(2, 5)), torch.zeros(2, 64))
    x, c, y = inputs()
    a, b = m(x, c, y), m(x, c, y.roll(1, dims=1))
    assert not torch.allclose(a, b, atol=1e-4)


def test_long_skips_carry_signal():
    """Zeroing the shallow half of a skip concat changes the output: the skip path is wired in."""
    m = tiny(depth=4)
    randomise(m)
    m.eval()
    x, c, y = inputs()
    ref = m(x, c, y)
    with torch.no_grad():
        m.out_blocks[0].skip_linear.weight[:, 64:] = 0  # the part that reads the skip
    out = m(x, c, y)
    assert not torch.allclose(ref, out, atol=1e-4)


@pytest.mark.parametrize("ratio", [0.0, 0.75])
def test_gradient_reaches_every_parameter(ratio):
    torch.manual_seed(0)
    net = EDMPrecond(UViT(SIZES["UViT-T/2"], 8, 3, 5)).train()
    randomise(net.model)  # the zero-initialised output would block gradients to everything else at step 0
    x, _, _ = inputs()
    d = net(x, torch.full((4,), 1.0), torch.tensor([0, 1, 2, 3]), record=make_mask("random", 4, 4, ratio))
    ((d - x) ** 2).mean().backward()
    missing = [name for name, p in net.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    if ratio == 0.0:  # with no removed token the mask token is unused
        missing = [name for name in missing if name != "model.mask_token"]
    assert missing == []


def test_zero_init_still_passes_gradient_to_the_output_layer():
    net = EDMPrecond(UViT(SIZES["UViT-T/2"], 8, 3, 5)).train()
    x, _, _ = inputs()
    d = net(x, torch.full((4,), 1.0), torch.tensor([0, 1, 2, 3]), record=make_mask("random", 4, 4, 0.5))
    ((d - x) ** 2).mean().backward()
    assert net.model.final_layer.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_cast_keeps_position_tables_float32(dtype):
    m = tiny().to(dtype)
    for table in (m.pos_embed, m.decoder_pos_embed):
        assert table.table.dtype == torch.float32
        assert torch.equal(table.table, sincos_2d_table(table.dim, table.grid_size))
    assert m.final_layer.weight.dtype == dtype
    if dtype == torch.bfloat16:  # fp16 matmuls are not implemented on every CPU build; bf16 are
        x, c, y = inputs()
        out = m.train()(x.to(dtype), c, y, make_mask("random", 4, 4, 0.5))
        assert out.dtype == dtype and torch.isfinite(out).all()


def test_position_tables_are_not_in_the_state_dict():
    keys = set(tiny().state_dict())
    assert not any("pos_embed" in k for k in keys)
    assert {"x_embedder.proj.weight", "t_embedder.mlp.0.weight", "y_embedder.embedding_table.weight",
            "extras_embed", "mask_token", "decoder_embed.weight", "final_layer.weight",
            "out_blocks.0.skip_linear.weight"} <= keys


def test_bad_sizes_raise():
    with pytest.raises(ValueError, match="not divisible by patch size"):
        UViT(SIZES["UViT-T/2"], 9, 3, 5)
    with pytest.raises(ValueError, match="decoder_depth"):
        UViT(ModelSize(2, 64, 4, 2, decoder_depth=0, backbone="uvit"), 8, 3, 5)


def test_flops_shrink_with_the_mask_ratio():
    size = SIZES["UViT-Digits/2"]
    full, half, most = (forward_flops(size, 16, 1, kept_tokens("random", 8, r)) for r in (0.0, 0.5, 0.9))
    assert full > half > most > 0
    # the trunk is most of the cost, so 90% masking saves well over half of it here
    assert most < 0.6 * full


def test_build_denoiser_dispatches_to_uvit():
    cfg = types.SimpleNamespace(name="UViT-Digits/2", input_size=16, in_channels=1, num_classes=10, sigma_data=0.5)
    net = build_denoiser(cfg)
    assert isinstance(net.model, UViT) and net.num_classes == 10
    params = sum(p.numel() for p in net.parameters())
    maskdit = build_denoiser(types.SimpleNamespace(**{**vars(cfg), "name": "MaskDiT-Digits/2"}))
    ref = sum(p.numel() for p in maskdit.parameters())
    assert 0.5 * ref < params < 1.5 * ref  # a comparable-cost sibling of the digits MaskDiT
    x = torch.randn(2, 1, 16, 16)
    net.eval()
    assert net(x, torch.tensor([1.0, 2.0]), torch.tensor([3, 4])).shape == x.shape


def test_trainer_dry_run_describes_a_uvit_config():
    """The trainer's config check and --dry-run summary accept a U-ViT size (pos tables, FLOPs, ds_config)."""
    from maskdit_ds.config import load_config, validate
    from maskdit_ds.training import describe

    cfg = load_config("maskdm_digits_pretrain", ["model.name=UViT-Digits/2"])
    validate(cfg, world_size=2)
    text = describe(cfg, 2)
    assert "UViT-Digits/2" in text and "parameters:" in text


def test_learns_digits_under_block_masks():
    """A few AdamW steps of the masked EDM loss with 75% block masks lower the loss on a fixed held-out draw."""
    from maskdit_ds.data.digits import DigitsDataset
    from maskdit_ds.diffusion.loss import MaskedEDMLoss

    data = DigitsDataset(16)
    x, y = data.x[:256], data.y[:256]
    torch.manual_seed(0)
    net = EDMPrecond(UViT(SIZES["UViT-T/2"], 16, 1, 10)).train()
    loss_fn = MaskedEDMLoss(2, 10)
    opt = torch.optim.AdamW(net.parameters(), lr=2e-3)

    masker = Masker("block", 8, 0.75, 2)

    def held_out_loss() -> float:
        torch.manual_seed(99)  # the same sigmas, noise, label dropout and masks every time
        with torch.no_grad():
            return float(loss_fn(net, x[:128], y[:128], masker)[0].mean())

    before = held_out_loss()
    for step in range(30):
        idx = torch.randint(0, 256, (32,))
        loss, _ = loss_fn(net, x[idx], y[idx], masker)
        opt.zero_grad()
        loss.mean().backward()
        opt.step()
    assert held_out_loss() < 0.8 * before


@pytest.mark.parametrize("name", ["MaskDiT-T/2", "UViT-T/2"])
@pytest.mark.parametrize("strategy,ratio", [("none", 0.0), ("random", 0.5), ("random", 0.9), ("block", 0.75),
                                            ("block", 0.9), ("crop", 0.75)])
def test_both_backbones_train_with_and_without_masking(name, strategy, ratio):
    """Every backbone in the registry takes every mask strategy (a Masker, as the trainer passes it) through
    build_denoiser and the masked EDM loss: the kept count is the documented one and gradients are finite."""
    from maskdit_ds.diffusion.loss import MaskedEDMLoss

    cfg = types.SimpleNamespace(name=name, input_size=16, in_channels=1, num_classes=10, sigma_data=0.5)
    torch.manual_seed(0)
    net = build_denoiser(cfg).train()
    x, y = torch.randn(6, 1, 16, 16), torch.arange(6)
    drawn = []
    masker = Masker("random" if strategy == "none" else strategy, 8, ratio, 2)
    loss, parts = MaskedEDMLoss(2, 10)(net, x, y, lambda n, device: drawn.append(masker(n, device)) or drawn[-1])
    loss.mean().backward()
    assert loss.shape == (6,) and torch.isfinite(loss).all()
    assert (parts["mae"] > 0).all() if ratio > 0 else (parts["mae"] == 0).all()
    grads = [p.grad for p in net.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    record = drawn[0]
    if ratio == 0:
        assert record is None and masker.kept == 64
    else:
        assert record.num_keep == masker.kept and torch.equal((record.mask == 0).sum(1), torch.full((6,), masker.kept))


def test_train_flops_use_the_uvit_count_for_uvit_sizes():
    from maskdit_ds.model import train_flops

    size = MODELS["UViT-Digits/2"]
    assert train_flops(size, 16, 1, 16) == 3.0 * forward_flops(size, 16, 1, 16) == 3.0 * uvit_forward_flops(size, 16, 1, 16)
