"""Conversion of foreign checkpoints: the paper's released layout (written out independently), DiT as encoder, Hub folders."""
import argparse
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from maskdit_ds import load_pretrained
from maskdit_ds.config import ModelConfig
from maskdit_ds.convert import ConversionError, convert_dit, convert_paper, make_hub_folder
from maskdit_ds.model import MODELS, build_denoiser

TINY = dict(name="MaskDiT-T/2", input_size=8, in_channels=4, num_classes=10)  # depth 2, width 64, decoder 1x32


# ---------------------------------------------------------------- the released layout, written out independently


def sincos(dim: int, grid: int) -> torch.Tensor:
    """docs/method.md §1: first half of the channels encodes the column, second the row; [sin | cos] each."""
    omega = 10000.0 ** (-np.arange(dim // 4) / (dim / 4))
    col, row = np.meshgrid(np.arange(grid), np.arange(grid))  # col varies fastest: raster order
    half = lambda pos: np.concatenate([np.sin(np.outer(pos.ravel(), omega)), np.cos(np.outer(pos.ravel(), omega))], 1)
    return torch.from_numpy(np.concatenate([half(col), half(row)], 1)).float()[None]


def reference_shapes(depth, width, patch, channels, classes, grid, dec_depth=8, dec_width=512, mlp=4):
    """Key -> shape of the MaskDiT reference network (models/maskdit.py, use_decoder=True), without prefix."""
    table = {"x_embedder.proj.weight": (width, channels, patch, patch), "x_embedder.proj.bias": (width,),
             "t_embedder.mlp.0.weight": (width, 256), "t_embedder.mlp.0.bias": (width,),
             "t_embedder.mlp.2.weight": (width, width), "t_embedder.mlp.2.bias": (width,),
             "y_embedder.embedding_table.weight": (width, classes),
             "pos_embed": (1, grid * grid, width), "decoder_pos_embed": (1, grid * grid, dec_width),
             "mask_token": (1, 1, dec_width),
             "decoder_layer.linear.weight": (dec_width, width), "decoder_layer.linear.bias": (dec_width,),
             "decoder_layer.adaLN_modulation.1.weight": (2 * width, width),
             "decoder_layer.adaLN_modulation.1.bias": (2 * width,),
             "final_layer.linear.weight": (patch * patch * channels, dec_width),
             "final_layer.linear.bias": (patch * patch * channels,),
             "final_layer.adaLN_modulation.1.weight": (2 * dec_width, width),
             "final_layer.adaLN_modulation.1.bias": (2 * dec_width,)}
    for prefix, n, d in (("blocks", depth, width), ("decoder_blocks", dec_depth, dec_width)):
        for i in range(n):  # every block is conditioned on c of the encoder's width
            for name, shape in (("attn.qkv.weight", (3 * d, d)), ("attn.qkv.bias", (3 * d,)),
                                ("attn.proj.weight", (d, d)), ("attn.proj.bias", (d,)),
                                ("mlp.fc1.weight", (mlp * d, d)), ("mlp.fc1.bias", (mlp * d,)),
                                ("mlp.fc2.weight", (d, mlp * d)), ("mlp.fc2.bias", (d,)),
                                ("adaLN_modulation.1.weight", (6 * d, width)), ("adaLN_modulation.1.bias", (6 * d,))):
                table[f"{prefix}.{i}.{name}"] = shape
    return table


def tiny_shapes():
    return reference_shapes(2, 64, 2, 4, 10, 4, dec_depth=1, dec_width=32)


def random_released(shapes: dict, prefix: str, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    out = {prefix + k: 0.1 * torch.randn(s, generator=g) for k, s in shapes.items()}
    out[prefix + "pos_embed"] = sincos(shapes["pos_embed"][2], int(shapes["pos_embed"][1] ** 0.5))
    out[prefix + "decoder_pos_embed"] = sincos(shapes["decoder_pos_embed"][2], int(shapes["pos_embed"][1] ** 0.5))
    return out


def save_released(path: Path, ema: dict, model: dict) -> Path:
    args = argparse.Namespace(model="DiT-T/2", image_size=64, num_classes=10, use_decoder=True)
    torch.save({"model": model, "ema": ema, "opt": {"state": {}, "param_groups": [{"lr": 1e-4}]}, "args": args}, path)
    return path


def forward(net, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3, 4, 8, 8, generator=g)
    return net(x, torch.tensor([0.1, 1.0, 20.0]), torch.tensor([1, 7, 3]))


def test_xl2_reference_table_has_378_keys_and_matches_our_names():
    shapes = reference_shapes(28, 1152, 2, 4, 1000, 16)
    assert len(shapes) == 378
    with torch.device("meta"):
        ours = build_denoiser(ModelConfig(name="MaskDiT-XL/2")).state_dict()
    expected = {k: v for k, v in shapes.items() if k not in ("pos_embed", "decoder_pos_embed")}
    assert {k[len("model."):]: tuple(v.shape) for k, v in ours.items()} == expected


@pytest.mark.parametrize("prefix", ["model.", "_orig_mod.model."])
def test_reference_import_gives_the_directly_loaded_network(tmp_path, prefix, capsys):
    ema, model = random_released(tiny_shapes(), prefix, 1), random_released(tiny_shapes(), prefix, 2)
    path = save_released(tmp_path / "released.pt", ema, model)
    folder = convert_paper(path, tmp_path / "export")
    printed = capsys.readouterr().out
    assert f"lost the prefix '{prefix}'" in printed and "pos_embed [1, 16, 64] dropped" in printed
    config = json.loads((folder / "config.json").read_text())
    assert {k: config["model"][k] for k in TINY} == TINY

    # Independent loading: strip the prefix by hand, drop the fixed tables, strict load into our network.
    direct = build_denoiser(ModelConfig(**TINY))
    direct.load_state_dict({"model." + k[len(prefix):]: v for k, v in ema.items() if not k.endswith("pos_embed")})
    converted = load_pretrained(folder)
    with torch.no_grad():
        expected, got = forward(direct.eval()), forward(converted)
    assert torch.equal(got, expected) and expected.abs().mean() > 0
    key = prefix + "blocks.0.attn.qkv.weight"  # the 'ema' entry was taken, not 'model'
    got = converted.state_dict()["model.blocks.0.attn.qkv.weight"]
    assert torch.equal(got, ema[key]) and not torch.equal(got, model[key])


def reference_denoiser(released: dict, prefix: str, heads: int, decoder_heads: int, x, sigma, labels,
                       num_classes: int, sigma_data: float = 0.5) -> torch.Tensor:
    """The released network's eval forward (docs/method.md §1-§2, use_decoder=True, no masking), in float64, computed
    straight from the released tensors (their own pos_embed tables included); shares no code with maskdit_ds."""
    w = {k[len(prefix):]: v.double() for k, v in released.items()}

    def lin(h, name):
        return F.linear(h, w[name + ".weight"], w.get(name + ".bias"))

    def modulate(h, shift, scale):  # h (N, T, D), shift/scale (N, D)
        return F.layer_norm(h, h.shape[-1:], eps=1e-6) * (1 + scale[:, None]) + shift[:, None]

    def attention(h, name, nh):  # fused qkv laid out as (3, heads, head_dim), like timm's Attention
        n, t, d = h.shape
        q, k, v = lin(h, name + ".qkv").reshape(n, t, 3, nh, d // nh).permute(2, 0, 3, 1, 4)  # (N, nh, T, hd) each
        weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d // nh), dim=-1)
        return lin((weights @ v).transpose(1, 2).reshape(n, t, d), name + ".proj")

    def block(h, c, name, nh):  # adaLN-Zero: shift, scale, gate for attention, then for the MLP
        m = lin(F.silu(c), name + ".adaLN_modulation.1").chunk(6, dim=1)
        h = h + m[2][:, None] * attention(modulate(h, m[0], m[1]), name + ".attn", nh)
        hidden = F.gelu(lin(modulate(h, m[3], m[4]), name + ".mlp.fc1"), approximate="tanh")
        return h + m[5][:, None] * lin(hidden, name + ".mlp.fc2")

    def head(h, c, name):  # decoder_layer and final_layer: LN, adaLN shift/scale, linear
        shift, scale = lin(F.silu(c), name + ".adaLN_modulation.1").chunk(2, dim=1)
        return lin(modulate(h, shift, scale), name + ".linear")

    x, sigma = x.double(), sigma.double().reshape(-1, 1, 1, 1)
    c_skip = sigma_data**2 / (sigma**2 + sigma_data**2)
    c_out = sigma * sigma_data / (sigma**2 + sigma_data**2).sqrt()
    c_in = 1 / (sigma**2 + sigma_data**2).sqrt()
    c_noise = sigma.flatten().log() / 4
    freqs = torch.exp(-math.log(10000) * torch.arange(128, dtype=torch.float64) / 128)
    t_freq = torch.cat([torch.cos(c_noise[:, None] * freqs), torch.sin(c_noise[:, None] * freqs)], dim=1)
    t_emb = lin(F.silu(lin(t_freq, "t_embedder.mlp.0")), "t_embedder.mlp.2")
    c = t_emb + F.linear(F.one_hot(labels, num_classes).double(), w["y_embedder.embedding_table.weight"])

    patch = w["x_embedder.proj.weight"].shape[-1]
    h = F.conv2d(c_in * x, w["x_embedder.proj.weight"], w["x_embedder.proj.bias"], stride=patch)  # (N, D, g, g)
    grid = h.shape[-1]
    h = h.flatten(2).transpose(1, 2) + w["pos_embed"]  # (N, g*g, D), raster order
    for i in range(len({k.split(".")[1] for k in w if k.startswith("blocks.")})):
        h = block(h, c, f"blocks.{i}", heads)
    h = head(h, c, "decoder_layer") + w["decoder_pos_embed"]  # (N, g*g, 512)
    for i in range(len({k.split(".")[1] for k in w if k.startswith("decoder_blocks.")})):
        h = block(h, c, f"decoder_blocks.{i}", decoder_heads)
    out = head(h, c, "final_layer")  # (N, g*g, p*p*C), per token (p_row, p_col, channel)
    channels = out.shape[-1] // patch**2
    out = out.reshape(-1, grid, grid, patch, patch, channels).permute(0, 5, 1, 3, 2, 4)
    return c_skip * x + c_out * out.reshape(-1, channels, grid * patch, grid * patch)


def test_reference_import_matches_the_reference_network(tmp_path):
    """The issue's criterion: after conversion our network gives the reference network's outputs (fp32, eval)."""
    released = random_released(tiny_shapes(), "_orig_mod.model.", 11)
    net = load_pretrained(convert_paper(save_released(tmp_path / "r.pt", released, released), tmp_path / "x"))
    size = MODELS[TINY["name"]]
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 4, 8, 8, generator=g)
    sigma, labels = torch.tensor([0.002, 0.3, 2.0, 80.0]), torch.tensor([0, 3, 9, 5])  # EDM's sigma range
    expected = reference_denoiser(released, "_orig_mod.model.", size.num_heads, size.decoder_heads, x, sigma, labels,
                                  num_classes=10)
    with torch.no_grad():
        got = net(x, sigma, labels)
    assert got.dtype == torch.float32 and not net.training
    assert (expected - c_skip_part(x, sigma)).abs().mean() > 0.05  # the network's share is not negligible
    torch.testing.assert_close(got.double(), expected, atol=1e-5, rtol=0)


def c_skip_part(x, sigma, sigma_data=0.5):
    sigma = sigma.double().reshape(-1, 1, 1, 1)
    return sigma_data**2 / (sigma**2 + sigma_data**2) * x.double()


def to_released_layout(state: dict, model_cfg: ModelConfig, prefix: str = "model.") -> dict:
    """Our state dict -> the released layout (prefix + the fixed tables it stores): the inverse of the import."""
    size = MODELS[model_cfg.name]
    grid = model_cfg.input_size // size.patch_size
    out = {prefix + k[len("model."):]: v for k, v in state.items()}
    out[prefix + "pos_embed"] = sincos(size.hidden_size, grid)
    out[prefix + "decoder_pos_embed"] = sincos(size.decoder_hidden, grid)
    return out


def test_ours_to_released_to_ours_is_bitwise(tmp_path):
    torch.manual_seed(3)
    net = build_denoiser(ModelConfig(**TINY))
    with torch.no_grad():
        for p in net.parameters():
            p.normal_()  # no zero-initialised tensors: every key must carry its own values
    ours = net.state_dict()
    released = to_released_layout(ours, ModelConfig(**TINY))
    assert set(k[len("model."):] for k in released) == set(tiny_shapes())
    path = save_released(tmp_path / "rt.pt", released, released)
    back = load_file(str(convert_paper(path, tmp_path / "back") / "model.safetensors"))
    assert back.keys() == ours.keys()
    assert all(torch.equal(back[k], ours[k]) for k in ours)


@pytest.mark.parametrize("damage,message", [
    (lambda s: s.pop("model.blocks.1.mlp.fc2.bias"), "missing keys: model.blocks.1.mlp.fc2.bias"),
    (lambda s: s.__setitem__("model.extra.weight", torch.zeros(3)), "unexpected keys: model.extra.weight"),
    (lambda s: s.__setitem__("model.blocks.0.attn.proj.weight", torch.zeros(64, 32)),
     "model.blocks.0.attn.proj.weight: expected [64, 64], found [64, 32]"),
    (lambda s: s["model.pos_embed"].add_(1e-3), "pos_embed differs from our recomputed sin-cos table"),
])
def test_reference_import_names_the_bad_key(tmp_path, damage, message):
    state = random_released(tiny_shapes(), "model.", 1)
    damage(state)
    path = save_released(tmp_path / "bad.pt", state, state)
    with pytest.raises(ConversionError, match=message.replace("[", r"\[").replace("]", r"\]")):
        convert_paper(path, tmp_path / "out")
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- DiT as encoder


def dit_state(seed: int) -> dict:
    """DiT-layout weights for a depth-2, width-64, patch-2 trunk: 10 classes + null row, learned-sigma head."""
    shapes = {k: s for k, s in reference_shapes(2, 64, 2, 4, 10, 4, dec_depth=0).items()
              if not k.startswith(("decoder", "mask_token", "final_layer", "y_embedder"))}
    shapes.update({"y_embedder.embedding_table.weight": (11, 64), "final_layer.linear.weight": (2 * 2 * 8, 64),
                   "final_layer.linear.bias": (32,), "final_layer.adaLN_modulation.1.weight": (128, 64),
                   "final_layer.adaLN_modulation.1.bias": (128,)})
    state = random_released(dict(shapes, decoder_pos_embed=(1, 16, 32)), "", seed)
    del state["decoder_pos_embed"]
    return state


def test_dit_import_maps_the_encoder_and_keeps_a_fresh_decoder(tmp_path, capsys):
    dit = dit_state(5)
    torch.save(dit, tmp_path / "DiT-T-2.pt")  # DiT's released files are bare state dicts
    folder = convert_dit(tmp_path / "DiT-T-2.pt", tmp_path / "init", seed=7)
    assert "null row 10 dropped" in capsys.readouterr().out
    got = load_file(str(folder / "model.safetensors"))
    table = dit["y_embedder.embedding_table.weight"]  # (11, 64): 10 classes + DiT's null row
    assert torch.equal(got["model.y_embedder.embedding_table.weight"], table[:10].t())
    for key, value in dit.items():
        if not key.startswith(("y_embedder", "final_layer", "pos_embed")):
            assert torch.equal(got["model." + key], value), key
    torch.manual_seed(7)
    fresh = build_denoiser(ModelConfig(**TINY)).state_dict()
    for key in fresh:
        if key.startswith(("model.decoder", "model.mask_token", "model.final_layer")):
            assert torch.equal(got[key], fresh[key]), key
    config = json.loads((folder / "config.json").read_text())
    assert config["model"]["name"] == "MaskDiT-T/2" and config["step"] == 0
    load_pretrained(folder)  # what train.init_from reads as well


@pytest.mark.parametrize("damage,message", [
    (lambda s: s.pop("t_embedder.mlp.2.bias"), "missing keys: model.t_embedder.mlp.2.bias"),
    (lambda s: s.__setitem__("blocks.0.attn.q_norm.weight", torch.zeros(16)),
     "unexpected keys: model.blocks.0.attn.q_norm.weight"),
    (lambda s: s.__setitem__("blocks.1.mlp.fc1.weight", torch.zeros(256, 32)),
     "model.blocks.1.mlp.fc1.weight: expected [256, 64], found [256, 32]"),
])
def test_dit_import_names_the_bad_key(tmp_path, damage, message):
    state = dit_state(5)
    damage(state)
    torch.save(state, tmp_path / "dit.pt")
    with pytest.raises(ConversionError, match=message.replace("[", r"\[").replace("]", r"\]")):
        convert_dit(tmp_path / "dit.pt", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_reference_import_of_a_dit_file_points_to_the_dit_subcommand(tmp_path):
    torch.save(dit_state(5), tmp_path / "dit.pt")
    with pytest.raises(ConversionError, match="imported with the `dit` subcommand"):
        convert_paper(tmp_path / "dit.pt", tmp_path / "out")


# ---------------------------------------------------------------- Hub folder


def test_hub_folder_is_self_contained(tmp_path):
    state = random_released(tiny_shapes(), "model.", 4)
    export = convert_paper(save_released(tmp_path / "r.pt", state, state), tmp_path / "export")
    hub = make_hub_folder(export, tmp_path / "hub", title="tiny test")
    assert sorted(p.name for p in hub.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    assert not any(p.is_symlink() for p in hub.iterdir())
    assert "load_pretrained" in (hub / "README.md").read_text()
    source = load_file(str(export / "model.safetensors"))
    with torch.no_grad():
        expected = forward(load_pretrained(export))
    shutil.rmtree(export)  # nothing may point back at the source
    copied = load_file(str(hub / "model.safetensors"))
    assert copied.keys() == source.keys() and all(torch.equal(copied[k], source[k]) for k in source)
    assert json.loads((hub / "config.json").read_text())["model"]["name"] == TINY["name"]
    with torch.no_grad():
        assert torch.equal(forward(load_pretrained(hub)), expected)


def test_hub_push_refuses_a_folder_that_is_not_a_hub_folder(tmp_path):
    from maskdit_ds.convert import push_to_hub

    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ConversionError, match="has no model.safetensors"):
        push_to_hub(tmp_path, "someone/something")  # fails before huggingface_hub is touched


# ---------------------------------------------------------------- ZeRO tags of a real 2-rank fp16 run


