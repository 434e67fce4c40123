# Copyright 2026 The ddpm-hf authors. Licensed under the Apache License, Version 2.0.
"""Sample a DDPM in the browser and watch its reverse process: a Gradio page.

This one file is two things:

* the app of the Hugging Face Space that `ddpm-hf push OUTPUT_DIR --space USER/NAME` uploads for a model. There it
  runs without ddpm-hf: like the custom pipelines uploaded with the model, it needs only diffusers, torch and gradio
  (numpy and huggingface_hub come with them). It reads `space.json`, written by the push (the model repo and its
  revision, the pipeline to load it with, the samplers ddpm-hf offers, each a diffusers scheduler class and config
  and the step counts it takes, as inclusive intervals), loads the model from the Hub with the custom pipeline in
  the model repo, and samples with it: `HubModel`. The pipeline runs in a thread of its own and its
  `callback_on_step_end` hands every few steps' x_t and predicted x_0 to the page while it samples;
* the page of `ddpm-hf demo` (ddpm_hf/demo.py), which samples through ddpm-hf's own engine instead and shows the
  same live reverse process: `build_page`.

Either way image i of seed s starts from its own generator, seeded with `item_seed(s, i)` as `ddpm-hf sample` seeds
it (ddpm_hf/distributed.py), so the page shows the images `ddpm-hf sample` makes with the same model, sampler,
steps and seed. On a ZeroGPU Space (the `spaces` package importable) sampling runs under `@spaces.GPU`; elsewhere
on CUDA when there is one, else on the CPU.
"""

from __future__ import annotations

import json
import math
import queue
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

try:  # ZeroGPU: a GPU is attached only while a function decorated with spaces.GPU runs
    import spaces

    ZERO_GPU, on_gpu = True, spaces.GPU
except ImportError:
    ZERO_GPU = False

    def on_gpu(function):
        return function


SETTINGS_FILE = "space.json"
MAX_IMAGES = 16  # per request: the page stays responsive, and the queue moves
MAX_GUIDANCE_SCALE = 20.0
LIVE_FRAMES = 25  # about this many x_t / x_0 pictures per generation
DISPLAY_SIDE = 192  # each sample is upscaled to at least this many screen pixels a side
PREVIEW_SIDE = 384  # the live pictures (every image side by side) to at least this many
KEEP_FILES_S = 3600  # how long the grids offered for download, and Gradio's copies of what it sent, are kept


# ---- what a visitor asks for, and what they get ---------------------------------------------------------


@dataclass
class Request:
    sampler: str
    steps: int
    seed: int
    num_images: int
    class_name: str | None = None  # class-conditional models: a class name (or id, for a model without names)
    guidance_scale: float = 1.0


@dataclass
class Frame:
    """The reverse process at one network evaluation, as pictures of every image side by side."""

    step: int  # network evaluations done, 1 .. num_steps
    num_steps: int
    t: float
    x_t: np.ndarray  # uint8 H x W x 3: what the network saw
    pred_x0: np.ndarray  # uint8 H x W x 3: the x_0 it predicts from it


@dataclass
class Result:
    images: torch.Tensor  # uint8 N x C x H x W, quantised as a PNG is
    seconds: float
    sampler: str  # what sampled them: "ddim 50 steps"


@dataclass
class PageSettings:
    """What the page offers and shows, whoever samples."""

    title: str
    model: str  # the Hub id or folder, for the `ddpm-hf sample` command shown under the images
    revision: str | None
    samplers: Sequence[str]
    default_sampler: str
    num_train_timesteps: int  # T: the most steps
    default_steps: int = 50
    classes: Sequence[str] | None = None  # a class-conditional model's class names (or ids)
    facts: str = ""  # Markdown beside the images: what the model is
    device: str = "cpu"
    sampler_help: str | None = None
    # sampler -> the step counts it takes, inclusive intervals [[first, last], ...] in increasing order (default: 1 to T)
    accepted_steps: dict[str, Sequence[Sequence[int]]] | None = None

    def steps_taken(self, sampler: str) -> list[tuple[int, int]]:
        """The step counts `sampler` takes, as inclusive intervals."""
        return [(first, last) for first, last in (self.accepted_steps or {}).get(sampler, [(1, self.num_train_timesteps)])]

    def takes(self, sampler: str, steps: int) -> bool:
        return any(first <= steps <= last for first, last in self.steps_taken(sampler))

    def nearest_steps(self, sampler: str, steps: int) -> int:
        """The step count `sampler` takes that is closest to `steps` (the smaller one of two as close)."""
        return min((min(max(steps, first), last) for first, last in self.steps_taken(sampler)), key=lambda taken: (abs(taken - steps), taken))

    def steps_info(self) -> str:
        """The Steps field's help: the step counts the default sampler takes, and whether the others' differ."""
        taken = self.steps_taken(self.default_sampler)
        alike = all(self.steps_taken(name) == taken for name in self.samplers)
        return f"{describe_steps(taken)} (T = {self.num_train_timesteps})" + ("" if alike else f" with {self.default_sampler}: it depends on the sampler")


SHOWN_INTERVALS = 4  # a message names this many intervals of step counts at most: the first few, "...", the last


def describe_steps(intervals: Sequence[tuple[int, int]]) -> str:
    """Inclusive intervals of step counts in a few words: "3 to 500, 665 to 1000"; "1 to 12, 14, 16 to 20, ..., 936 to 1000"
    when there are more than SHOWN_INTERVALS."""
    words = [f"{first} to {last}" if last > first else str(first) for first, last in intervals]
    if len(words) > SHOWN_INTERVALS:
        words = [*words[: SHOWN_INTERVALS - 1], "...", words[-1]]
    return ", ".join(words)


class InputError(ValueError):
    """A request out of range: shown on the page as its message, and the server goes on."""


def one_line(error: BaseException) -> str:
    return " ".join(str(error).split())


def check_request(settings: PageSettings, sampler, steps, seed, num_images, class_name=None, guidance_scale=None) -> Request:
    """A `Request` from the page's values (numbers may come as floats or text), or an `InputError` saying what to change."""
    steps, seed, num_images = whole(steps, "Steps"), whole(seed, "Seed"), whole(num_images, "Number of images")
    if sampler not in settings.samplers:
        raise InputError(f"Sampler {sampler!r}: choose one of {', '.join(settings.samplers)}.")
    if not 1 <= steps <= settings.num_train_timesteps:
        raise InputError(f"Steps {steps}: give between 1 and the model's T = {settings.num_train_timesteps}.")
    if not settings.takes(sampler, steps):
        taken = describe_steps(settings.steps_taken(sampler))
        raise InputError(f"Steps {steps}: {sampler} takes {taken} steps with this model; choose one of those step counts, or another sampler.")
    if seed < 0:
        raise InputError(f"Seed {seed}: give a seed of 0 or more.")
    if not 1 <= num_images <= MAX_IMAGES:
        raise InputError(f"Number of images {num_images}: give between 1 and {MAX_IMAGES}.")
    if not settings.classes:
        return Request(sampler, steps, seed, num_images)
    if class_name not in settings.classes:
        raise InputError(f"Class {class_name!r}: choose one of {', '.join(settings.classes)}.")
    scale = whole_or_float(guidance_scale, "Guidance scale", default=1.0)
    if not 0 <= scale <= MAX_GUIDANCE_SCALE:
        raise InputError(f"Guidance scale {scale:g}: give a value between 0 and {MAX_GUIDANCE_SCALE:g} (1 is plain conditional sampling).")
    return Request(sampler, steps, seed, num_images, class_name, scale)


def whole(value, name: str) -> int:
    number = whole_or_float(value, name)
    if number != int(number):
        raise InputError(f"{name}: {value!r} is not a whole number.")
    return int(number)


def whole_or_float(value, name: str, default: float | None = None) -> float:
    if value in (None, "") and default is not None:
        return default
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise InputError(f"{name}: {value!r} is not a number.") from None
    if not math.isfinite(number):
        raise InputError(f"{name}: {value!r} is not a finite number.")
    return number


def sample_command(settings: PageSettings, request: Request) -> str:
    """The `ddpm-hf sample` command that makes the same images."""
    import shlex

    words = ["ddpm-hf", "sample", "--model", settings.model] + (["--revision", settings.revision] if settings.revision else [])
    words += ["--scheduler", request.sampler, "--steps", str(request.steps), "--seed", str(request.seed), "--num_images", str(request.num_images)]
    if request.class_name is not None:
        words += ["--class_labels", request.class_name, "--guidance_scale", f"{request.guidance_scale:g}"]
    return shlex.join(words)


# ---- pictures -------------------------------------------------------------------------------------------


def item_seed(seed: int, index: int) -> int:
    """The seed of image `index`'s own generator, a function of (seed, index) only: ddpm_hf.distributed.item_seed."""
    return int(np.random.SeedSequence([seed, index]).generate_state(1, dtype=np.uint64)[0]) >> 1


def item_generators(seed: int, num_images: int) -> list[torch.Generator]:
    return [torch.Generator("cpu").manual_seed(item_seed(seed, i)) for i in range(num_images)]


def grid_shape(num_images: int) -> tuple[int, int]:
    """(rows, columns) of a grid of `num_images`, as `ddpm-hf sample` lays out its grid (ddpm_hf.sampling.grid_shape)."""
    rows = int(math.sqrt(num_images))
    while num_images % rows:
        rows -= 1
    return rows, num_images // rows


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """Model-range images in [-1, 1] -> uint8 on the CPU, values outside clipped, rounded as a PNG is."""
    return ((x.detach().float() / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8).cpu()


def grid(images_uint8: torch.Tensor, one_class: bool = False):
    """uint8 N x C x H x W -> the PIL grid `ddpm-hf sample --out` writes: one row per class when the images are of
    one class (a class-conditional model's), else `grid_shape`."""
    from diffusers.utils import make_image_grid
    from PIL import Image

    pictures = [Image.fromarray(a.squeeze(-1) if a.shape[-1] == 1 else a) for a in images_uint8.permute(0, 2, 3, 1).numpy()]
    return make_image_grid(pictures, *((1, len(pictures)) if one_class else grid_shape(len(pictures))))


def upscale(picture: np.ndarray, side: int) -> np.ndarray:
    """H x W (x C) uint8 -> each pixel repeated (nearest-neighbour) by the whole factor that makes the longer side at
    least `side`: smoothing would blur a 32 x 32 sample into mush."""
    factor = max(1, math.ceil(side / max(picture.shape[:2])))
    return picture.repeat(factor, axis=0).repeat(factor, axis=1)


def live_picture(x: torch.Tensor) -> np.ndarray:
    """Model-range images B x C x H x W -> one picture of them side by side, big enough to see."""
    return upscale(np.asarray(grid(to_uint8(x)).convert("RGB")), PREVIEW_SIDE)


def live_every(num_steps: int) -> int:
    """Show one network evaluation in this many (and always the last)."""
    return max(1, math.ceil(num_steps / LIVE_FRAMES))


# ---- what the model is ----------------------------------------------------------------------------------


def facts_markdown(title: str, url: str | None, shape: dict[str, str], card: dict, evaluation: dict) -> str:
    """The side panel: the model's shape, its card's metadata (YAML front matter) and its eval.json's FID, KID, bits/dim."""
    lines = [f"### [{title}]({url})" if url else f"### {title}", ""]
    lines += [f"- {key}: {value}" for key, value in shape.items()]
    if card:
        lines += ["", "**Model card**", ""]
        for key in ("license", "datasets", "base_model", "pipeline_tag", "tags"):
            value = card.get(key)
            if value:
                lines.append(f"- {key.replace('_', ' ')}: {', '.join(map(str, value)) if isinstance(value, list) else value}")
        for entry in card.get("model-index") or []:
            for result in entry.get("results", []):
                dataset = result.get("dataset", {})
                where = " ".join(str(dataset[key]) for key in ("name", "split") if dataset.get(key))
                for metric in result.get("metrics", []):
                    lines.append(f"- {metric.get('name') or metric.get('type')}: {metric.get('value')}" + (f" ({where})" if where else ""))
    measured = []
    if "fid" in evaluation:
        setup = f"{evaluation.get('num_samples', '?')} samples, {evaluation.get('scheduler', '?')} {evaluation.get('steps', '?')} steps"
        measured.append(f"- FID: {float(evaluation['fid']):.2f} ({setup}, against {evaluation.get('reference', '?')})")
    if "kid" in evaluation:
        measured.append(f"- KID: {float(evaluation['kid']):.4f} ± {float(evaluation.get('kid_std', 0)):.4f}")
    nll = evaluation.get("nll") or {}
    if "bits_per_dim" in nll:
        stderr = f" ± {float(nll['bits_per_dim_stderr']):.3f}" if "bits_per_dim_stderr" in nll else ""
        measured.append(
            f"- bits/dim: {float(nll['bits_per_dim']):.3f}{stderr} ({nll.get('num_images', '?')} images of {nll.get('dataset', '?')} {nll.get('split', '')})".rstrip()
        )
    if measured:
        lines += ["", "**Evaluation** (eval.json)", "", *measured]
    return "\n".join(lines)


def class_choices(num_classes: int | None, class_names: Sequence[str] | None) -> list[str] | None:
    """The class dropdown's entries: the model's class names, else its ids; None for an unconditional model."""
    if num_classes is None:
        return None
    return list(class_names) if class_names else [str(i) for i in range(num_classes)]


def hub_file(repo_id: str, filename: str, revision: str | None) -> str | None:
    """A file of the model repo, downloaded (cached), or None when the repo has none."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    try:
        return hf_hub_download(repo_id, filename, revision=revision)
    except EntryNotFoundError:
        return None


def model_shape(unet, scheduler, num_classes: int | None) -> dict[str, str]:
    size, channels = unet.config.sample_size, unet.config.in_channels
    shape = {
        "images": f"{size} x {size}, {'RGB' if channels == 3 else f'{channels} channels'}",
        "parameters": f"{sum(p.numel() for p in unet.parameters()):,}",
        "noise schedule": f"T = {scheduler.config.num_train_timesteps}, {scheduler.config.beta_schedule} betas, predicts {scheduler.config.prediction_type}",
    }
    if num_classes is not None:
        shape["classes"] = str(num_classes)
    return shape


# ---- the page -------------------------------------------------------------------------------------------


def forget_old_files(folder: str, max_age_s: float = KEEP_FILES_S) -> None:
    """Remove the grids offered for download more than `max_age_s` ago: a Space runs for months."""
    import shutil

    for old in Path(folder).glob("*/*.png"):
        if time.time() - old.stat().st_mtime > max_age_s:
            shutil.rmtree(old.parent, ignore_errors=True)


def progress_html(done: int, total: int, t: float | None = None) -> str:
    at = f", t = {t:g}" if t is not None else ""
    return f'<div id="steps-done">Step {done} / {total}{at}</div><progress id="steps" value="{done}" max="{total}" style="width:100%"></progress>'


def build_page(settings: PageSettings, generate: Callable[[Request], Iterator[Frame | Result]], input_errors: tuple = ()):
    """The Gradio Blocks (queued, not launched): the controls, the live reverse process and a progress bar of its
    steps, the samples, the grid to download, the time it took, and `settings.facts` beside them.

    `generate(request)` yields a `Frame` now and then while it samples, then the `Result`. An `InputError`, or one of
    `input_errors` raised by `generate`, is shown on the page as its message."""
    import gradio as gr

    output_folder = tempfile.mkdtemp(prefix="ddpm-demo-")

    def run(sampler, steps, seed, num_images, class_name=None, guidance_scale=None):
        try:
            request = check_request(settings, sampler, steps, seed, num_images, class_name, guidance_scale)
            for update in generate(request):
                if isinstance(update, Result):
                    result = update
                else:
                    yield update.x_t, update.pred_x0, progress_html(update.step, update.num_steps, update.t), gr.skip(), gr.skip(), gr.skip()
        except (InputError, *input_errors) as error:
            raise gr.Error(one_line(error), print_exception=False) from None
        forget_old_files(output_folder)
        path = Path(tempfile.mkdtemp(dir=output_folder)) / f"samples-seed{request.seed}-{request.sampler}-{request.steps}.png"
        grid(result.images, one_class=request.class_name is not None).save(path)
        pictures = [upscale(image.permute(1, 2, 0).numpy(), DISPLAY_SIDE) for image in result.images]
        pictures = [picture.squeeze(-1) if picture.shape[-1] == 1 else picture for picture in pictures]
        captions = [f"image {i}" + (f" ({request.class_name})" if request.class_name is not None else "") for i in range(len(pictures))]
        made = f"{result.sampler}, seed {request.seed}"
        if request.class_name is not None:
            made += f", class {request.class_name}, guidance scale {request.guidance_scale:g}"
        summary = (
            f"{len(pictures)} images in {result.seconds:.2f} s on {settings.device}: {made}.\n\n"
            f"The same images from the command line: `{sample_command(settings, request)}`"
        )
        yield gr.skip(), gr.skip(), gr.skip(), list(zip(pictures, captions)), gr.update(value=str(path), visible=True), summary

    # Gradio keeps what it sent in a cache of its own: files older than an hour go, every hour.
    with gr.Blocks(title=settings.title, delete_cache=(KEEP_FILES_S, KEEP_FILES_S)) as page:
        watch = "watch its reverse process: x_t, the noisy images the network sees, and the x_0 it predicts from them, step by step"
        gr.Markdown(f"# {settings.title}\nSample from a DDPM and {watch}.")
        with gr.Row():
            with gr.Column(scale=2):
                with gr.Row():
                    sampler = gr.Dropdown(
                        list(settings.samplers), value=settings.default_sampler, label="Sampler", info=settings.sampler_help, elem_id="sampler"
                    )
                    default_steps = settings.nearest_steps(settings.default_sampler, settings.default_steps)  # one it takes
                    steps = gr.Number(default_steps, precision=0, label="Steps", info=settings.steps_info(), elem_id="steps-input")
                    seed = gr.Number(0, precision=0, label="Seed", info="image i depends only on (seed, i)", elem_id="seed")
                    num_images = gr.Number(4, precision=0, label="Number of images", info=f"1 to {MAX_IMAGES}", elem_id="num-images")
                inputs = [sampler, steps, seed, num_images]
                if settings.classes:
                    with gr.Row():
                        inputs.append(gr.Dropdown(list(settings.classes), value=settings.classes[0], label="Class", elem_id="class"))
                        guidance_help = f"s = 1 + w: 1 is plain conditional sampling, 0 unconditional; at most {MAX_GUIDANCE_SCALE:g}"
                        inputs.append(gr.Number(1.0, label="Guidance scale", info=guidance_help, elem_id="guidance"))
                button = gr.Button("Generate", variant="primary", elem_id="generate")
                progress = gr.HTML(progress_html(0, 0), elem_id="progress")
                with gr.Row():
                    x_t = gr.Image(label="x_t: what the network sees", format="png", interactive=False, elem_id="live-x-t")
                    pred_x0 = gr.Image(label="predicted x_0", format="png", interactive=False, elem_id="live-x0")
                gallery = gr.Gallery(label="Samples", format="png", columns=4, object_fit="none", height="auto", elem_id="samples")
                download = gr.DownloadButton("Download the grid (PNG)", visible=False, elem_id="download")
                summary = gr.Markdown(elem_id="summary")
            with gr.Column(scale=1):
                gr.Markdown(settings.facts, elem_id="facts")
        # One generation at a time (the page samples on one device): the others wait in line, and Gradio shows them
        # their place in it.
        button.click(run, inputs, [x_t, pred_x0, progress, gallery, download, summary], api_name="generate", concurrency_limit=1)
    page.queue(max_size=64)
    return page


# ---- the Space: the model from the Hub, sampled by the pipeline in its repo -----------------------------


def accepted_steps_in(samplers: dict, num_train_timesteps: int) -> dict[str, list[tuple[int, int]]]:
    """Sampler -> the step counts it takes, from space.json's samplers: their "steps" intervals; an older push's
    have the fewest and most steps ("min_steps", "max_steps"), or none: 1 to T, and the pipeline samples whatever
    it is given."""
    older = {"min_steps": 1, "max_steps": num_train_timesteps}
    return {
        name: [tuple(interval) for interval in chosen.get("steps", [[chosen.get(key, default) for key, default in older.items()]])]
        for name, chosen in samplers.items()
    }


class Stopped(Exception):
    """Raised in the pipeline's step callback to end a chain that no one waits for any more."""


class HubModel:
    """The model of `settings` (space.json) from the Hub, loaded once with the custom pipeline in its repo."""

    def __init__(self, settings: dict):
        from diffusers import DiffusionPipeline

        self.settings = settings
        self.model, self.revision = settings["model"], settings.get("revision")
        self.device = "cuda" if ZERO_GPU or torch.cuda.is_available() else "cpu"
        # trust_remote_code: the pipeline file comes from the model repo, at the revision of the weights.
        self.pipeline = DiffusionPipeline.from_pretrained(
            self.model, revision=self.revision, custom_pipeline=settings["pipeline"], trust_remote_code=True, use_safetensors=True
        ).to(self.device)
        self.pipeline.set_progress_bar_config(disable=True)  # the page shows the steps
        self.class_names = getattr(self.pipeline, "class_names", None)
        self.num_classes = getattr(self.pipeline, "num_classes", None)

    def page_settings(self) -> PageSettings:
        from huggingface_hub import ModelCard, constants

        card, evaluation = hub_file(self.model, "README.md", self.revision), hub_file(self.model, "eval.json", self.revision)
        card = ModelCard.load(card).data.to_dict() if card else {}
        evaluation = json.loads(Path(evaluation).read_text()) if evaluation else {}
        unet, scheduler = self.pipeline.unet, self.pipeline.scheduler
        samplers = list(self.settings["samplers"])
        T = scheduler.config.num_train_timesteps
        return PageSettings(
            title=self.model,
            model=self.model,
            revision=self.revision if self.revision not in (None, "main") else None,
            samplers=samplers,
            default_sampler=self.settings.get("default_sampler", samplers[0]),
            num_train_timesteps=T,
            default_steps=self.settings.get("default_steps", 50),
            classes=class_choices(self.num_classes, self.class_names),
            facts=facts_markdown(self.model, f"{constants.ENDPOINT}/{self.model}", model_shape(unet, scheduler, self.num_classes), card, evaluation),
            device=self.device,
            accepted_steps=accepted_steps_in(self.settings["samplers"], T),
        )

    def scheduler(self, name: str):
        """The scheduler `ddpm_hf.sampling.make_sampler` makes for `name`, from its class and config in space.json."""
        import diffusers

        chosen = self.settings["samplers"][name]
        return getattr(diffusers, chosen["class"]).from_config(chosen["config"])

    def generate(self, request: Request) -> Iterator[Frame | Result]:
        """Sample `request` with the pipeline, in a thread of its own: its `callback_on_step_end` puts a `Frame` on a
        queue every few steps, which this generator yields as they come, then the `Result`. If the visitor leaves
        (the generator is closed), the chain stops at its next step."""
        started = time.perf_counter()
        pipeline = self.pipeline
        pipeline.scheduler = self.scheduler(request.sampler)
        updates: queue.Queue = queue.Queue()
        stop = threading.Event()

        def on_step(pipe, index: int, t, tensors: dict) -> None:
            if stop.is_set():
                raise Stopped
            done, total = index + 1, len(pipe.scheduler.timesteps)
            if done % live_every(total) == 0 or done == total:
                # x_t as the network sees it: Karras-sigma schedulers (euler, heun) keep it scaled by sqrt(1 + sigma^2)
                x_t = pipe.scheduler.scale_model_input(tensors["x_t"], t)
                updates.put(Frame(done, total, float(t), live_picture(x_t), live_picture(tensors["pred_x0"])))

        def sample() -> None:
            try:
                options = dict(num_inference_steps=request.steps, generator=item_generators(request.seed, request.num_images), output_type="pt")
                options["callback_on_step_end"] = on_step
                if self.num_classes is not None:
                    labels = [self.class_id(request.class_name)] * request.num_images
                    images = pipeline(class_labels=labels, guidance_scale=request.guidance_scale, **options).images
                else:
                    images = pipeline(batch_size=request.num_images, **options).images
                uint8 = (images.float().clamp(0, 1) * 255).round().to(torch.uint8).cpu()  # the pipeline's output is x_0 / 2 + 0.5, clipped
                updates.put(Result(uint8, time.perf_counter() - started, f"{request.sampler} {request.steps} steps"))
            except BaseException as error:  # handed to the page's thread, which raises it
                updates.put(error)

        worker = threading.Thread(target=sample, name="sampling", daemon=True)
        worker.start()
        try:
            while True:
                update = updates.get()
                if isinstance(update, BaseException):
                    raise update
                yield update
                if isinstance(update, Result):
                    return
        finally:
            stop.set()
            worker.join()

    def class_id(self, class_name: str) -> int:
        return self.class_names.index(class_name) if self.class_names else int(class_name)


space_model: HubModel | None = None  # loaded once, by main()


@on_gpu
def generate_on_the_space(request: Request) -> Iterator[Frame | Result]:
    yield from space_model.generate(request)


def main() -> None:
    global space_model
    space_model = HubModel(json.loads((Path(__file__).parent / SETTINGS_FILE).read_text()))
    page = build_page(space_model.page_settings(), generate_on_the_space)
    page.launch()  # where: the Space's settings (or GRADIO_SERVER_NAME and GRADIO_SERVER_PORT) choose


if __name__ == "__main__":
    main()
