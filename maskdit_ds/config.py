"""One typed run config: dataclass sections, YAML presets, dotted overrides, validation, saved with every run."""
from __future__ import annotations

import copy
import dataclasses
import json
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path, PurePath

import yaml

from .errors import ConfigError
from .io import atomic_write_text
from .optimizers import OPTIMIZERS

PRESET_DIR = Path(__file__).parent / "configs"
DS_CONFIG_DIR = Path(__file__).parent / "ds_configs"  # engine mechanics per precision, shipped with the package
PRECISIONS = ("auto", "fp16", "bf16", "fp32")  # = hardware.PRECISIONS (kept here so that parsing needs no torch)
ENGINE_PRECISIONS = ("auto", "amp_fp16", "amp_bf16", "fp16", "bf16", "fp32")  # = auto + hardware.TRAINING_MODES
MAY_BE_INFINITE = ("sample.S_max",)  # "no upper bound"


@dataclass
class RunConfig:
    name: str = "run"  # run directory is <out_dir>/<name>
    out_dir: str = "runs"  # parent folder of run directories
    seed: int = 0  # base seed; rank r draws from seed + r (masks, noise, label dropout)


@dataclass
class ModelConfig:
    name: str = "MaskDiT-XL/2"  # a key of maskdit_ds.model.registry.MODELS
    input_size: int = 32  # spatial size the network sees (latent: image resolution / 8)
    in_channels: int = 4  # 4 for SD latents, 1 or 3 for pixels
    num_classes: int = 1000  # class-conditional via a bias-free Linear on one-hot labels
    sigma_data: float = 0.5  # EDM preconditioning constant


@dataclass
class DataConfig:
    source: str = "latents"  # latents (a cache from `python -m maskdit_ds cache`) | digits (built-in example) | images | hf
    path: str = ""  # cache directory, image folder or saved Hugging Face dataset (unused for digits)
    resolution: int = 256  # image resolution in pixels; a latent cache must match it
    classes: list = field(default_factory=list)  # keep only these labels (empty: all)
    fraction: float = 1.0  # keep this fraction of the examples, chosen once with the run seed
    num_workers: int = 2  # DataLoader workers per rank
    latent_scale: float = 0.18215  # SD VAE scaling applied to each fresh posterior sample
    vae: str = ""  # VAE folder or hub id, only for decoding sample grids of latent models
    image_source: str = ""  # with a latent cache and loss.align_weight > 0: the source images (default: the cache's)

    @property
    def kind(self):
        """The registered data.source (maskdit_ds.data.DataSource): whether it is latent, whether it needs a path."""
        from .data import DATA_SOURCES

        return DATA_SOURCES[self.source]


@dataclass
class LossConfig:
    P_mean: float = -1.2  # ln(sigma) ~ N(P_mean, P_std^2)
    P_std: float = 1.2  # see P_mean
    mae_weight: float = 0.1  # lambda of the MAE term on masked tokens
    label_dropout: float = 0.1  # probability of zeroing a one-hot label (for classifier-free guidance)
    align_weight: float = 0.0  # lambda of the representation-alignment term (0: off; REPA uses 0.5, docs/method.md §11)
    align_depth: int = 8  # align the encoder's tokens after this block (1-based; REPA: 8 of SiT-XL/2's 28)
    align_until_step: int = 0  # align only the run's first N optimizer steps (0: every step; HASTE-style early stop)
    align_proj_dim: int = 2048  # width of the projector, a 3-layer SiLU MLP from encoder tokens to teacher features
    align_teacher: str = "facebook/dinov2-base"  # frozen teacher: a local folder or hub id loadable by transformers
    align_teacher_resolution: int = 224  # images are resized to this for the teacher (DINOv2-B/14: a 16x16 patch grid)


@dataclass
class MaskConfig:
    ratio: float = 0.5  # fraction of tokens removed before the encoder, in [0, 1)
    schedule: str = "constant"  # constant | cosine (ratio * cos(pi/2 t)^power over the stage)
    power: int = 4  # exponent of the cosine decay
    strategy: str = "random"  # random patches | block (b x b token blocks, MaskDM) | crop (one visible window)
    block_size: int = 4  # tokens per block side for strategy=block


@dataclass
class OptimConfig:
    lr: float = 1e-4  # constant, no warm-up (docs/method.md §4)
    betas: list = field(default_factory=lambda: [0.9, 0.999])  # AdamW betas
    eps: float = 1e-8  # AdamW epsilon
    weight_decay: float = 0.0  # none in the paper


@dataclass
class EngineConfig:
    precision: str = "auto"  # auto (amp_bf16 on GPUs, amp_fp16 before Ampere; bf16 on CPUs that have it, else fp32) | amp_fp16 | amp_bf16 (fp32 weights, autocast matmuls) | fp16 | bf16 (pure half engine) | fp32
    ds_config: str = ""  # engine-mechanics JSON; empty: ds_configs/zero2_<precision>.json
    tf32: bool = True  # allow TF32 matmuls on GPU in fp32 runs
    optimizer: str = "auto"  # AdamW kernel: auto (torch_fused) / torch_fused / torch (unfused) / deepspeed_fused (JIT build)
    compile: str = "auto"  # torch.compile each transformer block: auto (on for GPUs, off for CPUs) / true / false
    activation_checkpointing: bool = False  # recompute each transformer block in the backward (less memory, ~1 more trunk forward); --dry-run's memory plan says when a stage needs it


@dataclass
class StageEntry:
    """One item of train.stages as the YAML writes it; expand_stages() turns the list into Stages."""

    name: str = "stage"
    steps: int = 0  # optimizer steps in this stage
    overrides: dict = field(default_factory=dict)  # dotted keys applied on top of the run config


@dataclass
class TrainConfig:
    global_batch: int = 1024  # images per optimizer step over all ranks = micro_batch x grad_accum x world
    micro_batch: int = 128  # images per rank per forward
    steps: int = 2_000_000  # optimizer steps of this run (ignored when stages are given)
    ema_decay: float = 0.9999  # per optimizer step, kept in fp32
    init_from: str = ""  # checkpoint dir or export folder to start from (weights + EMA + step; fresh optimizer)
    reset_ema: bool = False  # with init_from: start the EMA from the loaded weights instead of the loaded EMA
    log_every: int = 100  # steps between stats.jsonl / TensorBoard / progress-bar updates
    ckpt_every: int = 5000  # steps between resumable checkpoints (plus one at each stage end and on a signal)
    keep_last: int = 3  # resumable checkpoints kept on disk
    grid_every: int = 10000  # EMA sample grid to TensorBoard every N steps (0: off)
    max_skipped_streak: int = 100  # consecutive fp16 overflow-skipped steps that stop the run
    resume: str = "auto"  # auto: from the newest usable checkpoint (stops if checkpoints exist but none is usable) / never: start over, moving the old checkpoints, exports and stats to archive/<time>/
    allow_config_change: list = field(default_factory=list)  # keys (or sections) that may differ from the checkpoint's config on resume although they normally must not
    stages: list = field(default_factory=list)  # optional list of {name, steps, overrides} run back to back


@dataclass
class SamplerConfig:
    """The EDM sampler (docs/method.md §6), the one set of sampling settings: the run config's `sample` section
    (grids, in-training FID, final samples) and `python -m maskdit_ds sample` both fill it."""

    steps: int = 40  # solver steps (Heun: 2 * steps - 1 network calls, Euler: steps)
    guidance: float = 1.5  # classifier-free guidance scale (1: none)
    sigma_min: float = 0.002  # EDM noise range and time-step spacing
    sigma_max: float = 80.0  # see sigma_min
    rho: float = 7.0  # see sigma_min
    precision: str = "auto"  # network autocast: auto (bf16/fp16 on GPUs, fp32 on CPUs) / fp32 / bf16 / fp16; EDM scalings fp32, solver float64
    guidance_interval: list = field(default_factory=lambda: [0.0, math.inf])  # apply guidance only for sigma in [lo, hi] (Kynkaanniemi et al. 2024)
    solver: str = "heun"  # step rule: heun (second order) / euler (first order) / any name in diffusion.solvers.SOLVERS
    S_churn: float = 0.0  # EDM stochasticity (0: the deterministic ODE sampler)
    S_min: float = 0.0  # churn only for sigma in [S_min, S_max]
    S_max: float = math.inf  # see S_min
    S_noise: float = 1.0  # scale of the churn noise


@dataclass
class SampleConfig(SamplerConfig):
    final_samples: int = 0  # after training, sample this many images with the EMA into samples.npz (0: off)
    grid_size: int = 16  # images in the TensorBoard sample grid

    def sampler(self) -> SamplerConfig:
        """The sampler settings alone."""
        return SamplerConfig(**{f.name: getattr(self, f.name) for f in dataclasses.fields(SamplerConfig)})


@dataclass
class EvalConfig:
    fid_every: int = 0  # every N steps sample fid_samples images with the EMA and log FID to TensorBoard (0: off)
    fid_samples: int = 2000  # images per in-training FID (spread over ranks, one seed each)
    fid_ref: str = ""  # reference .npz (ADM layout, or made by `python -m maskdit_ds eval ref`)
    inception_weights: str = ""  # pt_inception-2015-12-05-6726825d.pth
    inception_sha256: str = ""  # expected hash of inception_weights; empty: the official file's hash
    agreement_every: int = 0  # digits: every N steps the digit classifier judges agreement_samples EMA samples (0: off)
    agreement_samples: int = 200  # images per in-training class-agreement check (spread over ranks, one seed each)


@dataclass
class MetricsConfig:
    peak_tflops: float = 0.0  # per-device peak for MFU; 0: the GPU's data-sheet dense peak, or on CPU the model's GEMM shapes timed in its dtype (MFU above 1 is shown as absent)


@dataclass
class DistConfig:
    timeout_s: float = 0.0  # seconds a rank waits for the others (to join at start, in every collective) before it exits naming the missing ranks and hosts, for gloo and NCCL alike; 0: DeepSpeed's default (DEEPSPEED_TIMEOUT minutes, 10 unless set)


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    mask: MaskConfig = field(default_factory=MaskConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    dist: DistConfig = field(default_factory=DistConfig)

    @property
    def run_dir(self) -> Path:
        return Path(self.run.out_dir) / self.run.name

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class Stage:
    """One stage of the run as everything after validation sees it (made only by expand_stages)."""

    index: int  # position in the run (TrainState.stage)
    name: str
    steps: int  # optimizer steps in this stage
    cfg: Config  # the run config with the stage's overrides applied (its train.stages is empty)


# ---------------------------------------------------------------- building from dicts


def _coerce(key: str, value, annotation):
    """Check one leaf value against its declared type; ints are accepted where floats are declared."""
    kind = {"int": int, "float": float, "str": str, "bool": bool, "list": list, "dict": dict}[annotation]
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if kind is float and isinstance(value, str):
        try:
            return float(value)  # YAML 1.1 reads 2e-4 (no dot) as a string
        except ValueError:
            pass
    if kind is int and isinstance(value, str):
        try:
            return int(value)  # kept as text by parse_override ("0010")
        except ValueError:
            pass
    if kind is str and isinstance(value, bool):
        return "true" if value else "false"  # engine.compile=true: YAML reads true/on/yes as booleans
    if kind is str and isinstance(value, (int, float)):
        return str(value)  # run.name=123 on the command line
    if kind is int and isinstance(value, bool) or not isinstance(value, kind):
        raise ConfigError(f"{key}: expected {annotation}, got {type(value).__name__} {value!r}")
    return value


def _fill(obj, values: dict, prefix: str) -> None:
    hints = {f.name: f.type for f in dataclasses.fields(obj)}
    for key, value in values.items():
        dotted = f"{prefix}{key}"
        if key not in hints:
            raise ConfigError(f"unknown config key {dotted!r}; valid keys here: {', '.join(hints)}")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ConfigError(f"{dotted}: expected a section (mapping), got {value!r}")
            _fill(current, value, dotted + ".")
        else:
            setattr(obj, key, _coerce(dotted, value, hints[key]))


def from_dict(values: dict) -> Config:
    cfg = Config()
    _fill(cfg, upgrade(values), "")
    return cfg


def upgrade(values: dict) -> dict:
    """One config mapping (a YAML file, the overrides, a saved config.yaml) with older keys in today's terms:
    `sample.heun: true/false` became `sample.solver: heun/euler`. Run on each mapping before they are merged, so
    that an override in either spelling wins over the file beneath it."""
    sample = values.get("sample")
    if not isinstance(sample, dict) or "heun" not in sample:
        return values
    values, sample = dict(values), dict(sample)
    heun = sample.pop("heun")
    if not isinstance(heun, bool):
        raise ConfigError(f"sample.heun: expected bool, got {type(heun).__name__} {heun!r}")
    solver = "heun" if heun else "euler"
    if sample.setdefault("solver", solver) != solver:
        raise ConfigError(f"sample.heun: {heun} contradicts sample.solver: {sample['solver']!r} (sample.heun is "
                          "the old name of sample.solver; set only sample.solver)")
    values["sample"] = sample
    return values


def parse_override(item: str) -> tuple[str, object]:
    """'train.micro_batch=32' -> ('train.micro_batch', 32); values are parsed as YAML scalars/lists."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like section.key=value")
    key, raw = item.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as err:
        raise ConfigError(f"override {item!r}: the value is not valid YAML ({_yaml_problem(err)})") from None
    if isinstance(value, (int, float)) and not isinstance(value, bool) and str(value) != raw.strip():
        value = raw.strip()  # a hash like 000123 or 12e45 stays text; numeric fields convert it back
    return key.strip(), value


def nest(dotted: dict) -> dict:
    out: dict = {}
    for key, value in dotted.items():
        node = out
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {key!r} conflicts with a scalar at {part!r}")
        node[parts[-1]] = value
    return out


def merge(base: dict, update: dict, prefix: str = "") -> dict:
    out = copy.deepcopy(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value, f"{prefix}{key}.")
        elif isinstance(value, dict) and isinstance(out.get(key), list) and value and all(
                str(k).isdigit() for k in value):
            out[key] = merge_list(out[key], value, f"{prefix}{key}")  # train.stages.1.steps=300
        else:
            out[key] = value
    return out


def merge_list(items: list, update: dict, name: str) -> list:
    """Dotted overrides with an index (`train.stages.0.steps=100`) update that element of a list."""
    out = copy.deepcopy(items)
    for index, value in update.items():
        i = int(index)
        if i >= len(out):
            raise ConfigError(f"{name}.{index}: index out of range, the list has {len(out)} entries")
        nested = isinstance(value, dict) and isinstance(out[i], dict)
        out[i] = merge(out[i], value, f"{name}.{index}.") if nested else value
    return out


def preset_path(name_or_path: str) -> Path:
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        return path
    preset = PRESET_DIR / f"{name_or_path}.yaml"
    if not preset.is_file():
        known = sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))
        raise ConfigError(f"no preset named {name_or_path!r}; presets: {', '.join(known)}")
    return preset


def _yaml_problem(err: yaml.YAMLError) -> str:
    """'line 3, column 7: found unexpected end of stream' from a PyYAML error (1-based positions)."""
    mark = getattr(err, "problem_mark", None)
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    return where + (getattr(err, "problem", None) or str(err).splitlines()[0])


def load_yaml(path: Path) -> dict:
    """A YAML file may name a parent preset with `base: <name>`; its values are merged underneath."""
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {_yaml_problem(err)}") from None
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: top level must be a mapping")
    parent = values.pop("base", None)
    values = upgrade(values)
    return merge(load_yaml(preset_path(parent)), values) if parent else values


def load_config(name_or_path: str, overrides: typing.Sequence[str] = ()) -> Config:
    values = load_yaml(preset_path(name_or_path))
    values = merge(values, upgrade(nest(dict(parse_override(o) for o in overrides))))
    return from_dict(values)


def resolve_auto(cfg: Config) -> tuple[Config, list[str]]:
    """engine.precision=auto (in the run config and in any stage's overrides) -> what this machine trains best in,
    so that config.yaml records what ran. Returns the new config and one note per resolved value (the reason)."""
    from .hardware import resolve_precision

    notes: list[str] = []

    def pick(value, where: str):
        if value != "auto":
            return value
        chosen, why = resolve_precision("auto")
        notes.append(f"{where}: auto -> {chosen} ({why})")
        return chosen

    cfg = copy.deepcopy(cfg)
    cfg.engine.precision = pick(cfg.engine.precision, "engine.precision")
    for i, raw in enumerate(cfg.train.stages):
        overrides = raw.get("overrides") if isinstance(raw, dict) else None
        if not isinstance(overrides, dict):
            continue
        if "engine.precision" in overrides:
            overrides["engine.precision"] = pick(overrides["engine.precision"], f"train.stages[{i}] engine.precision")
        elif isinstance(overrides.get("engine"), dict) and "precision" in overrides["engine"]:
            overrides["engine"]["precision"] = pick(overrides["engine"]["precision"],
                                                    f"train.stages[{i}] engine.precision")
    return cfg, notes


def expand_stages(cfg: Config) -> tuple[Stage, ...]:
    """The one place stages are built: train.stages (or, without it, one stage "main" of train.steps) with each
    stage's dotted overrides applied to the run config. Checks what makes a stage list (mappings with known keys,
    overrides that name config keys, positive step counts); validate() checks each stage's config."""
    if not cfg.train.stages:
        stages = (Stage(0, "main", cfg.train.steps, cfg),)
    else:
        stages = tuple(_expand_stage(cfg, i, raw) for i, raw in enumerate(cfg.train.stages))
    _check(all(s.steps > 0 for s in stages), "train.steps (or every train.stages[i].steps) must be positive")
    return stages


def _expand_stage(cfg: Config, index: int, raw) -> Stage:
    if not isinstance(raw, dict):
        raise ConfigError(f"train.stages[{index}]: expected a mapping, got {raw!r}")
    entry = StageEntry()
    _fill(entry, raw, f"train.stages[{index}].")
    values = cfg.to_dict()
    values["train"]["stages"] = []  # stages are not nested
    try:
        stage_cfg = from_dict(merge(values, upgrade(nest(entry.overrides))))
    except ConfigError as err:
        raise ConfigError(f"train.stages[{index}] ({entry.name}): {err}") from None
    return Stage(index, entry.name, entry.steps, stage_cfg)


# ---------------------------------------------------------------- validation


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def validate(cfg: Config, world_size: int = 1, check_paths: bool = True, _stage: bool = False) -> list[str]:
    """Every error names its key. Run before anything heavy starts (and for each stage).

    check_paths=False (--dry-run on a machine without the data) turns missing paths into returned warnings.
    Returns warnings: things that run but are probably not what the user wants.
    """
    warnings: list[str] = []

    def check_path(key: str, value: str) -> None:
        if not Path(value).exists():
            _check(not check_paths, f"{key}: {value} does not exist")
            warnings.append(f"{key}: {value} does not exist here")

    from .data import DATA_SOURCES
    from .diffusion.solvers import SOLVERS
    from .model.masking import STRATEGIES
    from .model.registry import MODELS

    m, d, t = cfg.model, cfg.data, cfg.train
    check_run_name(cfg.run)
    _check(m.name in MODELS, f"model.name: unknown model {m.name!r}; known: {', '.join(sorted(MODELS))}")
    patch = MODELS[m.name].patch_size
    _check(m.input_size > 0 and m.input_size % patch == 0,
           f"model.input_size: {m.input_size} must be a positive multiple of the patch size {patch}")
    _check(m.in_channels > 0 and m.num_classes > 0, "model.in_channels and model.num_classes must be positive")
    _check(d.source in DATA_SOURCES, f"data.source: {d.source!r} is not one of {DATA_SOURCES.known()}")
    if d.kind.needs_path:
        _check(bool(d.path), f"data.path: required for data.source={d.source}")
        if d.kind.local_path:
            check_path("data.path", d.path)
    if d.kind.latent:
        _check(d.resolution == m.input_size * 8,
               f"data.resolution: {d.resolution} px latents are {d.resolution // 8}x{d.resolution // 8}, "
               f"but model.input_size is {m.input_size}")
    _check(0 < d.fraction <= 1, f"data.fraction: {d.fraction} must be in (0, 1]")
    _check(0 <= cfg.mask.ratio < 1, f"mask.ratio: {cfg.mask.ratio} must be in [0, 1)")
    _check(cfg.mask.schedule in ("constant", "cosine"), f"mask.schedule: {cfg.mask.schedule!r} not constant|cosine")
    _check(cfg.mask.strategy in STRATEGIES,
           f"mask.strategy: {cfg.mask.strategy!r} is not one of {STRATEGIES.known()}")
    _check(cfg.mask.block_size > 0, f"mask.block_size: {cfg.mask.block_size} must be positive")
    _check(0 <= cfg.loss.label_dropout < 1, f"loss.label_dropout: {cfg.loss.label_dropout} must be in [0, 1)")
    check_alignment(cfg.loss, m.name, MODELS[m.name])
    for key, value in flatten(cfg.to_dict()).items():
        _check(not isinstance(value, float) or math.isfinite(value) or key in MAY_BE_INFINITE,
               f"{key}: {value} is not a finite number")
    _check(cfg.optim.lr > 0, f"optim.lr: {cfg.optim.lr} must be positive")
    _check(len(cfg.optim.betas) == 2 and all(0 <= b < 1 for b in cfg.optim.betas),
           f"optim.betas: {cfg.optim.betas} must be two numbers in [0, 1)")
    _check(cfg.engine.precision in ENGINE_PRECISIONS,
           f"engine.precision: {cfg.engine.precision!r} not one of {ENGINE_PRECISIONS}")
    if cfg.engine.precision != "auto":  # auto is resolved on the machine that trains (resolve_auto)
        ds_config_path(cfg)  # raises when missing
    _check(cfg.sample.precision in PRECISIONS, f"sample.precision: {cfg.sample.precision!r} not one of {PRECISIONS}")
    _check(cfg.sample.solver in SOLVERS, f"sample.solver: {cfg.sample.solver!r} is not one of {SOLVERS.known()}")
    _check(cfg.engine.optimizer == "auto" or cfg.engine.optimizer in OPTIMIZERS,
           f"engine.optimizer: {cfg.engine.optimizer!r} is not auto or one of {OPTIMIZERS.known()}")
    _check(cfg.engine.compile in ("auto", "true", "false"), f"engine.compile: {cfg.engine.compile!r} is not "
           "auto, true or false")
    _check(cfg.dist.timeout_s >= 0, f"dist.timeout_s: {cfg.dist.timeout_s} must be >= 0 (0: DeepSpeed's default)")
    _check(t.micro_batch > 0 and t.global_batch > 0, "train.micro_batch and train.global_batch must be positive")
    per_step = t.micro_batch * world_size
    _check(t.global_batch % per_step == 0,
           f"train.global_batch: {t.global_batch} is not divisible by train.micro_batch x world size "
           f"= {t.micro_batch} x {world_size}")
    _check(0 <= t.ema_decay < 1, f"train.ema_decay: {t.ema_decay} must be in [0, 1)")
    _check(t.resume in ("auto", "never"), f"train.resume: {t.resume!r} is not auto or never")
    _check(t.log_every > 0 and t.ckpt_every > 0 and t.keep_last > 0,
           "train.log_every, train.ckpt_every and train.keep_last must be positive")
    if t.init_from:
        check_path("train.init_from", t.init_from)
    if cfg.eval.fid_every:
        _check(cfg.eval.fid_samples > 0, f"eval.fid_samples: {cfg.eval.fid_samples} must be positive")
        for key in ("fid_ref", "inception_weights"):
            _check(bool(getattr(cfg.eval, key)), f"eval.{key}: required when eval.fid_every > 0")
            check_path(f"eval.{key}", getattr(cfg.eval, key))
    _check(cfg.eval.agreement_every >= 0, f"eval.agreement_every: {cfg.eval.agreement_every} must be >= 0")
    if cfg.eval.agreement_every:
        _check(d.source == "digits", "eval.agreement_every: the class-agreement judge knows only the built-in "
               f"digits (data.source=digits), not data.source={d.source}; use eval.fid_every")
        _check(cfg.eval.agreement_samples > 0,
               f"eval.agreement_samples: {cfg.eval.agreement_samples} must be positive")
    stages = expand_stages(cfg)
    if cfg.train.stages:
        for stage in stages:
            try:
                warnings += validate(stage.cfg, world_size, check_paths, _stage=True)
            except ConfigError as err:
                raise ConfigError(f"train.stages[{stage.index}] ({stage.name}): {err}") from None
        check_stage_alignment(cfg, stages)
    if not _stage:
        warnings += ema_warnings(cfg, sum(s.steps for s in stages))
    return sorted(set(warnings))


def check_run_name(run: RunConfig) -> None:
    """run.name is a folder inside run.out_dir: relative, without '..', and not the out_dir itself."""
    parts = PurePath(run.name).parts
    _check(bool(parts) and not PurePath(run.name).is_absolute() and ".." not in parts and set(parts) != {"."},
           f"run.name: {run.name!r} must name a folder inside run.out_dir ({run.out_dir}): a relative path "
           "without '..'")


# The projector's shape and input: one value for the whole run (a stage may change only weight and until_step).
ALIGN_RUN_KEYS = ("align_depth", "align_proj_dim", "align_teacher", "align_teacher_resolution")


def check_alignment(loss: LossConfig, model_name: str, size) -> None:
    _check(loss.align_weight >= 0, f"loss.align_weight: {loss.align_weight} must be >= 0")
    _check(loss.align_until_step >= 0, f"loss.align_until_step: {loss.align_until_step} must be >= 0")
    if loss.align_weight == 0:
        return
    # MaskDiT's encoder blocks; U-ViT's trunk blocks (in, middle, out) in the order they run
    _check(1 <= loss.align_depth <= size.depth, f"loss.align_depth: {loss.align_depth} must be in "
           f"[1, {size.depth}], the encoder blocks of {model_name}")
    _check(loss.align_proj_dim > 0, f"loss.align_proj_dim: {loss.align_proj_dim} must be positive")
    _check(loss.align_teacher_resolution > 0,
           f"loss.align_teacher_resolution: {loss.align_teacher_resolution} must be positive")
    _check(bool(loss.align_teacher), "loss.align_teacher: required when loss.align_weight > 0")


def check_stage_alignment(cfg: Config, stages: typing.Sequence[Stage]) -> None:
    for stage in stages:
        changed = [f"loss.{k}" for k in ALIGN_RUN_KEYS if getattr(stage.cfg.loss, k) != getattr(cfg.loss, k)]
        _check(not changed, f"train.stages[{stage.index}] ({stage.name}): {', '.join(changed)} shape the projector "
               "and must be set for the whole run, not per stage (a stage may set loss.align_weight and "
               "loss.align_until_step)")


def aligns(stages: typing.Sequence[Stage]) -> bool:
    """Whether any stage of the run trains with the alignment term: then the trained module carries the
    projector in every stage (kept, with a zero term, where a stage or align_until_step switches it off)."""
    return any(stage.cfg.loss.align_weight > 0 for stage in stages)


# What a resume must not change: the model, the data it learns from, its randomness and its objective. A
# different global batch changes the optimisation (world size and micro-batch may change; accumulation follows).
FROZEN_ON_RESUME = ("model", "data.source", "data.classes", "data.fraction", "data.resolution", "data.latent_scale",
                    "run.seed", "loss", "train.global_batch")
NOT_COMPARED = ("train.allow_config_change", "train.resume", "run.out_dir", "run.name")


def flatten(values: dict, prefix: str = "") -> dict:
    """{"a": {"b": 1}} -> {"a.b": 1}; lists stay values."""
    out = {}
    for key, value in values.items():
        if isinstance(value, dict) and value and key != "overrides":
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _under(key: str, prefixes) -> bool:
    return any(key == p or key.startswith(p + ".") for p in prefixes)


def resume_changes(saved: dict, cfg: Config) -> tuple[list[str], list[str]]:
    """Compare the config a checkpoint was trained with to the one resuming it: (refused, allowed) lines
    'key: saved -> now'. Refused are FROZEN_ON_RESUME keys not named in train.allow_config_change."""
    before, now = flatten(upgrade(saved)), flatten(cfg.to_dict())
    refused, allowed = [], []
    for key in sorted(set(before) | set(now)):
        if _under(key, NOT_COMPARED) or before.get(key) == now.get(key):
            continue
        line = f"{key}: {before.get(key, '(absent)')!r} -> {now.get(key, '(absent)')!r}"
        frozen = _under(key, FROZEN_ON_RESUME) and not _under(key, cfg.train.allow_config_change)
        (refused if frozen else allowed).append(line)
    return refused, allowed


def ema_warnings(cfg: Config, total_steps: int) -> list[str]:
    """A short run whose EMA still mostly holds its starting weights exports and samples those weights
    (seen: decay 0.999 over 750 steps left 47% of the zero-initialised model, and the samples were noise)."""
    if cfg.train.init_from and not cfg.train.reset_ema:
        return []  # the EMA continues from a trained model
    left = cfg.train.ema_decay**total_steps
    if left <= 0.05:
        return []
    return [f"train.ema_decay: {cfg.train.ema_decay} over {total_steps} steps leaves {left:.0%} of the starting "
            f"weights in the EMA that exports and samples use; for a run this short use about "
            f"{1 - 5 / total_steps:.4g} or lower"]


def grad_accum(cfg: Config, world_size: int) -> int:
    return cfg.train.global_batch // (cfg.train.micro_batch * world_size)


def ds_config_path(cfg: Config) -> Path:
    name = cfg.engine.ds_config or f"zero2_{cfg.engine.precision}"
    for candidate in (Path(name), DS_CONFIG_DIR / name, DS_CONFIG_DIR / f"{name}.json"):
        if candidate.is_file():
            return candidate
    raise ConfigError(f"engine.ds_config: no file {name!r} (looked in . and {DS_CONFIG_DIR})")


def save_config(cfg: Config, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, yaml.safe_dump(cfg.to_dict(), sort_keys=False))


def dumps(cfg: Config) -> str:
    return json.dumps(cfg.to_dict(), indent=2)


def key_reference() -> str:
    """Markdown table of every config key with its default and the comment at its declaration (for README)."""
    import inspect
    import re

    rows = ["| key | default | meaning |", "|---|---|---|"]
    for section in dataclasses.fields(Config):
        cls = type(getattr(Config(), section.name))
        comments = {}
        for klass in reversed(cls.__mro__[:-1]):  # inherited fields (SampleConfig < SamplerConfig) too
            for line in inspect.getsource(klass).splitlines():
                match = re.match(r"\s+(\w+): [^=]+=.*?(?:#\s*(.*))?$", line)
                if match:
                    comments[match.group(1)] = match.group(2) or ""
        for f in dataclasses.fields(cls):
            default = getattr(cls(), f.name)
            meaning = comments.get(f.name, "").replace("|", "/")
            rows.append(f"| `{section.name}.{f.name}` | `{json.dumps(default)}` | {meaning} |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(key_reference())
