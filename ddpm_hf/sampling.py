"""Sampling: the one place that decides which sampler runs, and the one loop that runs it.

* `make_sampler(scheduler, name, steps, spacing)` turns the trained noise schedule into a diffusers
  scheduler for sampling: ddpm (Ho et al. 2020, Alg. 2), ddim (Song et al. 2021, eta = 0) or dpmsolver
  (DPM-Solver++(2M), Lu et al. 2022); "auto" is ddpm with all T steps and ddim with fewer.
  The training grids, in-training FID, `ddpm-hf sample`, `ddpm-hf evaluate` and `ddpm-hf visualize reverse`
  all choose through it.
* `generate_images(unet, sampler, ...)` is the reverse chain they all run: uint8 images, batch by batch.
* `ddpm-hf sample`: a grid (and optionally one file per image) from a saved pipeline, folder or Hub id.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from .arguments import bounded, is_hub_id, local_path_or_hub_id, output_file
from .arguments import device as device_type
from .errors import UserError

SAMPLERS = ("ddpm", "ddim", "dpmsolver")
SAMPLER_CHOICES = ("auto", *SAMPLERS)
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")


@dataclass
class Sampler:
    """A diffusers scheduler set up for sampling, and what it was chosen as."""

    scheduler: object  # DDPMScheduler, DDIMScheduler or DPMSolverMultistepScheduler, timesteps already set
    name: str  # ddpm, ddim or dpmsolver (never "auto")
    steps: int  # K, the number of denoising steps asked for
    timestep_spacing: str

    @property
    def nfe(self) -> int:
        """Network evaluations per image."""
        return len(self.scheduler.timesteps)

    def describe(self) -> str:
        return f"{self.name} {self.steps} steps"


def resolve_sampler(name: str, steps: int | None, num_train_timesteps: int, option: str = "--scheduler") -> tuple[str, int]:
    """(sampler, K) for a requested name ('auto' or one of SAMPLERS) and step count (None: T for ddpm)."""
    if name not in SAMPLER_CHOICES:
        raise UserError(f"{option} {name}: unknown sampler. Choose one of: {', '.join(SAMPLER_CHOICES)}.")
    if name == "auto":
        name = "ddpm" if steps is None or steps >= num_train_timesteps else "ddim"
    if steps is None:
        if name != "ddpm":
            raise UserError(f"{option} {name} needs --steps K (e.g. 50 for ddim, 20 for dpmsolver).")
        steps = num_train_timesteps
    if not 1 <= steps <= num_train_timesteps:
        raise UserError(f"--steps {steps} must be between 1 and the model's T = {num_train_timesteps}.")
    return name, steps


def check_sampler_spacing(name: str, steps: int, num_train_timesteps: int, timestep_spacing: str, variance_type: str = "fixed_large") -> None:
    """DDPM with 'trailing' spacing and K < T ends at t = T/K - 1 > 0, where diffusers' DDPMScheduler still adds
    noise of variance beta_t for every variance but beta-tilde (which is 0 there): std ~0.3 of [-1, 1] units at
    K = 10 with fixed_large. The final image would stay noisy, so that combination is refused."""
    if name == "ddpm" and timestep_spacing == "trailing" and steps < num_train_timesteps and variance_type not in ("fixed_small", "fixed_small_log"):
        raise UserError(
            f"ddpm sampling with {steps} < T = {num_train_timesteps} steps, timestep_spacing 'trailing' and variance {variance_type} leaves noise "
            "in the final image. Use timestep_spacing 'leading' or 'linspace', all T steps, or the ddim or dpmsolver sampler."
        )


def make_sampler(scheduler, name: str = "auto", steps: int | None = None, timestep_spacing: str | None = None, device=None) -> Sampler:
    """A sampler that shares the trained noise schedule (betas, T, prediction type, variance) of `scheduler`.

    ddpm:      ancestral sampling, Ho et al. (2020) Alg. 2 (strided when K < T)
    ddim:      Song, Meng & Ermon (2021), deterministic (eta = 0)
    dpmsolver: DPM-Solver++(2M), Lu et al. (2022), multistep, one network evaluation per step
    auto:      ddpm when K is T (or not given), ddim when fewer
    """
    from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler

    num_train_timesteps = scheduler.config.num_train_timesteps
    name, steps = resolve_sampler(name, steps, num_train_timesteps)
    spacing = timestep_spacing or scheduler.config.get("timestep_spacing", "leading")
    if spacing not in TIMESTEP_SPACINGS:
        raise UserError(f"--timestep_spacing {spacing}: choose one of {', '.join(TIMESTEP_SPACINGS)}.")
    check_sampler_spacing(name, steps, num_train_timesteps, spacing, scheduler.config.get("variance_type", "fixed_small"))
    classes = {"ddpm": DDPMScheduler, "ddim": DDIMScheduler, "dpmsolver": DPMSolverMultistepScheduler}
    sampler = classes[name].from_config(scheduler.config, timestep_spacing=spacing)
    sampler.set_timesteps(steps, device=device)
    return Sampler(scheduler=sampler, name=name, steps=steps, timestep_spacing=spacing)


@torch.no_grad()
def generate_images(
    unet, sampler: Sampler, num_images: int, seed: int = 0, batch_size: int = 64, progress: bool = False, desc: str = "Sampling"
) -> Iterator[torch.Tensor]:
    """Yield batches of generated images, uint8 B x C x H x W on the CPU, quantised as a PNG would be.

    One CPU generator seeded with `seed` draws x_T and every step's noise, so a seed gives the same
    images on any device (for the same batch size). `unet` is put in eval mode meanwhile.
    """
    from tqdm.auto import tqdm

    if num_images < 1 or batch_size < 1:
        raise UserError(f"the number of images ({num_images}) and --batch_size ({batch_size}) must be positive.")
    parameter = next(unet.parameters())
    device, dtype = parameter.device, parameter.dtype
    size = unet.config.sample_size
    height, width = (size, size) if isinstance(size, int) else tuple(size)
    scheduler = sampler.scheduler
    generator = torch.Generator("cpu").manual_seed(seed)
    step_arguments = {"eta": 0.0} if sampler.name == "ddim" else {}
    was_training = unet.training
    unet.eval()
    try:
        with tqdm(total=num_images, desc=desc, unit="img", disable=not progress) as bar:
            for start in range(0, num_images, batch_size):
                count = min(batch_size, num_images - start)
                scheduler.set_timesteps(sampler.steps, device=device)  # also resets multistep solvers
                x = torch.randn((count, unet.config.in_channels, height, width), generator=generator).to(device, dtype)
                x = x * scheduler.init_noise_sigma
                for t in scheduler.timesteps:
                    model_output = unet(scheduler.scale_model_input(x, t), t).sample
                    x = scheduler.step(model_output, t, x, generator=generator, **step_arguments).prev_sample
                yield ((x.float() / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8).cpu()
                bar.update(count)
    finally:
        unet.train(was_training)


def to_pil(images_uint8: torch.Tensor) -> list:
    """uint8 N x C x H x W -> PIL images."""
    from PIL import Image

    array = images_uint8.permute(0, 2, 3, 1).numpy()
    return [Image.fromarray(a[..., 0], mode="L") if a.shape[-1] == 1 else Image.fromarray(a) for a in array]


def sample_grid(unet, scheduler, num_images: int, steps: int, seed: int, sampler: str = "auto", batch_size: int | None = None):
    """A PIL grid of `num_images` samples from `unet` with a fixed seed (the training grids)."""
    from diffusers.utils import make_image_grid

    chosen = make_sampler(scheduler, sampler, steps)
    images = [image for batch in generate_images(unet, chosen, num_images, seed, batch_size or num_images) for image in to_pil(batch)]
    return make_image_grid(images, *grid_shape(num_images))


def grid_shape(num_images: int) -> tuple[int, int]:
    rows = int(math.sqrt(num_images))
    while num_images % rows:
        rows -= 1
    return rows, num_images // rows


def load_pipeline(model: str, scheduler: str = "ddpm", device: str | None = None, revision: str | None = None, steps: int | None = None):
    """A stock diffusers pipeline from a folder or Hub id, its scheduler replaced by `make_sampler(scheduler)`:
    `DDPMPipeline` for ddpm and dpmsolver, `DDIMPipeline` for ddim (which passes eta)."""
    from diffusers import DDIMPipeline, DDPMPipeline

    if scheduler not in SAMPLER_CHOICES:
        raise UserError(f"--scheduler {scheduler}: unknown sampler. Choose one of: {', '.join(SAMPLER_CHOICES)}.")
    if os.path.isdir(model) and not os.path.isfile(os.path.join(model, "model_index.json")):
        raise UserError(f"--model {model} is a folder but not a saved pipeline (no model_index.json). Point it at a training OUTPUT_DIR.")
    if not os.path.isdir(model) and not is_hub_id(model):
        raise UserError(f"--model {model}: no such folder. Give a training OUTPUT_DIR or a Hub id like user/name.")
    try:
        pipeline = DDPMPipeline.from_pretrained(model, revision=revision, use_safetensors=True)
    except (OSError, ValueError) as e:
        raise UserError(f"--model {model}: could not load a pipeline ({str(e).splitlines()[0]}). Give a training OUTPUT_DIR or a Hub id.") from None
    if scheduler != "ddpm" or steps is not None:
        chosen = make_sampler(pipeline.scheduler, scheduler, steps)
        pipeline_class = DDIMPipeline if chosen.name == "ddim" else DDPMPipeline
        pipeline = pipeline_class(unet=pipeline.unet, scheduler=chosen.scheduler)
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return pipeline.to(device)


def run_sample(args) -> None:
    from diffusers.utils import make_image_grid

    out_dir = os.path.dirname(os.path.abspath(args.out))
    try:  # before any sampling: a bad --out costs nothing
        os.makedirs(out_dir, exist_ok=True)
    except OSError as e:
        raise UserError(f"--out {args.out}: cannot create its folder ({e.strerror or e}). Choose a path you can write to.") from None
    pipeline = load_pipeline(args.model, "ddpm", args.device, args.revision)
    sampler = make_sampler(pipeline.scheduler, args.scheduler, args.steps)
    if args.fast:
        from .fast_sampling import fast_generate

        if sampler.name == "dpmsolver":
            raise UserError("--fast runs ddpm and ddim; drop --fast for dpmsolver.")
        pipeline.scheduler = sampler.scheduler
        images = fast_generate(
            pipeline, args.num_images, sampler.steps, args.seed, args.batch_size, dtype=args.dtype, compile=args.compile, cuda_graphs=args.cuda_graphs
        )
    else:
        if args.dtype != "fp32":
            raise UserError("--dtype bf16 needs --fast.")
        batches = generate_images(pipeline.unet, sampler, args.num_images, args.seed, args.batch_size or args.num_images, progress=True)
        images = [image for batch in batches for image in to_pil(batch)]
    rows, cols = grid_shape(args.num_images)
    make_image_grid(images, rows=rows, cols=cols).save(args.out)
    if args.save_individual:
        stem = os.path.splitext(args.out)[0]
        os.makedirs(stem, exist_ok=True)
        for i, image in enumerate(images):
            image.save(os.path.join(stem, f"{i:05d}.png"))
    print(f"wrote {args.out} ({args.num_images} images, {sampler.describe()}, seed {args.seed})")


def add_cli(subparsers) -> None:
    parser = subparsers.add_parser("sample", help="Generate a grid of images from a saved pipeline (folder or Hub id).")
    parser.add_argument("--model", required=True, type=local_path_or_hub_id, help="Training OUTPUT_DIR or Hub id (user/name).")
    parser.add_argument("--num_images", type=bounded(int, ge=1), default=16)
    parser.add_argument(
        "--steps", type=bounded(int, ge=1), default=None, help="Denoising steps K (default: T for ddpm; ddim and dpmsolver need it, e.g. 50 and 20)."
    )
    parser.add_argument(
        "--scheduler",
        default="ddpm",
        choices=SAMPLER_CHOICES,
        help="ddpm (the paper's ancestral sampler), ddim, dpmsolver (DPM-Solver++ 2M), or auto (ddpm with T steps, else ddim).",
    )
    parser.add_argument("--seed", type=bounded(int, ge=0), default=0)
    parser.add_argument("--batch_size", type=bounded(int, ge=1), default=None, help="Images per forward pass (default: all at once).")
    parser.add_argument("--out", type=output_file, default="samples.png", help="Where to write the grid (PNG).")
    parser.add_argument("--save_individual", action="store_true", help="Also write each image into a folder named after --out.")
    parser.add_argument("--device", type=device_type, default=None, help="cpu or cuda (default: cuda when available).")
    parser.add_argument("--revision", default=None, help="Hub revision (branch, tag or commit).")
    parser.add_argument(
        "--fast", action="store_true", help="Keep the whole chain on the device (ddpm_hf.fast_sampling): the same images as without it in fp32."
    )
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"], help="With --fast: run the UNet under bf16 autocast.")
    parser.add_argument(
        "--compile", default="auto", choices=["auto", "yes", "no"], help="With --fast: torch.compile the UNet ('auto': on CUDA); falls back with a warning."
    )
    parser.add_argument(
        "--cuda_graphs", default="auto", choices=["auto", "yes", "no"], help="With --fast: replay the UNet call as a CUDA graph ('auto': on CUDA)."
    )
    parser.set_defaults(func=run_sample)
