"""`ddpm-hf demo`: try a trained pipeline in the browser, and watch its reverse process run.

* `DemoModel(model, revision, device)`: the pipeline, loaded once (sampling.load_pipeline), its class names, and what
  its model card and eval.json say (`ModelFacts`).
* `DemoModel.generate(request)`: the images of one `Request`, through the one sampling engine
  (sampling.ReverseProcess, the loop `ddpm-hf sample` runs, so the same settings make the same images). While it
  runs it yields a `Frame` every few network evaluations (x_t and the predicted x_0 of every image), then the
  `Result`. A request out of range is a `UserError` before any work.
* `build_app(model)`: the Gradio page around it: the controls, the live reverse process with a progress bar of
  the steps, the images (upscaled with nearest-neighbour so that 32 x 32 pixels are big enough to see), the grid
  as a PNG to download, the time it took, and the facts beside them.
* `ddpm-hf demo`: loads the model (a folder that is not a pipeline is the one-line error, before any server
  starts) and serves the page on 127.0.0.1, one generation at a time per device: Gradio's queue shows the others
  their place in line.

Gradio is an extra (`pip install "ddpm-hf[demo]"`): only this module imports it. The Hub Space of a pushed model
(`ddpm-hf push --space`, ddpm_hf/space.py) runs the same kind of page without ddpm-hf.
"""

from __future__ import annotations

import math
import os
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .arguments import bounded, local_path_or_hub_id
from .arguments import device as device_type
from .errors import UserError

MAX_IMAGES = 16  # per request: the page stays responsive, and the queue moves
MAX_GUIDANCE_SCALE = 20.0
DEFAULT_STEPS = 50
LIVE_FRAMES = 25  # about this many x_t / x_0 pictures per generation, the last step always among them
DISPLAY_SIDE = 192  # each image is upscaled to at least this many screen pixels a side
PREVIEW_SIDE = 384  # the live pictures (a grid of every image) to at least this many
INSTALL_HINT = 'pip install "ddpm-hf[demo]"'


@dataclass
class Request:
    """What a visitor asks for; `DemoModel.check` turns the page's raw values into this, or a UserError."""

    sampler: str = "auto"
    steps: int = DEFAULT_STEPS
    seed: int = 0
    num_images: int = 4
    class_name: str | None = None  # class-conditional models only: a class name (or id, for a model without names)
    guidance_scale: float = 1.0


@dataclass
class Frame:
    """The reverse process at one network evaluation: every image's x_t and predicted x_0, as uint8 grids."""

    step: int  # 1 .. num_steps: network evaluations done
    num_steps: int
    t: float
    x_t: np.ndarray  # H x W x 3 grid of the images' x_t (the network's input, clipped to [-1, 1] for display)
    pred_x0: np.ndarray  # H x W x 3 grid of the x_0 the network predicts from it


@dataclass
class Result:
    images: torch.Tensor  # uint8 N x C x H x W, what `ddpm-hf sample` makes with the same settings
    grid: object  # PIL image: the grid `ddpm-hf sample --out` writes
    seconds: float
    description: str  # "ddim 50 steps, seed 0"
    command: str  # the `ddpm-hf sample` command that makes the same images


@dataclass
class ModelFacts:
    """What the page shows beside the images: the model's shape, its card's metadata, its eval.json."""

    model: str
    revision: str | None
    url: str | None  # the model's page on the Hub, for a Hub id
    shape: dict[str, str] = field(default_factory=dict)
    card: dict = field(default_factory=dict)  # the model card's metadata (YAML front matter)
    evaluation: dict = field(default_factory=dict)  # eval.json


class DemoModel:
    """A pipeline loaded once for the demo, on `device` (default: CUDA when there is one)."""

    def __init__(self, model: str, revision: str | None = None, device: str | None = None):
        from .conditioning import num_classes
        from .sampling import load_pipeline, model_class_names

        self.model, self.revision = model, revision
        pipeline = load_pipeline(model, device=device, revision=revision)
        self.unet, self.scheduler = pipeline.unet.eval(), pipeline.scheduler
        self.device = self.unet.device
        self.num_classes = num_classes(self.unet)
        self.class_names = model_class_names(model, revision) if self.num_classes is not None else None
        self.facts = model_facts(model, revision, self.unet, self.scheduler, self.num_classes)

    @property
    def num_train_timesteps(self) -> int:
        return self.scheduler.config.num_train_timesteps

    def class_choices(self) -> list[str]:
        """What the class dropdown offers: the class names, or the ids of a model without names."""
        if self.num_classes is None:
            return []
        return list(self.class_names) if self.class_names else [str(i) for i in range(self.num_classes)]

    def check(self, sampler: str, steps, seed, num_images, class_name=None, guidance_scale=None) -> Request:
        """A `Request` from the page's values (numbers may come as floats or text), or a UserError saying what to change."""
        from .conditioning import class_ids
        from .sampling import make_sampler

        steps, seed, num_images = _whole(steps, "Steps"), _whole(seed, "Seed"), _whole(num_images, "Number of images")
        if not 1 <= steps <= self.num_train_timesteps:
            raise UserError(f"Steps {steps}: give between 1 and the model's T = {self.num_train_timesteps}.")
        make_sampler(self.scheduler, sampler, steps)  # the sampler's own checks (a known name, a usable combination)
        if seed < 0:
            raise UserError(f"Seed {seed}: give a seed of 0 or more.")
        if not 1 <= num_images <= MAX_IMAGES:
            raise UserError(f"Number of images {num_images}: give between 1 and {MAX_IMAGES}.")
        if self.num_classes is None:
            return Request(sampler, steps, seed, num_images)
        if class_name in (None, ""):
            raise UserError(f"Choose a class: one of {', '.join(self.class_choices())}.")
        class_ids([class_name], self.num_classes, self.class_names, option="Class")  # an unknown class is refused here
        scale = 1.0 if guidance_scale in (None, "") else float(guidance_scale)
        if not 0 <= scale <= MAX_GUIDANCE_SCALE:
            raise UserError(f"Guidance scale {scale:g}: give a value between 0 and {MAX_GUIDANCE_SCALE:g} (1 is plain conditional sampling).")
        return Request(sampler, steps, seed, num_images, str(class_name), scale)

    def generate(self, request: Request) -> Iterator[Frame | Result]:
        """Run the reverse process of `request` over all its images in one batch, as `ddpm-hf sample` does."""
        from diffusers.utils import make_image_grid

        from .conditioning import class_ids
        from .sampling import ReverseProcess, grid_shape, make_sampler, to_pil

        started = time.perf_counter()
        sampler = make_sampler(self.scheduler, request.sampler, request.steps)
        labels = None
        if self.num_classes is not None:
            labels = class_ids([request.class_name], self.num_classes, self.class_names, option="Class") * request.num_images
        process = ReverseProcess(self.unet, sampler, request.seed, range(request.num_images), labels, request.guidance_scale)
        every = max(1, math.ceil(sampler.nfe / LIVE_FRAMES))
        for state in process:
            done = state.step + 1
            if done % every == 0 or done == state.num_steps:
                yield Frame(done, state.num_steps, state.t, _grid_picture(state.x_t), _grid_picture(state.pred_x0))
        images = process.images()
        grid = make_image_grid(to_pil(images), *grid_shape(request.num_images))
        yield Result(images, grid, time.perf_counter() - started, _describe(request, sampler), self.sample_command(request, sampler))

    def sample_command(self, request: Request, sampler) -> str:
        """The `ddpm-hf sample` command that makes the same images."""
        import shlex

        words = ["ddpm-hf", "sample", "--model", self.model]
        if self.revision:
            words += ["--revision", self.revision]
        words += ["--scheduler", sampler.name, "--steps", str(sampler.steps), "--seed", str(request.seed), "--num_images", str(request.num_images)]
        if request.class_name is not None:
            words += ["--class_labels", request.class_name, "--guidance_scale", f"{request.guidance_scale:g}"]
        return shlex.join(words)


def _whole(value, name: str) -> int:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise UserError(f"{name}: {value!r} is not a number.") from None
    if not math.isfinite(number) or number != int(number):
        raise UserError(f"{name}: {value!r} is not a whole number.")
    return int(number)


def _describe(request: Request, sampler) -> str:
    text = f"{sampler.describe()}, seed {request.seed}"
    if request.class_name is not None:
        text += f", class {request.class_name}, guidance scale {request.guidance_scale:g}"
    return text


def _grid_picture(x: torch.Tensor) -> np.ndarray:
    """Model-range images B x C x H x W -> one uint8 picture of them side by side, upscaled for the page."""
    from .sampling import grid_shape
    from .visualize import tile, to_display

    pictures = list(to_display(x))
    rows, columns = grid_shape(len(pictures))
    picture = tile([pictures[r * columns : (r + 1) * columns] for r in range(rows)])
    return upscale(picture, PREVIEW_SIDE)


def upscale(picture: np.ndarray, side: int) -> np.ndarray:
    """H x W (x C) uint8 -> the same pixels repeated (nearest-neighbour) by the whole factor that makes its longer
    side at least `side`: smoothing would blur a 32 x 32 sample into mush."""
    factor = max(1, math.ceil(side / max(picture.shape[:2])))
    return picture.repeat(factor, axis=0).repeat(factor, axis=1)


# ---- what the page shows beside the images ----------------------------------------------------------


def model_facts(model: str, revision: str | None, unet, scheduler, num_classes: int | None) -> ModelFacts:
    """The model's shape, its card's metadata and its eval.json: from the folder (the card it would be pushed
    with) or from the Hub repo (its README.md and eval.json, when there)."""
    from huggingface_hub import ModelCard, constants

    size = unet.config.sample_size
    channels = unet.config.in_channels
    shape = {
        "images": f"{size} x {size}, {'RGB' if channels == 3 else f'{channels} channels'}",
        "parameters": f"{sum(p.numel() for p in unet.parameters()):,}",
        "noise schedule": f"T = {scheduler.config.num_train_timesteps}, {scheduler.config.beta_schedule} betas, predicts {scheduler.config.prediction_type}",
    }
    if num_classes is not None:
        shape["classes"] = str(num_classes)
    if os.path.isdir(model):
        from .hub import build_model_card
        from .run_folder import RunFolder

        card = build_model_card(model, Path(model).resolve().name).data.to_dict()
        return ModelFacts(model, revision, None, shape, card, RunFolder(model).read_eval())
    card_path, eval_path = _hub_file(model, "README.md", revision), _hub_file(model, "eval.json", revision)
    card = ModelCard.load(card_path).data.to_dict() if card_path else {}
    evaluation = {}
    if eval_path:
        from .run_folder import read_json

        evaluation = read_json(eval_path) or {}
    return ModelFacts(model, revision, f"{constants.ENDPOINT}/{model}", shape, card, evaluation)


def _hub_file(repo_id: str, filename: str, revision: str | None) -> str | None:
    """A file of the model repo, downloaded (cached), or None when the repo has none."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    try:
        return hf_hub_download(repo_id, filename, revision=revision)
    except EntryNotFoundError:
        return None


def facts_markdown(facts: ModelFacts) -> str:
    """The facts as the page's side panel (Markdown)."""
    name = f"[{facts.model}]({facts.url})" if facts.url else f"`{facts.model}`"
    lines = [f"### {name}" + (f" @ `{facts.revision}`" if facts.revision else ""), ""]
    lines += [f"- {key}: {value}" for key, value in facts.shape.items()]
    card = facts.card
    if card:
        lines += ["", "**Model card**", ""]
        for key in ("license", "datasets", "base_model", "pipeline_tag", "tags"):
            value = card.get(key)
            if value:
                lines.append(f"- {key.replace('_', ' ')}: {', '.join(map(str, value)) if isinstance(value, list) else value}")
        for entry in card.get("model-index") or []:
            for result in entry.get("results", []):
                dataset = result.get("dataset", {})
                for metric in result.get("metrics", []):
                    where = " ".join(str(dataset[k]) for k in ("name", "split") if dataset.get(k))
                    lines.append(f"- {metric.get('name') or metric.get('type')}: {metric.get('value')}" + (f" ({where})" if where else ""))
    lines += _evaluation_lines(facts.evaluation)
    return "\n".join(lines)


def _evaluation_lines(evaluation: dict) -> list[str]:
    """eval.json's FID, KID and bits/dim, where measured."""
    lines = []
    if "fid" in evaluation:
        setup = f"{evaluation.get('num_samples', '?'):,} samples, {evaluation.get('scheduler', '?')} {evaluation.get('steps', '?')} steps"
        lines.append(f"- FID: {float(evaluation['fid']):.2f} ({setup}, against {evaluation.get('reference', '?')})")
    if "kid" in evaluation:
        lines.append(f"- KID: {float(evaluation['kid']):.4f} ± {float(evaluation.get('kid_std', 0)):.4f}")
    nll = evaluation.get("nll") or {}
    if "bits_per_dim" in nll:
        lines.append(
            f"- bits/dim: {float(nll['bits_per_dim']):.3f} ± {float(nll.get('bits_per_dim_stderr', 0)):.3f} "
            f"({nll.get('num_images', '?')} images of {nll.get('dataset', '?')} {nll.get('split', '')})".rstrip()
        )
    return ["", "**Evaluation** (eval.json)", "", *lines] if lines else []


# ---- the page -------------------------------------------------------------------------------------


def progress_html(done: int, total: int, t: float | None = None) -> str:
    at = f", t = {t:g}" if t is not None else ""
    return f'<div id="steps-done">Step {done} / {total}{at}</div><progress id="steps" value="{done}" max="{total}" style="width:100%"></progress>'


def build_app(model: DemoModel):
    """The Gradio Blocks of the demo of `model` (not launched)."""
    import gradio as gr

    from .sampling import SAMPLER_CHOICES, to_pil

    conditional = model.num_classes is not None
    output_folder = tempfile.mkdtemp(prefix="ddpm-hf-demo-")

    def run(sampler, steps, seed, num_images, class_name=None, guidance_scale=None):
        try:
            request = model.check(sampler, steps, seed, num_images, class_name, guidance_scale)
            for update in model.generate(request):
                if isinstance(update, Frame):
                    yield update.x_t, update.pred_x0, progress_html(update.step, update.num_steps, update.t), gr.skip(), gr.skip(), gr.skip()
        except UserError as error:
            raise gr.Error(" ".join(str(error).split()), print_exception=False) from None
        result = update
        path = os.path.join(tempfile.mkdtemp(dir=output_folder), f"ddpm-hf-seed{request.seed}-{result.description.split(',')[0].replace(' ', '-')}.png")
        result.grid.save(path)
        pictures = [upscale(np.asarray(picture.convert("RGB")), DISPLAY_SIDE) for picture in to_pil(result.images)]
        captions = [f"image {i}" + (f" ({request.class_name})" if conditional else "") for i in range(len(pictures))]
        summary = f"{len(pictures)} images in {result.seconds:.2f} s on {model.device}: {result.description}.\n\nThe same images from the command line: `{result.command}`"
        yield gr.skip(), gr.skip(), gr.skip(), list(zip(pictures, captions)), gr.update(value=path, visible=True), summary

    with gr.Blocks(title=f"ddpm-hf demo: {model.model}") as app:
        gr.Markdown(f"# {Path(model.model).name if os.path.isdir(model.model) else model.model}\n"
                    "Sample from a DDPM and watch the reverse process: x_t, the noisy image the network sees, and the x_0 it predicts from it.")  # fmt: skip
        with gr.Row():
            with gr.Column(scale=2):
                with gr.Row():
                    sampler = gr.Dropdown(list(SAMPLER_CHOICES), value="auto", label="Sampler", elem_id="sampler",
                                          info="auto: ddpm with all T steps, else ddim")  # fmt: skip
                    steps = gr.Number(DEFAULT_STEPS, precision=0, label="Steps", elem_id="steps-input", info=f"1 to T = {model.num_train_timesteps}")
                    seed = gr.Number(0, precision=0, label="Seed", elem_id="seed")
                    num_images = gr.Number(4, precision=0, label="Number of images", elem_id="num-images", info=f"1 to {MAX_IMAGES}")
                inputs = [sampler, steps, seed, num_images]
                if conditional:
                    with gr.Row():
                        choices = model.class_choices()
                        inputs.append(gr.Dropdown(choices, value=choices[0], label="Class", elem_id="class"))
                        inputs.append(gr.Number(1.0, label="Guidance scale", elem_id="guidance",
                                                info=f"s = 1 + w: 1 plain conditional, 0 unconditional, up to {MAX_GUIDANCE_SCALE:g}"))  # fmt: skip
                button = gr.Button("Generate", variant="primary", elem_id="generate")
                progress = gr.HTML(progress_html(0, 0), elem_id="progress")
                with gr.Row():
                    x_t = gr.Image(label="x_t: what the network sees", format="png", elem_id="live-x-t", interactive=False)
                    pred_x0 = gr.Image(label="predicted x_0", format="png", elem_id="live-x0", interactive=False)
                gallery = gr.Gallery(label="Samples", format="png", columns=4, elem_id="samples", object_fit="none", height="auto")
                download = gr.DownloadButton("Download the grid (PNG)", visible=False, elem_id="download")
                summary = gr.Markdown(elem_id="summary")
            with gr.Column(scale=1):
                gr.Markdown(facts_markdown(model.facts), elem_id="facts")
        button.click(run, inputs, [x_t, pred_x0, progress, gallery, download, summary], api_name="generate")
    # One generation at a time per device: the others wait in line, and Gradio shows them their place.
    app.queue(default_concurrency_limit=1, max_size=64)
    return app


# ---- ddpm-hf demo ---------------------------------------------------------------------------------


def check_gradio() -> None:
    import importlib.util

    if importlib.util.find_spec("gradio") is None:
        raise UserError(f"`ddpm-hf demo` needs Gradio, which is not installed: {INSTALL_HINT}.")


def run_demo(args) -> None:
    check_gradio()
    model = DemoModel(args.model, args.revision, args.device)
    app = build_app(model)
    _, local_url, share_url = app.launch(server_name="127.0.0.1", server_port=args.port, share=args.share, prevent_thread_lock=True, quiet=True)
    print(f"ddpm-hf demo of {args.model} on {local_url}" + (f" (shared at {share_url})" if share_url else "") + ": Ctrl-C stops it.", flush=True)
    try:
        app.block_thread()
    finally:
        app.close()


def add_cli(subparsers) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="Try a saved pipeline in the browser (Gradio): sample, and watch the reverse process live.",
        description=(
            f"Serve a Gradio page on 127.0.0.1 where a visitor picks the sampler, steps, seed and number of images (and the class and guidance "
            f"scale of a class-conditional model), watches x_t and the predicted x_0 while it samples, and downloads the grid. "
            f"The images are those of `ddpm-hf sample` with the same settings. Needs Gradio: {INSTALL_HINT}."
        ),
    )
    parser.add_argument("--model", required=True, type=local_path_or_hub_id, help="Training OUTPUT_DIR or Hub id (user/name).")
    parser.add_argument("--revision", default=None, help="Hub revision (branch, tag or commit).")
    parser.add_argument("--device", type=device_type, default=None, help="cpu or cuda (default: cuda when available).")
    parser.add_argument("--port", type=bounded(int, ge=1, le=65535), default=None, help="Port on 127.0.0.1 (default: 7860, or the next free one).")
    parser.add_argument("--share", action="store_true", help="Also make a public gradio.live link (Gradio's share tunnel) for 72 hours.")
    parser.set_defaults(func=run_demo)
