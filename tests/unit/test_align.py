"""Representation alignment (docs/method.md §11): the loss term, visible tokens only, where its gradients go, the
trunk taps, the projector kept out of exports, and the switch-off."""
import pytest
import torch
from teacher_helpers import save_tiny_teacher

from maskdit_ds.config import LossConfig, load_config
from maskdit_ds.diffusion.loss import MaskedEDMLoss
from maskdit_ds.model import Masker, build_denoiser, token_grid
from maskdit_ds.model.align import AlignedDenoiser, Tap, alignment_loss, denoiser_of, denoiser_state
from maskdit_ds.model.masking import record_from_mask
from maskdit_ds.model.teacher import load_teacher
from maskdit_ds.training.loop import aligning, build_module


def digits_cfg(*more):
    return load_config("digits", ["loss.align_weight=0.5", "loss.align_depth=2", "loss.align_proj_dim=16", *more])


def test_hand_computed_cosine_on_a_small_case():
    # 1 sample, 2 tokens, 2-d features: cos(proj, target) = 1 for the first token, 0 for the second
    projected = torch.tensor([[[1.0, 0.0], [0.0, 2.0]]])
    target = torch.tensor([[[3.0, 0.0], [5.0, 0.0]]])
    assert torch.allclose(alignment_loss(projected, target, None), torch.tensor([(0.0 + 1.0) / 2]))
    # opposite directions give 2 (the largest value of 1 - cos)
    assert torch.allclose(alignment_loss(-target, target, None), torch.tensor([2.0]))


def test_only_visible_tokens_are_aligned_against_their_own_positions():
    torch.manual_seed(0)
    target = torch.randn(2, 16, 8)  # teacher features in raster order
    mask = torch.zeros(2, 16)
    mask[0, [0, 3, 5, 6, 9, 10, 12, 15]] = 1
    mask[1, :8] = 1
    record = record_from_mask(mask)  # 8 visible tokens per sample, ids_keep in raster order
    projected = torch.gather(target, 1, record.ids_keep.unsqueeze(-1).expand(-1, -1, 8)).clone()
    assert torch.allclose(alignment_loss(projected, target, record.ids_keep), torch.zeros(2), atol=1e-6)
    # changing the target where tokens were removed changes nothing; where they were visible, it does
    removed = target.clone()
    removed[mask.bool()] = torch.randn(int(mask.sum()), 8)
    assert torch.allclose(alignment_loss(projected, removed, record.ids_keep), torch.zeros(2), atol=1e-6)
    visible = target.clone()
    visible[~mask.bool()] *= -1
    assert torch.allclose(alignment_loss(projected, visible, record.ids_keep), torch.full((2,), 2.0), atol=1e-6)


def test_the_loss_adds_lambda_times_the_term_masked_and_unmasked():
    cfg = digits_cfg()
    torch.manual_seed(0)
    net = AlignedDenoiser(build_denoiser(cfg.model), depth=2, width=16, teacher_dim=8)
    images, labels = torch.randn(4, 1, 8, 8), torch.arange(4)
    target = torch.randn(4, token_grid(cfg.model) ** 2, 8)
    for ratio in (0.0, 0.5):
        masker = Masker("random", token_grid(cfg.model), ratio) if ratio else None
        plain = MaskedEDMLoss(2, 10, aligned=True, align_weight=0.0)
        weighted = MaskedEDMLoss(2, 10, aligned=True, align_weight=0.5)
        torch.manual_seed(1)
        base, parts0 = plain(net, images, labels, masker, target)
        torch.manual_seed(1)
        loss, parts = weighted(net, images, labels, masker, target)
        assert torch.allclose(loss, base + 0.5 * parts["align"], atol=1e-6)
        assert torch.allclose(parts["align"], parts0["align"]) and torch.all(parts["align"] > 0)
        # the logged term is the cosine loss of what the net projected, against the visible targets
        torch.manual_seed(1)
        recorded = {}
        original = net.forward

        def spy(*args, **kwargs):
            out = original(*args, **kwargs)
            recorded["projected"], recorded["record"] = out[1], kwargs.get("record")
            return out
        net.forward = spy
        weighted(net, images, labels, masker, target)
        del net.forward
        ids = None if recorded["record"] is None else recorded["record"].ids_keep
        assert recorded["projected"].shape[1] == (16 if ratio == 0 else 8)
        assert torch.allclose(parts["align"], alignment_loss(recorded["projected"], target, ids), atol=1e-6)


def test_without_a_target_the_term_is_zero_but_every_parameter_gets_a_gradient():
    """Steps that do not align (a stage with weight 0, past align_until_step) still give the projector a (zero)
    gradient: ZeRO-2 reduces every parameter's gradient."""
    cfg = digits_cfg()
    net = AlignedDenoiser(build_denoiser(cfg.model), depth=2, width=16, teacher_dim=8)
    loss, parts = MaskedEDMLoss(2, 10, aligned=True, align_weight=0.5)(
        net, torch.randn(2, 1, 8, 8), torch.arange(2), Masker("random", 4, 0.5), None)
    assert "align" not in parts
    loss.mean().backward()
    for p in net.projector.parameters():
        assert p.grad is not None and torch.count_nonzero(p.grad) == 0


def test_alignment_gradients_reach_only_the_encoder_up_to_the_tap_and_the_projector(tmp_path):
    cfg = digits_cfg()
    torch.manual_seed(0)
    net = AlignedDenoiser(build_denoiser(cfg.model), depth=2, width=16, teacher_dim=32)
    teacher = load_teacher(str(save_tiny_teacher(tmp_path / "t")), 8, 4, "cpu")
    images = torch.rand(2, 1, 8, 8) * 2 - 1
    target = teacher(images)  # (2, 16, 32)
    record = Masker("random", 4, 0.5)(2, "cpu")
    _, projected = net(images, torch.full((2,), 1.0), torch.arange(2), record=record)
    alignment_loss(projected, target, record.ids_keep).sum().backward()
    trunk = net.denoiser.model

    def touched(module):
        return any(p.grad is not None and torch.count_nonzero(p.grad) > 0 for p in module.parameters())

    assert touched(net.projector) and touched(trunk.x_embedder)
    assert touched(trunk.blocks[0]) and touched(trunk.blocks[1])  # blocks up to the tap (depth 2)
    assert not any(touched(m) for m in (*trunk.blocks[2:], trunk.decoder_layer, *trunk.decoder_blocks,
                                        trunk.final_layer))
    assert all(not p.requires_grad and p.grad is None for p in teacher.parameters())


@pytest.mark.parametrize("name", ["MaskDiT-Digits/2", "UViT-Digits/2"])
def test_the_tap_holds_the_visible_patch_tokens_after_block_k(name):
    cfg = load_config("digits", [f"model.name={name}"])
    torch.manual_seed(0)
    net = build_denoiser(cfg.model).eval()
    x, sigma, y = torch.randn(2, 1, 8, 8), torch.full((2,), 0.7), torch.arange(2)
    record = Masker("random", 4, 0.5)(2, "cpu")
    tap = Tap(depth=3)
    with torch.no_grad():
        out = net(x, sigma, y, record=record, tap=tap)
        same = net(x, sigma, y, record=record)
    assert torch.equal(out, same)  # tapping changes nothing
    assert tap.tokens.shape == (2, 8, 128)  # (N, L_keep, D): the visible patch tokens only


def test_exports_and_the_ema_hold_the_denoiser_alone():
    cfg = digits_cfg()
    net = AlignedDenoiser(build_denoiser(cfg.model), depth=2, width=16, teacher_dim=8)
    state = net.state_dict()
    assert any(k.startswith("projector.") for k in state)
    plain = denoiser_state(state)
    assert set(plain) == set(build_denoiser(cfg.model).state_dict())
    assert denoiser_of(net) is net.denoiser and denoiser_of(net.denoiser) is net.denoiser
    assert denoiser_state(plain) is plain  # a denoiser's state passes unchanged


class FakeTeacher:
    dim = 8


def test_the_trained_module_has_a_projector_only_when_the_run_aligns():
    cfg = digits_cfg()
    assert isinstance(build_module(cfg, FakeTeacher()), AlignedDenoiser)
    assert not isinstance(build_module(cfg, None), AlignedDenoiser)
    proj = build_module(cfg, FakeTeacher()).projector
    assert [m.__class__.__name__ for m in proj] == ["Linear", "SiLU", "Linear", "SiLU", "Linear"]
    assert (proj[0].in_features, proj[0].out_features, proj[4].out_features) == (128, 16, 8)


def test_switch_off_by_step_and_by_weight():
    on = LossConfig(align_weight=0.5, align_until_step=100)
    assert aligning(on, 0) and aligning(on, 99) and not aligning(on, 100) and not aligning(on, 5000)
    assert aligning(LossConfig(align_weight=0.5), 10**9)  # until_step 0: every step
    assert not aligning(LossConfig(align_weight=0.0), 0)


def test_pool_matches_the_average_of_the_patches_each_token_covers():
    from maskdit_ds.model.teacher import pool_to_grid

    patches = torch.randn(2, 64, 5)  # an 8x8 patch grid
    pooled = pool_to_grid(patches, 8, 4)  # -> the 4x4 token grid
    grid = patches.reshape(2, 8, 8, 5)
    token_1_2 = grid[:, 2:4, 4:6].mean(dim=(1, 2))  # token (row 1, col 2) covers patch rows 2-3, cols 4-5
    assert pooled.shape == (2, 16, 5) and torch.allclose(pooled[:, 1 * 4 + 2], token_1_2, atol=1e-6)
    assert torch.equal(pool_to_grid(patches, 8, 8), patches)
    resized = pool_to_grid(patches, 8, 3)  # not a divisor: bilinear
    assert resized.shape == (2, 9, 5) and torch.isfinite(resized).all()
    assert torch.allclose(pooled.mean(1), patches.mean(1), atol=1e-6)  # area pooling keeps the mean
