"""`ddpm-hf demo`: try a trained pipeline in the browser, and watch its reverse process run.

* `DemoModel(model, revision, device)`: the pipeline, loaded once (sampling.load_pipeline), its class names, and what
  its model card and eval.json say (the page's side panel).
* `DemoModel.generate(request)`: the images of one request through the one sampling engine (sampling.ReverseProcess,
  the loop `ddpm-hf sample` runs, so the same model, sampler, steps and seed make the same images). While it runs it
  yields a `Frame` every few network evaluations (x_t and the predicted x_0 of every image), then the `Result`.
* The page is that of the model's Hub Space, ddpm_hf/space_app/app.py (`build_page`): the controls, the live reverse
  process with a progress bar of the steps, the samples upscaled with nearest-neighbour (32 x 32 pixels become big
  enough to see), the grid as a PNG to download, the time it took, and the facts beside them. Out-of-range input
  (a step count the sampler does not take, sampling.accepted_steps, as on the Space) is a message on the page; the
  server goes on.
* `ddpm-hf demo`: loads the model (a folder that is not a pipeline is the one-line error, before any server starts)
  and serves the page on 127.0.0.1, one generation at a time: Gradio's queue shows the others their place in line.

Gradio is an extra (`pip install "ddpm-hf[demo]"`): only the page (space_app/app.py) imports it, when it is built.
"""

from __future__ import annotations

import importlib.util
import os
import time
from collections.abc import Iterator
from pathlib import Path

from .arguments import bounded, local_path_or_hub_id
from .arguments import device as device_type
from .errors import UserError
from .space_app import app as page

INSTALL_HINT = 'pip install "ddpm-hf[demo]"'
DEFAULT_SAMPLER, DEFAULT_STEPS = "auto", 50  # make_sampler's auto (sampling.AUTO_RULE): unipc with 50 steps, ddpm for a model with T <= 50


class DemoModel:
    """A pipeline loaded once for the demo, on `device` (default: CUDA when there is one)."""

    def __init__(self, model: str, revision: str | None = None, device: str | None = None):
        from .conditioning import num_classes
        from .sampling import load_pipeline, model_class_names

        self.model, self.revision = model, revision
        pipeline = load_pipeline(model, device=device, revision=revision)
        self.unet, self.scheduler = pipeline.unet.eval(), pipeline.scheduler
        self.num_classes = num_classes(self.unet)
        self.class_names = model_class_names(model, revision) if self.num_classes is not None else None

    def page_settings(self) -> page.PageSettings:
        from .sampling import AUTO_RULE, SAMPLER_CHOICES, accepted_steps

        # The step counts make_sampler takes, as the Space has them in space.json: the page refuses the others.
        accepted = {name: accepted_steps(self.scheduler, name) for name in SAMPLER_CHOICES}
        accepted = {name: steps for name, steps in accepted.items() if steps}
        local = os.path.isdir(self.model)
        return page.PageSettings(
            title=Path(self.model).resolve().name if local else self.model,
            model=self.model,
            revision=self.revision,
            samplers=list(accepted),
            default_sampler=DEFAULT_SAMPLER,
            num_train_timesteps=self.scheduler.config.num_train_timesteps,
            default_steps=min(DEFAULT_STEPS, self.scheduler.config.num_train_timesteps),
            classes=page.class_choices(self.num_classes, self.class_names),
            facts=self.facts(),
            device=str(self.unet.device),
            sampler_help=f"auto: {AUTO_RULE}",
            accepted_steps=accepted,
        )

    def facts(self) -> str:
        """The side panel: the model's shape, the metadata of its card (the card a push would write, for a folder)
        and its eval.json."""
        from huggingface_hub import ModelCard, constants

        from .run_folder import RunFolder, read_json

        shape = page.model_shape(self.unet, self.scheduler, self.num_classes)
        if os.path.isdir(self.model):
            from .model_card import build_model_card

            name = Path(self.model).resolve().name
            card = build_model_card(self.model, name).data.to_dict()
            return page.facts_markdown(name, None, shape, card, RunFolder(self.model).read_eval())
        card_path, eval_path = page.hub_file(self.model, "README.md", self.revision), page.hub_file(self.model, "eval.json", self.revision)
        card = ModelCard.load(card_path).data.to_dict() if card_path else {}
        evaluation = (read_json(eval_path) or {}) if eval_path else {}
        return page.facts_markdown(self.model, f"{constants.ENDPOINT}/{self.model}", shape, card, evaluation)

    def generate(self, request: page.Request) -> Iterator[page.Frame | page.Result]:
        """Run the reverse process of `request` over all its images in one batch, as `ddpm-hf sample` does."""
        from .conditioning import class_ids
        from .sampling import ReverseProcess, make_sampler

        started = time.perf_counter()
        sampler = make_sampler(self.scheduler, request.sampler, request.steps)
        labels = None
        if self.num_classes is not None:
            labels = class_ids([request.class_name], self.num_classes, self.class_names, option="Class") * request.num_images
        process = ReverseProcess(self.unet, sampler, request.seed, range(request.num_images), labels, request.guidance_scale)
        every = page.live_every(sampler.nfe)
        for state in process:
            done = state.step + 1
            if done % every == 0 or done == state.num_steps:
                yield page.Frame(done, state.num_steps, state.t, page.live_picture(state.x_t), page.live_picture(state.pred_x0))
        yield page.Result(process.images(), time.perf_counter() - started, sampler.describe())


def build_app(model: DemoModel):
    """The Gradio Blocks of the demo of `model`, queued, not launched."""
    return page.build_page(model.page_settings(), model.generate, input_errors=(UserError,))


# ---- ddpm-hf demo ---------------------------------------------------------------------------------


def run_demo(args) -> None:
    if importlib.util.find_spec("gradio") is None:
        raise UserError(f"`ddpm-hf demo` needs Gradio, which is not installed: {INSTALL_HINT}.")
    model = DemoModel(args.model, args.revision, args.device)  # a bad --model is the one-line error, before any server
    app = build_app(model)
    try:
        _, local_url, share_url = app.launch(server_name="127.0.0.1", server_port=args.port, share=args.share, prevent_thread_lock=True, quiet=True)
    except OSError as error:  # Gradio's answer to a port in use
        where = f"--port {args.port}" if args.port else "the ports from 7860 on"
        raise UserError(f"{where}: cannot serve there ({str(error).split('.')[0]}). Choose a free port with --port.") from None
    print(f"ddpm-hf demo of {args.model} on {local_url}" + (f", shared at {share_url}" if share_url else "") + " (Ctrl-C stops it)", flush=True)
    try:
        app.block_thread()
    finally:
        app.close()


def add_cli(subparsers) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="Try a saved pipeline in the browser (Gradio): sample, and watch the reverse process live.",
        description=(
            "Serve a Gradio page on 127.0.0.1 where a visitor picks the sampler, steps, seed and number of images (and the class and "
            "guidance scale of a class-conditional model), watches x_t and the predicted x_0 while it samples, and downloads the grid: "
            f"the images of `ddpm-hf sample` with the same settings. Needs Gradio: {INSTALL_HINT}."
        ),
    )
    parser.add_argument("--model", required=True, type=local_path_or_hub_id, help="Training OUTPUT_DIR or Hub id (user/name).")
    parser.add_argument("--revision", default=None, help="Hub revision (branch, tag or commit).")
    parser.add_argument("--device", type=device_type, default=None, help="cpu or cuda (default: cuda when available).")
    parser.add_argument("--port", type=bounded(int, ge=1, le=65535), default=None, help="Port on 127.0.0.1 (default: 7860, or the next free one).")
    parser.add_argument("--share", action="store_true", help="Also open a public gradio.live link to the page (Gradio's share tunnel).")
    parser.set_defaults(func=run_demo)
