"""Every extension point is one registration (docs/extending.md): each test registers a new backbone, mask
strategy, data source, optimizer or sampler in one call, selects it by config and uses it."""
import pytest
import torch
import torch.nn as nn

from maskdit_ds.config import load_config, validate
from maskdit_ds.data import DATA_SOURCES, DataSource, build_dataset, to_model_input
from maskdit_ds.diffusion import MaskedEDMLoss
from maskdit_ds.diffusion.sampler import edm_sample
from maskdit_ds.diffusion.solvers import SOLVERS
from maskdit_ds.errors import ConfigError
from maskdit_ds.model import (BACKBONES, MODELS, STRATEGIES, Backbone, Masker, ModelSize, Strategy, build_denoiser,
                              forward_flops, kept_tokens, num_kept, position_tables, register_backbone, train_flops,
                              trunk_blocks)
from maskdit_ds.model.layers import FixedSinCos, LabelEmbedder, PatchEmbed, TimestepEmbedder, unpatchify
from maskdit_ds.model.masking import gather_tokens, record_from_order
from maskdit_ds.optimizers import OPTIMIZERS

TINY = ["train.stages=[]", "train.micro_batch=4", "train.global_batch=4", "engine.precision=fp32"]


@pytest.fixture(autouse=True)
def restore_registries():
    """Each test leaves every registry as it found it."""
    tables = (BACKBONES, MODELS, STRATEGIES, DATA_SOURCES, OPTIMIZERS, SOLVERS)
    before = [set(table) for table in tables]
    yield
    for table, names in zip(tables, before):
        for name in set(table) - names:
            table.unregister(name)


class MixerBlock(nn.Module):
    """A residual MLP over the channels of each token, conditioned by addition."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm, self.mlp = nn.LayerNorm(dim), nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x, c):  # x (N, T, D), c (N, D)
        return x + self.mlp(self.norm(x + c.unsqueeze(1)))


class Mixer(nn.Module):
    """A new backbone with MaskDiT's contract: drops the removed tokens, re-inserts a mask token before its head."""

    def __init__(self, size: ModelSize, input_size: int, in_channels: int, num_classes: int):
        super().__init__()
        p, d = size.patch_size, size.hidden_size
        self.size, self.in_channels, self.num_classes, self.grid = size, in_channels, num_classes, input_size // p
        self.x_embedder, self.table = PatchEmbed(p, in_channels, d), FixedSinCos(d, self.grid)
        self.t_embedder, self.y_embedder = TimestepEmbedder(d), LabelEmbedder(num_classes, d)
        self.blocks = nn.ModuleList([MixerBlock(d) for _ in range(size.depth)])
        self.mask_token = nn.Parameter(torch.zeros(1, 1, d))
        self.head = nn.Linear(d, p * p * in_channels)

    def forward(self, x, c_noise, y_onehot, record=None, tap=None):
        tokens = self.table(self.x_embedder(x))  # (N, L, D)
        c = self.t_embedder(c_noise) + self.y_embedder(y_onehot)  # (N, D)
        if record is not None:
            tokens = gather_tokens(tokens, record.ids_keep)  # (N, L_keep, D)
        for block in self.blocks:
            tokens = block(tokens, c)
        if record is not None:
            fill = self.mask_token.expand(tokens.shape[0], self.grid**2 - record.num_keep, -1)
            tokens = gather_tokens(torch.cat([tokens, fill], dim=1), record.ids_restore)  # (N, L, D)
        return unpatchify(self.head(tokens), self.grid, self.size.patch_size, self.in_channels)


def mixer_flops(size: ModelSize, input_size: int, in_channels: int, kept: int | None) -> float:
    tokens = (input_size // size.patch_size) ** 2 if kept is None else kept
    return float(size.depth * 8 * tokens * size.hidden_size**2)  # two Linear(d, 2d) per block, 2 FLOPs per MAC


def test_register_backbone():
    register_backbone("mixer", Backbone(network=Mixer, forward_flops=mixer_flops, compile_units=(MixerBlock,),
                                        position_tables=("table",), sizes={"Mixer-T/2": ModelSize(2, 32, 4, 2)}))
    cfg = load_config("digits", [*TINY, "model.name=Mixer-T/2"])
    validate(cfg)  # the config knows the new name
    assert MODELS["Mixer-T/2"].backbone == "mixer"
    net = build_denoiser(cfg.model)
    assert isinstance(net.model, Mixer)
    assert len(trunk_blocks(net)) == 2 and all(isinstance(b, MixerBlock) for b in trunk_blocks(net))  # compiled
    assert [t.shape for t in position_tables(net)] == [(1, 16, 32)]  # counted beside the parameters
    size, kept = MODELS["Mixer-T/2"], kept_tokens("random", 4, 0.5)
    assert train_flops(size, 8, 1, kept) == 3 * forward_flops(size, 8, 1, kept) == 3 * mixer_flops(size, 8, 1, 8)
    # one masked training step
    loss_fn = MaskedEDMLoss(size.patch_size, cfg.model.num_classes)
    x, y = torch.randn(4, 1, 8, 8), torch.arange(4)
    loss, _ = loss_fn(net, x, y, Masker("random", 4, 0.5))
    loss.mean().backward()
    assert net.model.mask_token.grad is not None and torch.isfinite(loss).all()


def raster_mask(n, grid, ratio, block=0, device=None, generator=None):
    """The first floor(L (1 - r)) tokens in raster order stay visible, the same for every sample."""
    order = torch.arange(grid * grid, device=device).expand(n, -1)
    return record_from_order(order, num_kept(grid * grid, ratio))


def test_register_strategy():
    STRATEGIES.register("raster", Strategy(raster_mask, lambda grid, ratio: num_kept(grid * grid, ratio)))
    cfg = load_config("digits", [*TINY, "mask.strategy=raster", "mask.ratio=0.75"])
    validate(cfg)
    masker = Masker(cfg.mask.strategy, 4, cfg.mask.ratio)
    record = masker(2)
    assert masker.kept == 4 and record.ids_keep.tolist() == [[0, 1, 2, 3]] * 2
    net = build_denoiser(cfg.model)
    loss, parts = MaskedEDMLoss(2, cfg.model.num_classes)(net, torch.randn(2, 1, 8, 8), torch.arange(2), masker)
    assert loss.shape == (2,) and torch.all(parts["mae"] > 0)  # the 12 removed tokens carry the MAE term
    from maskdit_ds.cli.bench import parse  # bench offers it too

    assert parse(["--strategy", "raster"]).strategy == "raster"


class Stripes(torch.utils.data.Dataset):
    """Horizontal stripes whose count is the label."""

    def __init__(self, resolution: int):
        self.resolution = resolution

    def __len__(self):
        return 12

    def __getitem__(self, i):
        rows = (torch.arange(self.resolution) * (i % 3 + 1) // self.resolution) % 2
        return {"x": rows.float().view(1, -1, 1).expand(1, -1, self.resolution) * 2 - 1, "y": i % 3}


def build_stripes(data_cfg, model_cfg):
    ds = Stripes(data_cfg.resolution)
    return ds, torch.tensor([i % 3 for i in range(len(ds))])


def test_register_data_source():
    DATA_SOURCES.register("stripes", DataSource(build_stripes, latent=False, needs_path=False, local_path=False))
    cfg = load_config("digits", [*TINY, "data.source=stripes", "data.classes=[1, 2]"])
    validate(cfg)
    assert not cfg.data.kind.latent
    ds = build_dataset(cfg.data, cfg.model)
    assert len(ds) == 8 and {ds[i]["y"] for i in range(len(ds))} == {1, 2}  # data.classes applies to it too
    x = torch.stack([ds[i]["x"] for i in range(4)])
    assert torch.equal(to_model_input(x, cfg.data), x)  # pixels pass through
    DATA_SOURCES.register("stripes_dir", DataSource(build_stripes, latent=False, needs_path=True, local_path=True))
    with pytest.raises(ConfigError, match="data.path: required for data.source=stripes_dir"):
        validate(load_config("digits", [*TINY, "data.source=stripes_dir"]))


def test_register_optimizer(monkeypatch):
    from maskdit_ds import dist
    from maskdit_ds.training.engine import Engine, build_ds_config, init_distributed

    OPTIMIZERS.register("torch_amsgrad", {"torch_adam": True, "amsgrad": True})
    cfg = load_config("digits", [*TINY, "engine.optimizer=torch_amsgrad", "engine.compile=false"])
    validate(cfg)
    assert build_ds_config(cfg, 1)["optimizer"]["params"]["amsgrad"] is True
    for key, value in dict(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                           MASTER_PORT=str(dist.free_port())).items():
        monkeypatch.setenv(key, value)  # a world of one, put back afterwards
    init_distributed()
    try:
        engine = Engine(build_denoiser(cfg.model), cfg, world_size=1)
        inner = getattr(engine.ds.optimizer, "optimizer", engine.ds.optimizer)  # ZeRO wraps torch's optimizer
        assert isinstance(inner, torch.optim.AdamW) and inner.defaults["amsgrad"] is True
        loss, _ = MaskedEDMLoss(2, cfg.model.num_classes)(engine, torch.randn(4, 1, 8, 8), torch.arange(4))
        engine.backward(loss.mean())
        engine.step()
        assert any("max_exp_avg_sq" in state for state in inner.state.values())  # AMSGrad's own state
        engine.release()
    finally:
        dist.destroy_process_group()


def midpoint_step(denoise, x, t_cur, t_next):
    """Explicit midpoint (second-order Runge-Kutta); Euler into sigma 0."""
    d = (x - denoise(x, t_cur)) / t_cur
    if t_next == 0:
        return x + (t_next - t_cur) * d
    t_mid = 0.5 * (t_cur + t_next)
    x_mid = x + (t_mid - t_cur) * d
    return x + (t_next - t_cur) * (x_mid - denoise(x_mid, t_mid)) / t_mid


class CountingNet(torch.nn.Module):
    num_classes = 10

    def __init__(self):
        super().__init__()
        self.sigmas = []

    def guided(self, x, sigma, labels, guidance):
        self.sigmas.append(float(sigma[0]))
        return x * 0.5


def test_register_sampler():
    SOLVERS.register("midpoint", midpoint_step)
    cfg = load_config("digits", [*TINY, "sample.solver=midpoint", "sample.steps=4"])
    validate(cfg)
    net = CountingNet()
    out = edm_sample(net, torch.randn(2, 1, 4, 4), torch.tensor([1, 2]), cfg.sample.sampler())
    assert len(net.sigmas) == 7 and torch.isfinite(out).all()  # 2 calls per step, 1 into sigma 0
    t0, t1 = net.sigmas[0], net.sigmas[2]
    assert net.sigmas[1] == pytest.approx(0.5 * (t0 + t1))  # its second call sits halfway between the steps
    from maskdit_ds.cli.sample import parse  # the sample command offers it too

    assert parse(["run", "--out", "o", "--solver", "midpoint"]).solver == "midpoint"
