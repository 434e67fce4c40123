"""The Hub Space of a pushed model: what `ddpm-hf push OUTPUT_DIR --space USER/NAME` uploads beside the model.

A Gradio Space of four files, which hub.HubPusher pushes with the model (the same token, checks and retries):

    app.py            ddpm_hf/space_app/app.py as it is: runs without ddpm-hf (diffusers, torch, gradio)
    space.json        what app.py reads: the model repo and revision, the custom pipeline in the model repo that
                      loads it, and the samplers `sampling.make_sampler` offers, each a diffusers scheduler class
                      and config, so that the Space makes the images of `ddpm-hf sample`, and the step counts it
                      takes as inclusive intervals ("steps": [[3, 500], [665, 1000]], from sampling.accepted_steps:
                      the Space refuses the others, as make_sampler does)
    requirements.txt  diffusers and torch with ddpm-hf's own lower bounds (gradio comes with the Space's SDK)
    README.md         the Spaces configuration as front matter (sdk gradio, sdk_version, app_file, models: [the
                      model repo], title, emoji, colours, short_description, license), which also makes the Hub
                      list the Space on the model's page; its text links the model (templates/space_readme.md.jinja)

The model card links back to the Space (model_card.build_model_card's `space_id`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from .conditioning import CONDITIONAL_PIPELINE_NAME
from .repo_contents import CUSTOM_PIPELINE_NAME, is_conditional_folder

APP_FILE = Path(__file__).parent / "space_app" / "app.py"
TEMPLATE = Path(__file__).parent / "templates" / "space_readme.md.jinja"
SETTINGS_FILE = "space.json"  # = app.SETTINGS_FILE
SPACE_FILES = ("README.md", "app.py", "requirements.txt", SETTINGS_FILE)
# The Space's SDK when gradio is not installed here: the demo extra's lower bound (setup.cfg).
MIN_GRADIO_VERSION = "6.0"
SHORT_DESCRIPTION = "A DDPM: sample it and watch its reverse process"  # the Hub allows 60 characters
EMOJI, COLOR_FROM, COLOR_TO = "🌀", "indigo", "pink"


def is_space_file(repo_path: str) -> bool:
    """A file that the Space push manages: one it uploads, or deletes when this push does not have it."""
    return repo_path in SPACE_FILES


def space_files(output_dir: str | os.PathLike, model_repo_id: str, revision: str = "main", license: str | None = None) -> dict[str, bytes]:
    """Repo path -> content of the Space that shows the model in `output_dir`, pushed as `model_repo_id` at `revision`."""
    from huggingface_hub import SpaceCard, SpaceCardData, constants

    conditional = is_conditional_folder(output_dir)
    pipeline = CONDITIONAL_PIPELINE_NAME if conditional else CUSTOM_PIPELINE_NAME
    settings = {"model": model_repo_id, "revision": revision, "pipeline": pipeline, **sampler_settings(output_dir)}
    title = model_repo_id.split("/")[-1]
    card_data = SpaceCardData(
        title=title,
        sdk="gradio",
        sdk_version=gradio_version(),
        app_file="app.py",
        models=[model_repo_id],
        license=license,
        emoji=EMOJI,
        colorFrom=COLOR_FROM,
        colorTo=COLOR_TO,
        short_description=SHORT_DESCRIPTION,
        pinned=False,
    )
    card = SpaceCard.from_template(
        card_data,
        template_path=str(TEMPLATE),
        title=title,
        model=model_repo_id,
        model_url=f"{constants.ENDPOINT}/{model_repo_id}",
        pipeline=pipeline,
        conditional=conditional,
    )
    return {
        "README.md": str(card).encode(),
        "app.py": APP_FILE.read_bytes(),
        "requirements.txt": "".join(f"{line}\n" for line in space_requirements()).encode(),
        SETTINGS_FILE: (json.dumps(settings, indent=2, ensure_ascii=False) + "\n").encode(),
    }


def sampler_settings(output_dir: str | os.PathLike) -> dict:
    """The samplers of `make_sampler` for this model (those it can make), as diffusers scheduler classes and configs
    with the step counts they take (`sampling.accepted_steps`, inclusive intervals), and the default: what "auto"
    chooses for 50 steps."""
    from diffusers import DDPMScheduler

    from .sampling import SAMPLERS, accepted_steps, make_sampler, resolve_sampler

    trained = DDPMScheduler.from_pretrained(output_dir, subfolder="scheduler")
    T = trained.config.num_train_timesteps
    samplers = {}
    for name in SAMPLERS:
        steps = accepted_steps(trained, name)
        if not steps:  # a sampler refused at every K is one this model cannot use: the Space does not offer it
            continue
        # The scheduler's config does not depend on the steps: take it at one make_sampler accepts.
        scheduler = make_sampler(trained, name, steps[0][0]).scheduler
        config = json.loads(scheduler.to_json_string())
        samplers[name] = {"class": type(scheduler).__name__, "config": config, "steps": [list(interval) for interval in steps]}
    default_sampler, default_steps = resolve_sampler("auto", min(50, T), T)
    return {"samplers": samplers, "default_sampler": default_sampler, "default_steps": default_steps}


def gradio_version() -> str:
    """The Space's Gradio: the one installed here (that ran `ddpm-hf demo` and the tests), else the demo extra's bound."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("gradio")
    except PackageNotFoundError:
        return MIN_GRADIO_VERSION


def space_requirements() -> list[str]:
    """diffusers and torch, with the lower bounds ddpm-hf itself declares (the installed package's metadata)."""
    import re
    from importlib.metadata import PackageNotFoundError, requires

    try:
        declared = requires("ddpm-hf") or []
    except PackageNotFoundError:  # a checkout that is not installed
        declared = []
    wanted = {"diffusers", "torch"}
    found = [line.replace(" ", "") for line in declared if ";" not in line and re.match(r"[A-Za-z0-9._-]+", line).group(0) in wanted]
    return sorted(found) if len(found) == len(wanted) else sorted(wanted)
