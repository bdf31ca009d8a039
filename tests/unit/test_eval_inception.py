"""FID Inception port: TF1-legacy resize, sFID layout, outputs, weight-file layout and verification."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from eval_helpers import random_images, random_inception_state, write_weights

from maskdit_ds.evaluation import (PT_INCEPTION_SHA256, PT_INCEPTION_SIZE, FIDInceptionV3, InceptionExtractor,
                                   load_inception, resize_bilinear_tf1, spatial_features, tf32_disabled)

# ------------------------------------------------------------------------------------------------ resize


def test_tf1_resize_2_to_5_ramp_by_hand():
    x = torch.tensor([0.0, 10.0]).view(1, 1, 1, 2).expand(1, 1, 2, 2).contiguous()
    # src = d * 2/5 = 0, 0.4, 0.8, 1.2, 1.6; the upper neighbour clamps to index 1 (value 10)
    row = resize_bilinear_tf1(x, 5)[0, 0, 0]
    torch.testing.assert_close(row, torch.tensor([0.0, 4.0, 8.0, 10.0, 10.0]))
    # PyTorch's half-pixel convention samples src = (d + 0.5) * 0.4 - 0.5 instead: 0, 1, 5, 9, 10
    half = F.interpolate(x, size=(5, 5), mode="bilinear", align_corners=False)[0, 0, 0]
    torch.testing.assert_close(half, torch.tensor([0.0, 1.0, 5.0, 9.0, 10.0]))


def test_tf1_resize_4_to_3_two_dimensional_by_hand():
    h, w = torch.meshgrid(torch.arange(4.0), torch.arange(4.0), indexing="ij")
    x = (100 * h + 10 * w).view(1, 1, 4, 4)
    out = resize_bilinear_tf1(x, 3)[0, 0]
    # src = d * 4/3 = 0, 1.333, 2.667 along both axes; a linear image is reproduced at the source positions
    src = torch.tensor([0.0, 4 / 3, 8 / 3])
    torch.testing.assert_close(out, 100 * src[:, None] + 10 * src[None, :])
    assert not torch.allclose(out, F.interpolate(x, size=(3, 3), mode="bilinear", align_corners=False))


@pytest.mark.parametrize("n", [32, 64, 256, 512])
def test_tf1_resize_matches_closed_form(n):
    img = torch.tensor(np.random.default_rng(n).uniform(0, 255, (1, 1, n, n)), dtype=torch.float32)
    # numpy reference: src = d * n/299 in float32, i0 = floor, i1 = min(i0 + 1, n - 1), separable lerp
    src = np.arange(299, dtype=np.float32) * np.float32(n / 299)
    i0 = np.floor(src).astype(int)
    i1, f = np.minimum(i0 + 1, n - 1), src - np.floor(src)
    a = img[0, 0].numpy()
    rows = a[:, i0] + (a[:, i1] - a[:, i0]) * f
    ref = rows[i0] + (rows[i1] - rows[i0]) * f[:, None]
    np.testing.assert_allclose(resize_bilinear_tf1(img)[0, 0].numpy(), ref, rtol=0, atol=1e-3)


# ------------------------------------------------------------------------------------------------ layout


def test_spatial_features_flatten_order_is_h_w_c():
    t = torch.arange(2 * 192 * 17 * 17, dtype=torch.float32).view(2, 192, 17, 17)
    out = spatial_features(t)
    assert out.shape == (2, 2023)
    for n, h, w, c in [(0, 0, 0, 0), (0, 0, 0, 6), (0, 0, 1, 0), (1, 1, 0, 3), (1, 16, 16, 6), (0, 5, 11, 2)]:
        assert out[n, (h * 17 + w) * 7 + c] == t[n, c, h, w]
    hs, ws, cs = np.meshgrid(np.arange(17), np.arange(17), np.arange(7), indexing="ij")
    idx = (hs * 17 + ws) * 7 + cs
    torch.testing.assert_close(out[:, idx.ravel()], t[:, cs.ravel(), hs.ravel(), ws.ravel()])


@pytest.fixture(scope="module")
def net():
    m = FIDInceptionV3()
    m.load_state_dict(random_inception_state(seed=1), strict=False)
    with torch.no_grad():
        m.fc.bias.normal_(0, 5.0)  # a large bias, to prove the logits leave it out
    return m.eval()


def test_outputs_come_from_the_right_layers(net):
    seen = {}
    hooks = [net.Mixed_6d.branch1x1.register_forward_hook(lambda m, i, o: seen.__setitem__("mixed_6_conv", o)),
             net.Mixed_7c.register_forward_hook(lambda m, i, o: seen.__setitem__("mixed_10", o))]
    images = torch.as_tensor(random_images(2, size=24))
    with torch.no_grad():
        pool3, spatial, logits = net(images)
    for h in hooks:
        h.remove()
    assert seen["mixed_6_conv"].shape == (2, 192, 17, 17) and seen["mixed_10"].shape == (2, 2048, 8, 8)
    assert (seen["mixed_6_conv"] >= 0).all()  # post-ReLU
    torch.testing.assert_close(spatial, spatial_features(seen["mixed_6_conv"]))
    torch.testing.assert_close(pool3, seen["mixed_10"].mean((2, 3)))
    with torch.no_grad():
        torch.testing.assert_close(logits, pool3 @ net.fc.weight.T)  # no bias
        assert not torch.allclose(logits, net.fc(pool3))
    assert pool3.shape == (2, 2048) and logits.shape == (2, 1008) and pool3.abs().mean() > 1e-3


def test_preprocess_layout_range_and_dtype(net):
    nhwc = torch.as_tensor(random_images(1, size=20))
    x = net.preprocess(nhwc)
    assert x.shape == (1, 3, 299, 299)
    torch.testing.assert_close(x, net.preprocess(nhwc.permute(0, 3, 1, 2).contiguous()))  # NCHW accepted too
    assert net.preprocess(torch.zeros(1, 8, 8, 3, dtype=torch.uint8)).unique().tolist() == [-1.0]
    assert net.preprocess(torch.full((1, 8, 8, 3), 128, dtype=torch.uint8)).unique().tolist() == [0.0]
    with pytest.raises(TypeError, match="uint8"):
        net.preprocess(nhwc.float() / 255)


def test_extractor_is_batch_independent_and_restores_tf32(net):
    ex = InceptionExtractor(net, "cpu", batch_size=1)
    images = random_images(2, size=16, seed=3)
    one_by_one = ex.images(images)
    ex.batch_size = 2
    together = ex.images(images)  # BatchNorm in eval mode: batch composition must not matter
    np.testing.assert_allclose(one_by_one.pool3, together.pool3, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(one_by_one.spatial, together.spatial, rtol=1e-4, atol=1e-5)
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        with tf32_disabled():
            assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


# ------------------------------------------------------------------------------------------------ weights


def test_state_dict_layout_matches_pt_inception_file(tmp_path):
    sha = write_weights(tmp_path / "w.pth", seed=2)
    loaded, digest = load_inception(tmp_path / "w.pth", expected_sha256=sha)
    assert digest == sha
    state = torch.load(tmp_path / "w.pth", weights_only=True)
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    assert len(shapes) == 472  # pytorch-fid's key set, without num_batches_tracked
    assert shapes["Conv2d_1a_3x3.conv.weight"] == (32, 3, 3, 3)
    assert shapes["Conv2d_1a_3x3.bn.running_var"] == (32,)
    assert shapes["Mixed_5b.branch1x1.conv.weight"] == (64, 192, 1, 1)
    assert shapes["Mixed_6d.branch1x1.conv.weight"] == (192, 768, 1, 1)
    assert shapes["Mixed_7c.branch_pool.conv.weight"] == (192, 2048, 1, 1)
    assert shapes["fc.weight"] == (1008, 2048) and shapes["fc.bias"] == (1008,)
    assert not any(k.startswith("AuxLogits") for k in shapes)
    # the tensors fill the published 95,628,359-byte file up to ~87 KB of pickle overhead
    tensor_bytes = 4 * sum(int(np.prod(s)) for s in shapes.values())
    assert tensor_bytes == 95_541_568 and 0 < PT_INCEPTION_SIZE - tensor_bytes < 100_000
    for k, v in state.items():
        torch.testing.assert_close(loaded.state_dict()[k], v)
    assert all(m.eps == 1e-3 for m in loaded.modules() if isinstance(m, torch.nn.BatchNorm2d))
    assert not loaded.training


def test_num_batches_tracked_may_be_present(tmp_path):
    full = FIDInceptionV3().state_dict()
    assert any(k.endswith("num_batches_tracked") for k in full)
    torch.save(full, tmp_path / "w.pth")
    load_inception(tmp_path / "w.pth", expected_sha256=None)


def test_wrong_hash_is_rejected(tmp_path):
    write_weights(tmp_path / "w.pth")
    with pytest.raises(ValueError, match=r"w\.pth has sha256 .* expected 0{64}: wrong file"):
        load_inception(tmp_path / "w.pth", expected_sha256="0" * 64)


def test_truncated_official_file_is_rejected_by_size(tmp_path):
    path = tmp_path / "pt_inception-2015-12-05-6726825d.pth"
    path.write_bytes(b"\0" * 1000)
    with pytest.raises(ValueError, match=r"has 1,000 bytes, expected 95,628,359: the file is truncated"):
        load_inception(path)


def test_right_size_wrong_bytes_is_rejected_by_hash(tmp_path):
    path = tmp_path / "pt_inception-2015-12-05-6726825d.pth"
    with open(path, "wb") as f:
        f.truncate(PT_INCEPTION_SIZE)  # sparse file of zeros
    with pytest.raises(ValueError, match=f"expected {PT_INCEPTION_SHA256}: wrong file"):
        load_inception(path)


def test_missing_file_and_foreign_layout_are_rejected(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_inception(tmp_path / "nope.pth")
    state = random_inception_state()
    state["AuxLogits.fc.weight"] = torch.zeros(1000, 768)  # torchvision's layout
    del state["fc.bias"]
    torch.save(state, tmp_path / "tv.pth")
    with pytest.raises(ValueError, match=r"missing keys \['fc.bias'\].*unexpected keys \['AuxLogits.fc.weight'\]"):
        load_inception(tmp_path / "tv.pth", expected_sha256=None)
