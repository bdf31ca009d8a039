"""Sample N images from an exported checkpoint or a run directory into an ADM .npz (arr_0 uint8 NHWC, arr_1 labels).

  python -m maskdit_ds sample runs/digits --out samples/digits --num-images 1000 --steps 18 --guidance 1.5
  torchrun --nproc_per_node 8 -m maskdit_ds sample exp/maskdit256 --out samples/xl256 --vae /models/sd-vae-ft-ema
  accelerate launch --num_processes 8 -m maskdit_ds sample exp/maskdit256 --out samples/xl256 --vae ...
Writes <out>/samples.npz, samples.json (settings, seeds, class counts, images/s) and samples.png. Image i uses seed
--first-seed + i, so the file is the same on 1 or N ranks. Re-running the same command resumes a killed run: finished
chunks in <out>/chunks are kept. Evaluate with `python -m maskdit_ds eval`.
"""


from ..config import PRECISIONS, SamplerConfig
from ..diffusion.solvers import SOLVERS
from ..generation import CLASS_MODES, GenerateConfig, run_generation
from . import command, parser

SAMPLER, JOB = SamplerConfig(), GenerateConfig()  # the defaults: the sampler's and the job's, nowhere else


def parse(argv=None):
    p = parser("sample", __doc__)
    p.add_argument("model", help="export folder (config.json + model.safetensors) or run directory (newest export)")
    p.add_argument("--out", required=True, help="output folder")
    g = p.add_argument_group("what to generate")
    g.add_argument("--num-images", type=int, default=JOB.num_images)
    g.add_argument("--first-seed", type=int, default=JOB.first_seed, help="image i uses seed first_seed + i")
    g.add_argument("--classes", choices=CLASS_MODES, default=JOB.class_mode,
                   help="random: uniform from each seed (DiT/MaskDiT); balanced: equal counts, shuffled")
    s = p.add_argument_group("EDM sampler (docs/method.md §6)")
    s.add_argument("--steps", type=int, default=SAMPLER.steps)
    s.add_argument("--guidance", type=float, default=SAMPLER.guidance, help="classifier-free guidance (1: none)")
    s.add_argument("--guidance-interval", type=float, nargs=2, metavar=("LO", "HI"),
                   default=SAMPLER.guidance_interval, help="apply guidance only for sigma in [LO, HI]")
    s.add_argument("--solver", choices=list(SOLVERS), default=SAMPLER.solver, help="step rule (diffusion/solvers.py)")
    s.add_argument("--euler", dest="solver", action="store_const", const="euler", help="the same as --solver euler")
    s.add_argument("--sigma-min", type=float, default=SAMPLER.sigma_min)
    s.add_argument("--sigma-max", type=float, default=SAMPLER.sigma_max)
    s.add_argument("--rho", type=float, default=SAMPLER.rho)
    s.add_argument("--s-churn", type=float, default=SAMPLER.S_churn)
    s.add_argument("--s-min", type=float, default=SAMPLER.S_min)
    s.add_argument("--s-max", type=float, default=SAMPLER.S_max)
    s.add_argument("--s-noise", type=float, default=SAMPLER.S_noise)
    s.add_argument("--precision", choices=PRECISIONS, default=SAMPLER.precision,
                   help="network autocast dtype: auto = bf16 on GPUs (fp16 before Ampere), fp32 on CPUs; the EDM "
                        "scalings and the ODE solver stay fp32/float64")
    r = p.add_argument_group("running")
    r.add_argument("--batch-size", type=int, default=JOB.batch_size, help="images per network batch per rank")
    r.add_argument("--chunk-size", type=int, default=JOB.chunk_size, help="images per resumable chunk")
    r.add_argument("--rounding", choices=["floor", "round"], default=JOB.rounding,
                   help="floor((x+1)*127.5) (reference MaskDiT/ADM) or 127.5x+128 rounded (DiT/EDM)")
    r.add_argument("--vae", default=JOB.vae, help="diffusers AutoencoderKL for latent models (default: the run's "
                   "data.vae)")
    r.add_argument("--latent-scale", type=float, default=JOB.latent_scale)
    r.add_argument("--vae-batch", type=int, default=JOB.vae_batch, help="decode batch (halved on out-of-memory)")
    r.add_argument("--grid", type=int, default=JOB.grid, help="images in samples.png (0: none)")
    r.add_argument("--keep-chunks", action="store_true")
    r.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


@command
def main(argv=None) -> int:
    a = parse(argv)
    sampler = SamplerConfig(steps=a.steps, sigma_min=a.sigma_min, sigma_max=a.sigma_max, rho=a.rho,
                            guidance=a.guidance, guidance_interval=list(a.guidance_interval), solver=a.solver,
                            S_churn=a.s_churn, S_min=a.s_min, S_max=a.s_max, S_noise=a.s_noise,
                            precision=a.precision)
    gcfg = GenerateConfig(num_images=a.num_images, first_seed=a.first_seed, class_mode=a.classes,
                          batch_size=a.batch_size, chunk_size=a.chunk_size, rounding=a.rounding, vae=a.vae,
                          latent_scale=a.latent_scale, vae_batch=a.vae_batch, grid=a.grid,
                          keep_chunks=a.keep_chunks, sampler=sampler)
    npz = run_generation(a.model, a.out, gcfg, progress=not a.no_progress)
    if npz is not None:
        print(f"wrote {npz}")
    return 0
