"""maskdit_ds's precision modes against the paper's training loop, on the same weights, batches and noise.

The paper trained with a plain PyTorch loop: fp32 weights, torch.autocast (fp16), torch's GradScaler, AdamW and
an EMA of the fp32 weights (TorchBaseline plus a module EMA here). Every arm below starts from the same initial
weights and sees the same batches of the built-in digits; before each step the global RNG is seeded from
(noise seed, step), so the loss draws the same sigma, noise, masks and label dropout in every arm. What differs
is only how the arm computes: that is what the per-step loss and final EMA differences measure. Running the
paper's loop with other noise seeds gives the seed-to-seed spread the differences are judged against.

One process, world size 1: `python -m maskdit_ds numerics` (cli/numerics.py) and tests/integration.
"""
from __future__ import annotations

import copy
import json
import statistics
import tempfile
from pathlib import Path

import torch

from .. import dist
from ..config import ds_config_path, load_config, resolve_auto
from ..data import DigitsDataset
from ..diffusion import MaskedEDMLoss, ema_update
from ..hardware import TRAINING_MODES
from ..model import Masker, build_denoiser, token_grid
from .bench import TorchBaseline
from .ema import MasterEMA
from .engine import AMP_SCALER_KEY, Engine, init_distributed
from .loop import build_loss

PAPER = "paper:"  # arm prefix: the plain loop in that precision's autocast dtype (paper:amp_fp16 is the paper's)


def numerics_config(model: str, size: int, batch: int, lr: float, mask_ratio: float, precision: str = "fp32"):
    cfg = load_config("digits", [f"model.name={model}", f"model.input_size={size}", f"data.resolution={size}",
                                 f"train.micro_batch={batch}", f"train.global_batch={batch}", "train.stages=[]",
                                 f"optim.lr={lr}", f"mask.ratio={mask_ratio}", f"engine.precision={precision}",
                                 "engine.compile=false"])
    return resolve_auto(cfg)[0]


def fixed_batches(size: int, batch: int, steps: int, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """`steps` batches of the real digits at `size` px, the same for every arm: [(x (B, 1, S, S), y (B,))]."""
    data = DigitsDataset(size)
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))
    picks = [order[(s * batch + torch.arange(batch)) % len(data)] for s in range(steps)]
    return [(data.x[i], data.y[i]) for i in picks]


class Arm:
    """One way to train: step(x, y, loss_fn, masker) -> (mean loss, skipped), and the fp32 EMA at the end.
    init_scale: the fp16 loss scale to start from (None: the default 2^16), in the paper's GradScaler and in
    amp_fp16's alike. Under pure fp16/bf16 the arm also keeps the EMA of the module's half copy (the old way)."""

    def __init__(self, name: str, net: torch.nn.Module, cfg, decay: float, init_scale: float | None = None):
        self.name, self.decay = name, decay
        self.ema = copy.deepcopy(net).float().requires_grad_(False)
        self.half_ema = None
        if name.startswith(PAPER):
            self.runner = TorchBaseline(net, cfg.optim.lr, name.removeprefix(PAPER), cfg.engine.optimizer)
            if init_scale is not None:
                self.runner.scaler = torch.amp.GradScaler(dist.device().type, init_scale=init_scale,
                                                          enabled=self.runner.scaler.is_enabled())
            self.master_ema = None
        else:
            cfg = copy.deepcopy(cfg)
            cfg.engine.precision = name
            if init_scale is not None and name == "amp_fp16":
                cfg.engine.ds_config = scaler_ds_config(cfg, init_scale)
            self.runner = Engine(net, cfg, world_size=1)
            self.master_ema = MasterEMA(self.ema, self.runner)
            if TRAINING_MODES[name].weights != "fp32":
                self.half_ema = copy.deepcopy(self.ema)

    def step(self, x, y, loss_fn: MaskedEDMLoss, masker: Masker) -> tuple[float, bool]:
        skips_before = self.skips()
        loss, _ = loss_fn(self.runner, x, y, masker)
        self.runner.backward(loss.mean())
        self.runner.step()
        skipped = self.skips() > skips_before
        if not skipped:  # as the trainer: a step that loss scaling skipped leaves weights and EMA alone
            if self.master_ema is not None:
                self.master_ema.update(self.decay)
            else:
                ema_update(self.ema, self.runner.net, self.decay)
            if self.half_ema is not None:
                ema_update(self.half_ema, self.runner.module, self.decay)
        return float(loss.detach().mean()), skipped

    def ema_deviation(self) -> dict[str, float]:
        """Per tensor, ||EMA of the half copy - EMA of the masters|| / ||EMA of the masters|| (a collective)."""
        exact = self.master_ema.gather().state_dict()
        old = self.half_ema.state_dict()
        return {k: relative_l2({k: old[k]}, {k: exact[k]}) for k in exact if exact[k].is_floating_point()}

    def skips(self) -> float:
        """A count that grows on every skipped step (the paper loop's: each GradScaler back-off)."""
        if isinstance(self.runner, Engine):
            return self.runner.skipped_steps
        return -self.runner.scaler.get_scale() if self.runner.scaler.is_enabled() else 0.0

    def final_ema(self) -> dict[str, torch.Tensor]:
        if self.master_ema is not None:
            self.master_ema.gather()
        return {k: v.detach().float().clone() for k, v in self.ema.state_dict().items()}


def scaler_ds_config(cfg, init_scale: float) -> str:
    """A copy of the run's ds_config with amp_fp16's loss scale starting at `init_scale` (a temporary file)."""
    ds = json.loads(ds_config_path(cfg).read_text())
    ds[AMP_SCALER_KEY] = {**ds.get(AMP_SCALER_KEY, {}), "init_scale": init_scale}
    path = Path(tempfile.mkdtemp(prefix="maskdit_numerics_")) / "zero2_amp_fp16.json"
    path.write_text(json.dumps(ds))
    return str(path)


def run_arm(name: str, cfg, init: dict, batches, noise_seed: int, decay: float, init_scale: float | None = None,
            deviation_every: int = 0) -> dict:
    """Train one arm from `init` over `batches`; per-step losses, skipped steps, the final EMA, and (pure half
    modes, every `deviation_every` steps) the old EMA's per-tensor deviation from the exact one."""
    net = build_denoiser(cfg.model)
    net.load_state_dict(init)
    arm = Arm(name, net.to(dist.device()), cfg, decay, init_scale)
    loss_fn = build_loss(cfg.model, cfg.loss)  # the trainer's loss, built as the trainer builds it
    masker = Masker(cfg.mask.strategy, token_grid(cfg.model), cfg.mask.ratio, cfg.mask.block_size)
    losses, skipped, deviation = [], 0, {}
    for step, (x, y) in enumerate(batches):
        torch.manual_seed(noise_seed * 1_000_003 + step)  # the same sigma, noise, mask and dropout in every arm
        loss, skip = arm.step(x.to(dist.device()), y.to(dist.device()), loss_fn, masker)
        losses.append(loss)
        skipped += skip
        if arm.half_ema is not None and deviation_every and (step + 1) % deviation_every == 0:
            deviation[step + 1] = arm.ema_deviation()
    out = {"losses": losses, "skipped": skipped, "ema": arm.final_ema(), "ema_deviation": deviation}
    if isinstance(arm.runner, Engine):
        out["loss_scale"] = arm.runner.loss_scale
        arm.runner.release()
    else:
        out["loss_scale"] = arm.runner.scaler.get_scale() if arm.runner.scaler.is_enabled() else 1.0
    return out


def relative_l2(a: dict, b: dict) -> float:
    """||a - b|| / ||b|| over every tensor of two state dicts together."""
    num = sum(float((a[k].double() - b[k].double()).pow(2).sum()) for k in b)
    den = sum(float(b[k].double().pow(2).sum()) for k in b)
    return (num / max(den, 1e-30)) ** 0.5


def compare(arms=("amp_fp16", "amp_bf16", "fp16", "bf16", "fp32"), steps: int = 200, spread_seeds: int = 3,
            model: str = "MaskDiT-Digits/2", size: int = 8, batch: int = 32, lr: float = 1e-3, mask_ratio: float = 0.5,
            decay: float = 0.99, seed: int = 0, init_scale: float | None = None) -> dict:
    """Each of our `arms` against the paper's loop in the same autocast dtype (paper:amp_fp16 for amp_fp16 and
    fp16, paper:amp_bf16 for amp_bf16 and bf16, paper:fp32 for fp32). Returns per-step losses, the seed spread
    (the paper loops' per-step loss std over `spread_seeds` noise seeds, median over steps), and per arm: the
    median and max per-step |loss - reference loss| and the final EMA's relative L2 distance to the reference's."""
    init_distributed()
    cfg = numerics_config(model, size, batch, lr, mask_ratio)
    torch.manual_seed(seed)
    init = build_denoiser(cfg.model).state_dict()
    batches = fixed_batches(size, batch, steps, seed)
    references = sorted({reference_of(a) for a in arms})
    runs = {r: [run_arm(r, cfg, init, batches, s, decay, init_scale) for s in range(spread_seeds)]
            for r in references}
    report = {"steps": steps, "model": model, "size": size, "batch": batch, "lr": lr, "decay": decay,
              "mask_ratio": mask_ratio, "references": {}, "arms": {}}
    for r, seeded in runs.items():
        per_step_std = [statistics.pstdev(run["losses"][s] for run in seeded) for s in range(steps)]
        report["references"][r] = {"losses": seeded[0]["losses"], "skipped": seeded[0]["skipped"],
                                   "loss_scale": seeded[0]["loss_scale"],
                                   "seed_spread": statistics.median(per_step_std)}
    for name in arms:
        ours, ref = run_arm(name, cfg, init, batches, 0, decay, init_scale), runs[reference_of(name)][0]
        diffs = [abs(a - b) for a, b in zip(ours["losses"], ref["losses"])]
        report["arms"][name] = {"reference": reference_of(name), "losses": ours["losses"], "skipped": ours["skipped"],
                                "median_loss_diff": statistics.median(diffs), "max_loss_diff": max(diffs),
                                "ema_rel_l2": relative_l2(ours["ema"], ref["ema"]), "loss_scale": ours["loss_scale"]}
    return report


def ema_deviation(precision: str = "bf16", steps: int = 2000, every: int = 200, model: str = "MaskDiT-Digits/2",
                  size: int = 8, batch: int = 32, lr: float = 1e-4, decay: float = 0.999, seed: int = 0) -> dict:
    """Train one pure half-precision arm and measure, every `every` steps, how far the EMA of the module's rounded
    half copy (the old EMA) is from the EMA of the fp32 masters: per tensor relative L2, median and max."""
    init_distributed()
    cfg = numerics_config(model, size, batch, lr, 0.5)
    torch.manual_seed(seed)
    init = build_denoiser(cfg.model).state_dict()
    run = run_arm(precision, cfg, init, fixed_batches(size, batch, steps, seed), 0, decay, deviation_every=every)
    return {"precision": precision, "steps": steps, "lr": lr, "decay": decay, "model": model, "size": size,
            "batch": batch, "by_step": {step: {"median": statistics.median(d.values()), "max": max(d.values()),
                                               "worst": max(d, key=d.get)} for step, d in run["ema_deviation"].items()}}


def reference_of(arm: str) -> str:
    """The paper's loop in the arm's matmul dtype."""
    return PAPER + {"fp16": "amp_fp16", "bf16": "amp_bf16", "fp32": "fp32"}[TRAINING_MODES[arm].matmul]


def format_report(report: dict) -> str:
    lines = [f"{report['model']} at {report['size']} px, batch {report['batch']}, lr {report['lr']}, mask ratio "
             f"{report['mask_ratio']}, EMA decay {report['decay']}, {report['steps']} steps, one process",
             "| arm | reference | median per-step loss diff | max | seed spread of the reference | "
             "median diff / spread | final EMA rel. L2 | skipped steps |", "|---|---|---|---|---|---|---|---|"]
    for name, arm in report["arms"].items():
        spread = report["references"][arm["reference"]]["seed_spread"]
        lines.append(f"| {name} | {arm['reference']} | {arm['median_loss_diff']:.2e} | {arm['max_loss_diff']:.2e} "
                     f"| {spread:.2e} | {arm['median_loss_diff'] / spread:.3f} | {arm['ema_rel_l2']:.2e} "
                     f"| {arm['skipped']} |")
    return "\n".join(lines)
