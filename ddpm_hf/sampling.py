"""`ddpm-hf sample`: a grid of images from a saved pipeline (a folder or a Hub id), with stock diffusers."""

from __future__ import annotations

import math
import os

import torch

from .errors import UserError

SCHEDULERS = ("ddpm", "ddim")


def load_pipeline(model: str, scheduler: str = "ddpm", device: str | None = None, revision: str | None = None):
    """A stock `DDPMPipeline` or `DDIMPipeline` (sharing the saved noise schedule) from a folder or Hub id."""
    from diffusers import DDIMPipeline, DDIMScheduler, DDPMPipeline

    if scheduler not in SCHEDULERS:
        raise UserError(f"--scheduler {scheduler}: unknown scheduler. Choose one of: {', '.join(SCHEDULERS)}.")
    if os.path.isdir(model) and not os.path.isfile(os.path.join(model, "model_index.json")):
        raise UserError(f"--model {model} is a folder but not a saved pipeline (no model_index.json). Point it at a training OUTPUT_DIR.")
    if not os.path.isdir(model) and (model.startswith((".", "/", "~")) or model.count("/") > 1):
        raise UserError(f"--model {model}: no such folder. Give a training OUTPUT_DIR or a Hub id like user/name.")
    try:
        pipeline = DDPMPipeline.from_pretrained(model, revision=revision, use_safetensors=True)
    except (OSError, ValueError) as e:
        raise UserError(f"--model {model}: could not load a pipeline ({str(e).splitlines()[0]}). Give a training OUTPUT_DIR or a Hub id.") from None
    if scheduler == "ddim":
        pipeline = DDIMPipeline(unet=pipeline.unet, scheduler=DDIMScheduler.from_config(pipeline.scheduler.config))
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return pipeline.to(device)


def generate(pipeline, num_images: int, steps: int, seed: int, batch_size: int | None = None):
    """PIL images, generated in batches; the same seed gives the same images."""
    batch_size = batch_size or num_images
    generator = torch.Generator("cpu").manual_seed(seed)
    images = []
    for start in range(0, num_images, batch_size):
        count = min(batch_size, num_images - start)
        images += pipeline(batch_size=count, generator=generator, num_inference_steps=steps).images
    return images


def grid_shape(num_images: int) -> tuple[int, int]:
    rows = int(math.sqrt(num_images))
    while num_images % rows:
        rows -= 1
    return rows, num_images // rows


def run_sample(args) -> None:
    from diffusers.utils import make_image_grid

    if args.num_images <= 0 or args.steps <= 0:
        raise UserError("--num_images and --steps must be positive.")
    pipeline = load_pipeline(args.model, args.scheduler, args.device, args.revision)
    total_steps = pipeline.scheduler.config.num_train_timesteps
    if args.steps > total_steps:
        raise UserError(f"--steps {args.steps} exceeds the model's {total_steps} training timesteps.")
    if args.fast:
        from .fast_sampling import fast_generate

        images = fast_generate(pipeline, args.num_images, args.steps, args.seed, args.batch_size, dtype=args.dtype, compile=args.compile, cuda_graphs=args.cuda_graphs)
    else:
        if args.dtype != "fp32":
            raise UserError("--dtype bf16 needs --fast.")
        images = generate(pipeline, args.num_images, args.steps, args.seed, args.batch_size)
    rows, cols = grid_shape(args.num_images)
    out_dir = os.path.dirname(os.path.abspath(args.out))
    os.makedirs(out_dir, exist_ok=True)
    make_image_grid(images, rows=rows, cols=cols).save(args.out)
    if args.save_individual:
        stem = os.path.splitext(args.out)[0]
        os.makedirs(stem, exist_ok=True)
        for i, image in enumerate(images):
            image.save(os.path.join(stem, f"{i:05d}.png"))
    print(f"wrote {args.out} ({args.num_images} images, {args.steps} {args.scheduler} steps, seed {args.seed})")


def add_cli(subparsers) -> None:
    parser = subparsers.add_parser("sample", help="Generate a grid of images from a saved pipeline (folder or Hub id).")
    parser.add_argument("--model", required=True, help="Training OUTPUT_DIR or Hub id (user/name).")
    parser.add_argument("--num_images", type=int, default=16)
    parser.add_argument("--steps", type=int, default=1000, help="Denoising steps (DDPM: up to T; DDIM: e.g. 50).")
    parser.add_argument("--scheduler", default="ddpm", help="ddpm (the paper's ancestral sampler) or ddim.")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch_size", type=int, default=None, help="Images per forward pass (default: all at once).")
    parser.add_argument("--out", default="samples.png", help="Where to write the grid (PNG).")
    parser.add_argument("--save_individual", action="store_true", help="Also write each image into a folder named after --out.")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available).")
    parser.add_argument("--revision", default=None, help="Hub revision (branch, tag or commit).")
    parser.add_argument("--fast", action="store_true", help="Keep the whole chain on the device (ddpm_hf.fast_sampling): the same images as without it in fp32.")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"], help="With --fast: run the UNet under bf16 autocast.")
    parser.add_argument("--compile", default="auto", choices=["auto", "yes", "no"], help="With --fast: torch.compile the UNet ('auto': on CUDA); falls back with a warning.")
    parser.add_argument("--cuda_graphs", default="auto", choices=["auto", "yes", "no"], help="With --fast: replay the UNet call as a CUDA graph ('auto': on CUDA).")
    parser.set_defaults(func=run_sample)
