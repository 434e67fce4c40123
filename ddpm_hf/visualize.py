"""Pictures of the diffusion process: `ddpm-hf visualize forward|reverse`, and the figures training writes.

    forward   rows of real images x_0 noised to x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps (Eq. 4) at
              t = 0 .. T-1, with abar_t and SNR(t) = abar_t / (1 - abar_t) of the linear and cosine schedules
    reverse   the reverse chain of a saved pipeline for a few seeds: x_t, and the x_0 the network predicts
              from it, x0_hat = (x_t - sqrt(1 - abar_t) eps_theta(x_t, t)) / sqrt(abar_t), at chosen steps
    training  OUTPUT_DIR/loss.png (loss against step, raw and smoothed) and OUTPUT_DIR/progress.png (the
              fixed-seed sample grids over training), written by `write_training_figures(output_dir)`

Figures are built on `matplotlib.figure.Figure` with the Agg canvas: no display, no pyplot state, safe to call from
a training loop. Timesteps are 0-based as in diffusers (t = 0 .. T-1).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import numpy as np
import torch

from .arguments import bounded, local_path_or_hub_id, output_file
from .arguments import device as device_type
from .conditioning import balanced_labels, num_classes
from .errors import UserError
from .run_folder import LOSS_FIGURE, PROGRESS_FIGURE, RunFolder
from .sampling import add_sampler_arguments

FORWARD_TIMESTEPS = (0, 50, 100, 250, 500, 750, 999)
COMPARED_SCHEDULES = ("linear", "squaredcos_cap_v2")  # shown side by side in the forward figure
SCHEDULE_NAMES = {"linear": "linear", "squaredcos_cap_v2": "cosine", "scaled_linear": "scaled linear", "sigmoid": "sigmoid"}
DPI = 100
LOSS_FIGSIZE = (8.0, 4.5)  # inches: loss.png is 800 x 450 pixels
REVERSE_STEPS = 50  # `visualize reverse` with another sampler than ddpm and no --steps
MAX_PROGRESS_GRIDS = 8  # progress.png shows at most this many sample grids, evenly spread over training


# ---------------------------------------------------------------------------------------------
# Image helpers
# ---------------------------------------------------------------------------------------------


def to_display(x: torch.Tensor) -> np.ndarray:
    """Model-range images (..., 3, H, W) in [-1, 1] -> uint8 (..., H, W, 3), values outside clipped, as pipelines do."""
    x = ((x.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.movedim(-3, -1).numpy()


def tile(cells: list[list[np.ndarray | None]], pad: int = 2, background: int = 255) -> np.ndarray:
    """A rows x columns list of equal-sized uint8 H x W x 3 images (None: empty) -> one image, `pad` pixels between."""
    height, width = next(c for row in cells for c in row if c is not None).shape[:2]
    rows, cols = len(cells), max(len(row) for row in cells)
    canvas = np.full((rows * (height + pad) - pad, cols * (width + pad) - pad, 3), background, dtype=np.uint8)
    for i, row in enumerate(cells):
        for j, cell in enumerate(row):
            if cell is not None:
                canvas[i * (height + pad) : i * (height + pad) + height, j * (width + pad) : j * (width + pad) + width] = cell
    return canvas


def _montage_axes(axes, montage: np.ndarray, column_labels, row_labels, cell_size: tuple[int, int], pad: int) -> None:
    """Show a montage with one tick label per column and per row."""
    height, width = cell_size
    axes.imshow(montage, interpolation="nearest")
    axes.set_xticks([j * (width + pad) + (width - 1) / 2 for j in range(len(column_labels))], list(column_labels))
    axes.set_yticks([i * (height + pad) + (height - 1) / 2 for i in range(len(row_labels))], list(row_labels))
    axes.tick_params(length=0)
    for side in axes.spines.values():
        side.set_visible(False)


def _new_figure(width_in: float, height_in: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(width_in, height_in), dpi=DPI, layout="constrained")


def save_figure(figure, path: str) -> str:
    """Write `figure` as a PNG of exactly figsize x dpi pixels (no tight bounding box), creating the folder."""
    folder = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(folder, exist_ok=True)
        figure.savefig(path, dpi=DPI)
    except OSError as e:
        raise UserError(f"cannot write {path} ({e.strerror or e}). Choose a path in a folder you can write to.") from None
    return path


def images_figure(images_uint8: torch.Tensor, title: str, columns: int = 8):
    """A grid of uint8 N x 3 x H x W images, with a title (step 1 of the tutorial: the data)."""
    images = images_uint8.movedim(1, -1).numpy()
    columns = min(columns, len(images))
    rows = math.ceil(len(images) / columns)
    cells = [[images[i * columns + j] if i * columns + j < len(images) else None for j in range(columns)] for i in range(rows)]
    figure = _new_figure(1.0 + 0.9 * columns, 0.9 + 0.9 * rows)
    axes = figure.subplots()
    _montage_axes(axes, tile(cells), [str(j) for j in range(columns)], [str(i * columns) for i in range(rows)], images.shape[1:3], 2)
    axes.set(title=title, xlabel="column", ylabel="first index in row")
    return figure


# ---------------------------------------------------------------------------------------------
# Forward process
# ---------------------------------------------------------------------------------------------


def noised_images(x_0: torch.Tensor, alphas_cumprod: torch.Tensor, timesteps, seed: int = 0) -> torch.Tensor:
    """x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps for each t in `timesteps`: N x K x 3 x H x W.

    One eps per image, the same at every t, so a row shows one path of noise growing over the image."""
    from .losses import q_sample

    eps = torch.randn(x_0.shape, generator=torch.Generator().manual_seed(seed))
    rows = [q_sample(x_0, torch.full((x_0.shape[0],), int(t)), eps, alphas_cumprod) for t in timesteps]
    return torch.stack(rows, dim=1)


def forward_figure(images_uint8: torch.Tensor, scheduler, timesteps=FORWARD_TIMESTEPS, seed: int = 0, compare=COMPARED_SCHEDULES):
    """Top: each image x_0 (a row) noised to x_t at `timesteps` under `scheduler`'s schedule.
    Bottom: abar_t and SNR(t) = abar_t / (1 - abar_t) against t, for the linear and cosine schedules side by side
    (and the configured one, if it is another), the shown timesteps marked."""
    from diffusers import DDPMScheduler

    from .data import to_model_range

    num_train_timesteps = scheduler.config.num_train_timesteps
    check_timesteps(timesteps, num_train_timesteps, "--timesteps")
    configured = scheduler.config.beta_schedule
    x_t = noised_images(to_model_range(images_uint8), scheduler.alphas_cumprod, timesteps, seed)
    pixels = to_display(x_t)
    cells = [list(row) for row in pixels]
    height, width = pixels.shape[2:4]

    columns, rows = len(timesteps), len(cells)
    figure = _new_figure(max(8.0, 1.2 + 1.0 * columns), 0.9 + 1.0 * rows + 3.2)
    top, bottom = figure.subfigures(2, 1, height_ratios=[0.9 + 1.0 * rows, 3.2])
    axes = top.subplots()
    _montage_axes(axes, tile(cells), [f"t={t}" for t in timesteps], [f"x_0 #{i}" for i in range(rows)], (height, width), 2)
    schedule_name = SCHEDULE_NAMES.get(configured, configured)
    axes.set(
        title=rf"Forward process $x_t = \sqrt{{\bar\alpha_t}}\,x_0 + \sqrt{{1-\bar\alpha_t}}\,\epsilon$ ({schedule_name} schedule, T = {num_train_timesteps})",
        xlabel="timestep t",
        ylabel="image",
    )

    abar_axes, snr_axes = bottom.subplots(1, 2)
    names = list(compare) + ([configured] if configured not in compare else [])
    steps = np.arange(num_train_timesteps)
    for i, name in enumerate(names):
        config = dict(scheduler.config, beta_schedule=name)
        abar = DDPMScheduler.from_config(config).alphas_cumprod.double().numpy()
        label = SCHEDULE_NAMES.get(name, name) + (" (configured)" if name == configured else "")
        style = dict(color=f"C{i}", lw=2.2 if name == configured else 1.4)
        abar_axes.plot(steps, abar, label=label, **style)
        snr_axes.semilogy(steps, abar / (1.0 - abar), label=label, **style)
    for axes_ in (abar_axes, snr_axes):
        for t in timesteps:
            axes_.axvline(t, color="0.8", lw=0.8, zorder=0)
        axes_.legend(fontsize=8)
    abar_axes.set(title=r"Signal kept: $\bar\alpha_t = \prod_{s \leq t} (1 - \beta_s)$", xlabel="timestep t", ylabel=r"$\bar\alpha_t$")
    snr_axes.set(title=r"Signal-to-noise ratio $\bar\alpha_t / (1 - \bar\alpha_t)$", xlabel="timestep t", ylabel="SNR (log scale)")
    snr_axes.axhline(1.0, color="0.5", lw=0.8)
    return figure


def check_timesteps(timesteps, num_train_timesteps: int, option: str) -> None:
    if len(timesteps) == 0:
        raise UserError(f"{option} is empty. Give timesteps like 0,100,500,999.")
    bad = [t for t in timesteps if not 0 <= t < num_train_timesteps]
    if bad:
        raise UserError(f"{option} {','.join(map(str, bad))}: timesteps run from 0 to {num_train_timesteps - 1} (T = {num_train_timesteps}).")


# ---------------------------------------------------------------------------------------------
# Reverse process
# ---------------------------------------------------------------------------------------------


@dataclass
class ReverseChain:
    seeds: list[int]
    timesteps: list[float]  # the shown steps t, as the sampler visited them, from T-1 down (fractional for Karras sigmas)
    x_t: torch.Tensor  # S x K x C x H x W: what the network saw at step t (the DDPM scale, whatever the sampler)
    pred_x0: torch.Tensor  # S x K x C x H x W: the x_0 predicted there (ddpm_hf.sampling.ReverseStep.pred_x0)
    final: torch.Tensor  # S x C x H x W: the output, x_0 after the last step
    sampler: str  # what ran, e.g. "ddim 50 steps"
    labels: list[str] | None = None  # the class of each seed's image (class-conditional models)


def nearest_visited(wanted, visited: list[float]) -> list[float]:
    """For each wanted timestep, the closest one the sampler visits; duplicates dropped, order of `visited` kept."""
    chosen = {min(visited, key=lambda v: (abs(v - t), v)) for t in wanted}
    return [v for v in dict.fromkeys(visited) if v in chosen]


def reverse_chain(unet, sampler, seeds, timesteps=FORWARD_TIMESTEPS, class_labels=None, guidance_scale: float = 1.0, class_names=None) -> ReverseChain:
    """The reverse process of `sampler` (`ddpm_hf.sampling.make_sampler`) for each seed, run by the one sampling
    engine (`ddpm_hf.sampling.ReverseProcess`), with x_t and the predicted x_0 recorded at `timesteps`.

    Seed s is image 0 of seed s: exactly the image `ddpm-hf sample --seed s --num_images 1` makes with the same
    sampler (and, for a class-conditional model, `--class_labels C --guidance_scale G`; `class_labels` holds one
    class id per seed, default class i mod K for the i-th seed)."""
    from .sampling import ReverseProcess

    seeds = [int(s) for s in seeds]
    if not seeds:
        raise UserError("--seeds is empty. Give one or more seeds like 0,1,2.")
    total = sampler.scheduler.config.num_train_timesteps
    check_timesteps(timesteps, total, "--timesteps")
    classes = num_classes(unet)
    if classes is not None and class_labels is None:
        class_labels = balanced_labels(classes, len(seeds))
    was_training = unet.training
    unet.eval()
    recorded_x, recorded_x0, finals, shown = [], [], [], None
    try:
        for i, seed in enumerate(seeds):
            process = ReverseProcess(unet, sampler, seed, range(1), None if class_labels is None else [class_labels[i]], guidance_scale)
            seen, row_x, row_x0 = set(), [], []
            for step in process:
                if shown is None:  # the sampler's visited timesteps, known once its timesteps are set
                    shown = nearest_visited(timesteps, [float(t) for t in sampler.scheduler.timesteps])
                if step.t in shown and step.t not in seen:  # Heun visits a t twice: its first visit is shown
                    seen.add(step.t)
                    row_x.append(step.x_t[0].float().cpu())
                    row_x0.append(step.pred_x0[0].float().cpu())
            recorded_x.append(torch.stack(row_x))
            recorded_x0.append(torch.stack(row_x0))
            finals.append(process.x_0[0].float().cpu())
    finally:
        unet.train(was_training)
    names = None
    if class_labels is not None:
        names = [class_names[c] if class_names else f"class {c}" for c in class_labels]
    return ReverseChain(
        seeds=seeds,
        timesteps=shown,
        x_t=torch.stack(recorded_x),
        pred_x0=torch.stack(recorded_x0),
        final=torch.stack(finals),
        sampler=sampler.describe(),
        labels=names,
    )


def timestep_label(t: float) -> str:
    return f"t={t:g}" if t == int(t) else f"t={t:.1f}"


def reverse_figure(chain: ReverseChain):
    """Two rows per seed: x_t entering each shown step (then the output), and the network's x0_hat at that step."""
    x_t, pred_x0, final = to_display(chain.x_t), to_display(chain.pred_x0), to_display(chain.final)
    cells, row_labels = [], []
    for i, seed in enumerate(chain.seeds):
        cells.append(list(x_t[i]) + [final[i]])
        cells.append(list(pred_x0[i]) + [None])
        name = f"seed {seed}" + (f" ({chain.labels[i]})" if chain.labels else "")
        row_labels += [f"{name}: $x_t$", rf"{name}: $\hat x_0$"]
    height, width = x_t.shape[2:4]
    columns = len(chain.timesteps) + 1
    figure = _new_figure(max(7.0, 2.0 + 1.0 * columns), 1.0 + 0.95 * len(cells))
    axes = figure.subplots()
    _montage_axes(axes, tile(cells), [timestep_label(t) for t in chain.timesteps] + ["output"], row_labels, (height, width), 2)
    axes.set(
        title=f"Reverse process: $x_t$ and predicted $\\hat x_0$ ({chain.sampler})",
        xlabel="timestep t (sampling runs left to right, from noise to image)",
        ylabel="seed",
    )
    return figure


# ---------------------------------------------------------------------------------------------
# Figures written during training
# ---------------------------------------------------------------------------------------------


def smooth(values: np.ndarray, span: int) -> np.ndarray:
    """Exponential moving average with alpha = 2 / (span + 1), debiased at the start (as Adam debiases its moments)."""
    alpha = 2.0 / (max(1, span) + 1.0)
    out, average, weight = np.empty(len(values)), 0.0, 0.0
    for i, v in enumerate(values):
        average = (1 - alpha) * average + alpha * v
        weight = (1 - alpha) * weight + alpha
        out[i] = average / weight
    return out


def loss_figure(steps: np.ndarray, losses: np.ndarray, title: str = "Training loss"):
    """Raw and smoothed loss against step; log-scale y when the loss spans more than a factor of 3."""
    figure = _new_figure(*LOSS_FIGSIZE)
    axes = figure.subplots()
    finite = np.isfinite(losses)
    marker = "o" if len(steps) < 30 else None  # a handful of points would otherwise be an invisible line
    axes.plot(steps, losses, color="C0", alpha=0.35, lw=1, marker=marker, label="logged (mean over each interval)")
    if finite.sum() >= 5:
        span = max(3, int(finite.sum()) // 10)
        axes.plot(steps[finite], smooth(losses[finite], span), color="C0", lw=2, label=f"smoothed (EMA over ~{span} points)")
        positive = losses[finite & (losses > 0)]
        if len(positive) and positive.max() / positive.min() > 3:
            axes.set_yscale("log")
    axes.set(title=title, xlabel="optimizer step", ylabel=r"loss $\|\epsilon - \epsilon_\theta(x_t, t)\|^2$")
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    return figure


def spread(items: list, count: int) -> list:
    """At most `count` items, evenly spaced, always keeping the first and the last."""
    if len(items) <= count:
        return list(items)
    return [items[i] for i in sorted({round(k * (len(items) - 1) / (count - 1)) for k in range(count)})]


def progress_figure(grids: list[tuple[int, str]], max_grids: int = MAX_PROGRESS_GRIDS):
    """The fixed-seed sample grids side by side, labelled by step (at most `max_grids`, evenly spread)."""
    from PIL import Image

    chosen = spread(grids, max_grids)
    pictures = [np.asarray(Image.open(path).convert("RGB")) for _, path in chosen]
    height, width = max(p.shape[0] for p in pictures), max(p.shape[1] for p in pictures)
    cells = [[np.pad(p, ((0, height - p.shape[0]), (0, width - p.shape[1]), (0, 0)), constant_values=255) for p in pictures]]
    pad = max(2, width // 32)
    montage = tile(cells, pad=pad)
    # About one inch per 128 pixels of grid, at least 1.6 inches per grid so the labels fit.
    cell_in = max(1.6, min(4.0, width / 128))
    figure = _new_figure(1.0 + cell_in * len(chosen), 1.1 + cell_in * height / width)
    axes = figure.subplots()
    _montage_axes(axes, montage, [f"step {s:,}" for s, _ in chosen], [""], (height, width), pad)
    shown = f"{len(chosen)} of {len(grids)} grids" if len(chosen) < len(grids) else f"{len(grids)} grids"
    axes.set(title=f"Fixed-seed samples over training ({shown})", xlabel="training step", ylabel="same seeds")
    return figure


def write_training_figures(output_dir: str) -> None:
    """Write OUTPUT_DIR/loss.png from loss_history.jsonl and OUTPUT_DIR/progress.png from samples/step_*.png.

    Called by the training loop after each sample grid; cheap (well under a second after matplotlib's first import).
    A figure whose inputs do not exist yet is skipped, so it is safe to call at any time. A figure that cannot be
    written (disk full, a damaged grid) is a warning, not the end of a training run."""
    import warnings

    folder = RunFolder(output_dir)
    history = folder.loss_history()
    grids = folder.sample_grids()
    figures = []
    if history:
        steps, losses = np.array([s for s, _ in history], dtype=np.int64), np.array([loss for _, loss in history], dtype=np.float64)
        run_name = os.path.basename(os.path.abspath(output_dir))
        figures.append((LOSS_FIGURE, loss_figure, (steps, losses), {"title": f"Training loss ({run_name})"}))
    if grids:
        figures.append((PROGRESS_FIGURE, progress_figure, (grids,), {}))
    for name, draw, arguments, options in figures:
        try:
            save_figure(draw(*arguments, **options), folder.file(name))
        except (OSError, UserError) as e:
            warnings.warn(f"could not write {folder.file(name)} ({e}); training goes on without it.")


# ---------------------------------------------------------------------------------------------
# Timestep embedding (what the network sees of t)
# ---------------------------------------------------------------------------------------------


@torch.no_grad()
def timestep_embedding_figure(unet, num_train_timesteps: int = 1000):
    """The sinusoidal embedding of t that the UNet adds to every residual block: one row per t."""
    embedding = unet.time_proj(torch.arange(num_train_timesteps)).float().numpy()
    figure = _new_figure(8.0, 4.0)
    axes = figure.subplots()
    image = axes.imshow(embedding, aspect="auto", cmap="RdBu_r", vmin=-1, vmax=1, interpolation="nearest")
    axes.set(title=f"How the network sees t: sinusoidal embedding ({embedding.shape[1]} channels)", xlabel="embedding channel", ylabel="timestep t")
    figure.colorbar(image, ax=axes, label="value")
    return figure


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------


def parse_int_list(text: str, option: str) -> list[int]:
    try:
        values = [int(v) for v in text.replace(" ", "").split(",") if v != ""]
    except ValueError:
        raise UserError(f"{option} {text!r}: give whole numbers separated by commas, like 0,50,999.") from None
    if not values:
        raise UserError(f"{option} is empty: give whole numbers separated by commas, like 0,50,999.")
    return values


def run_forward(args) -> None:
    from diffusers import DDPMScheduler

    from .data import decode_images, load_image_dataset

    if args.num_images <= 0:
        raise UserError(f"--num_images must be positive, got {args.num_images}.")
    if args.num_train_timesteps < 2:
        raise UserError(f"--num_train_timesteps must be at least 2, got {args.num_train_timesteps}.")
    if not 0.0 < args.beta_start < args.beta_end < 1.0:
        raise UserError(f"need 0 < --beta_start < --beta_end < 1, got {args.beta_start} and {args.beta_end}.")
    # Only the forward process is drawn: the noise schedule is all it needs.
    scheduler = DDPMScheduler(
        num_train_timesteps=args.num_train_timesteps, beta_schedule=args.beta_schedule, beta_start=args.beta_start, beta_end=args.beta_end
    )
    last = args.num_train_timesteps - 1
    timesteps = parse_int_list(args.timesteps, "--timesteps") if args.timesteps else [t for t in FORWARD_TIMESTEPS if t < last] + [last]
    check_timesteps(timesteps, args.num_train_timesteps, "--timesteps")
    dataset = load_image_dataset(args.dataset, args.split, args.dataset_config)
    if args.first_image < 0 or args.first_image >= len(dataset):
        raise UserError(f"--first_image {args.first_image}: the split has {len(dataset)} images (0 to {len(dataset) - 1}).")
    dataset = dataset.select(range(args.first_image, min(len(dataset), args.first_image + args.num_images)))
    images = decode_images(dataset, args.resolution, args.image_column, progress=False).images
    save_figure(forward_figure(images, scheduler, timesteps, args.seed), args.out)
    print(f"wrote {args.out} ({len(images)} images of {args.dataset} at t = {','.join(map(str, timesteps))}, {args.beta_schedule} schedule)")


def run_reverse(args) -> None:
    from .conditioning import check_guidance, class_ids
    from .sampling import load_pipeline, model_class_names, sampler_from_arguments

    seeds = parse_int_list(args.seeds, "--seeds")
    pipeline = load_pipeline(args.model, device=args.device, revision=args.revision)
    total = pipeline.scheduler.config.num_train_timesteps
    steps = args.steps if args.steps is not None or args.scheduler in ("ddpm", "auto") else REVERSE_STEPS
    sampler = sampler_from_arguments(pipeline.scheduler, args, steps)
    guidance_scale = check_guidance(pipeline.unet, args.guidance_scale, args.class_labels)
    labels, names, classes = None, None, num_classes(pipeline.unet)
    if classes is not None:
        names = model_class_names(args.model, args.revision)
        if args.class_labels:
            labels = class_ids(args.class_labels.split(","), classes, names)
            if len(labels) not in (1, len(seeds)):
                raise UserError(f"--class_labels gives {len(labels)} classes for {len(seeds)} seeds: give one class for all seeds, or one per seed.")
            labels = labels * len(seeds) if len(labels) == 1 else labels
    timesteps = parse_int_list(args.timesteps, "--timesteps") if args.timesteps else sorted({min(t, total - 1) for t in FORWARD_TIMESTEPS}, reverse=True)
    chain = reverse_chain(pipeline.unet, sampler, seeds, timesteps, labels, guidance_scale, names)
    save_figure(reverse_figure(chain), args.out)
    shown = ",".join(timestep_label(t)[2:] for t in chain.timesteps)
    print(f"wrote {args.out} (seeds {','.join(map(str, seeds))}, {sampler.describe()}, shown at t = {shown})")


def add_cli(subparsers) -> None:
    parser = subparsers.add_parser("visualize", help="Pictures of the forward (noising) and reverse (sampling) processes.")
    commands = parser.add_subparsers(dest="figure", metavar="FIGURE", required=True)

    forward = commands.add_parser("forward", help="Real images noised at t = 0 .. T-1, and abar_t and SNR(t) of the linear and cosine schedules.")
    forward.add_argument(
        "--dataset",
        default="builtin:cifar10-1k",
        type=local_path_or_hub_id,
        help="Like train_ddpm.py --dataset (default: the CIFAR-10 subset shipped with the package).",
    )
    forward.add_argument("--dataset_config", default=None, help="Configuration name of a Hub dataset, if it has several.")
    forward.add_argument("--split", default="train")
    forward.add_argument("--image_column", default=None)
    forward.add_argument("--num_images", type=bounded(int, ge=1), default=4, help="Rows: images taken in order from --first_image.")
    forward.add_argument("--first_image", type=bounded(int, ge=0), default=0, help="Index of the first image shown.")
    forward.add_argument("--resolution", type=bounded(int, ge=1), default=32)
    forward.add_argument("--beta_schedule", default="linear", choices=["linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid"])
    forward.add_argument("--beta_start", type=bounded(float, gt=0, lt=1), default=1e-4)
    forward.add_argument("--beta_end", type=bounded(float, gt=0, lt=1), default=0.02)
    forward.add_argument("--num_train_timesteps", type=bounded(int, ge=2), default=1000, help="T.")
    forward.add_argument("--timesteps", default=None, help="Columns, comma-separated (default: 0,50,100,250,500,750,999).")
    forward.add_argument("--seed", type=bounded(int, ge=0), default=0, help="Seed of the noise eps (one per image, the same at every t).")
    forward.add_argument("--out", type=output_file, default="forward.png", help="Where to write the figure (PNG).")
    forward.set_defaults(func=run_forward)

    reverse = commands.add_parser("reverse", help="The reverse chain of a saved pipeline: x_t and the predicted x_0 at chosen steps.")
    reverse.add_argument("--model", required=True, type=local_path_or_hub_id, help="Training OUTPUT_DIR or Hub id (user/name).")
    reverse.add_argument(
        "--seeds",
        default="0,1,2",
        help="One pair of rows per seed, comma-separated; seed s gives the image `ddpm-hf sample --seed s --num_images 1` gives "
        "with the same --scheduler and --steps (and --class_labels, --guidance_scale).",
    )
    add_sampler_arguments(reverse, steps_help=f"Denoising steps (default: T for ddpm, {REVERSE_STEPS} for the other samplers).")
    reverse.add_argument(
        "--timesteps",
        default=None,
        help="Steps shown, comma-separated; each is moved to the nearest step the sampler visits (default: 999,750,500,250,100,50,0).",
    )
    reverse.add_argument(
        "--class_labels",
        default=None,
        help="Class-conditional models: the class of every seed's image, or one class per seed, comma-separated names or ids "
        "(default: class i mod K for the i-th seed).",
    )
    reverse.add_argument(
        "--guidance_scale", type=bounded(float, ge=0), default=None, help="Class-conditional models: classifier-free guidance scale (default 1), as `sample`."
    )
    reverse.add_argument("--out", type=output_file, default="reverse.png", help="Where to write the figure (PNG).")
    reverse.add_argument("--device", type=device_type, default=None, help="cpu or cuda (default: cuda when available).")
    reverse.add_argument("--revision", default=None, help="Hub revision (branch, tag or commit).")
    reverse.set_defaults(func=run_reverse)
