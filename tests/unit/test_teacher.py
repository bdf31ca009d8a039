"""The alignment teacher loader (model/teacher.py) on tiny random transformers models built from configs."""
import pytest
import torch
import torch.nn.functional as F
from teacher_helpers import save_tiny_teacher

from maskdit_ds.errors import ConfigError
from maskdit_ds.model.teacher import load_teacher


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return save_tiny_teacher(tmp_path_factory.mktemp("t") / "teacher", mean=[0.5], std=[0.5])


def test_features_on_the_token_grid_frozen_and_deterministic(folder):
    teacher = load_teacher(str(folder), resolution=8, grid=4, device="cpu")
    images = torch.rand(3, 1, 8, 8) * 2 - 1
    features = teacher(images)
    assert features.shape == (3, 16, 32) and features.dtype == torch.float32
    assert torch.equal(features, teacher(images))
    assert all(not p.requires_grad for p in teacher.parameters())
    teacher.train()
    assert not teacher.training and not teacher.encoder.training  # frozen: stays in eval mode
    # the features are the encoder's layer-normed patch tokens, [CLS] dropped
    raw = teacher.encoder(pixel_values=images).last_hidden_state
    assert torch.allclose(features, raw[:, 1:], atol=1e-6)


def test_uint8_rgb_images_and_float_grey_images_of_the_same_picture_agree(folder):
    teacher = load_teacher(str(folder), resolution=8, grid=4, device="cpu")
    grey = torch.randint(0, 256, (2, 1, 8, 8), dtype=torch.uint8)
    rgb = grey.expand(-1, 3, -1, -1).contiguous()  # what the loader serves beside latents
    as_float = grey.float() / 127.5 - 1  # what a pixel-space run trains on
    assert torch.allclose(teacher(rgb), teacher(as_float), atol=1e-5)


def test_the_saved_normalisation_is_used(folder, tmp_path):
    teacher = load_teacher(str(folder), 8, 4, "cpu")
    assert torch.allclose(teacher.prepare(-torch.ones(1, 1, 8, 8)), -torch.ones(1, 1, 8, 8))  # (0 - .5) / .5
    bare = load_teacher(str(save_tiny_teacher(tmp_path / "bare")), 8, 4, "cpu")  # no preprocessor config
    assert torch.allclose(bare.prepare(torch.ones(1, 1, 8, 8)), torch.full((1, 1, 8, 8), (1 - 0.485) / 0.229))


def test_images_are_resized_to_the_teacher_resolution_and_patches_pooled_to_the_grid(folder):
    teacher = load_teacher(str(folder), resolution=16, grid=4, device="cpu")  # 8x8 patches -> 4x4 tokens
    images = torch.rand(2, 1, 32, 32) * 2 - 1
    x = teacher.prepare(images)
    assert x.shape == (2, 1, 16, 16)
    raw = teacher.encoder(pixel_values=x).last_hidden_state[:, 1:]  # (2, 64, 32)
    pooled = F.avg_pool2d(raw.transpose(1, 2).reshape(2, 32, 8, 8), 2).flatten(2).transpose(1, 2)
    assert torch.allclose(teacher(images), pooled, atol=1e-5)


def test_register_tokens_are_skipped(tmp_path):
    teacher = load_teacher(str(save_tiny_teacher(tmp_path / "reg", registers=4)), 8, 4, "cpu")
    images = torch.rand(2, 1, 8, 8)
    raw = teacher.encoder(pixel_values=teacher.prepare(images)).last_hidden_state  # [CLS], 4 registers, 16
    assert raw.shape[1] == 21 and torch.allclose(teacher(images), raw[:, 5:], atol=1e-6)


def test_unusable_teachers_are_refused_with_the_key(folder, tmp_path):
    with pytest.raises(ConfigError, match="align_teacher_resolution: 9 must be a multiple of the teacher's patch"):
        load_teacher(str(folder), 9, 4, "cpu")
    with pytest.raises(ConfigError, match="loss.align_teacher: cannot load"):
        load_teacher(str(tmp_path / "missing"), 8, 4, "cpu")
