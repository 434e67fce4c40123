"""The model card (README.md) of a pushed run: the facts of its run folder, rendered from one Jinja template.

`build_model_card` reads the pipeline folder (unet/config.json, scheduler/scheduler_config.json, model_index.json)
and the run's training_config.json and eval.json, without the machine's paths (repo_contents.public_*), into
`CardFacts`, and renders templates/model_card.md.jinja with huggingface_hub's `ModelCard.from_template`. The template
holds the prose: the three kinds of model (plain, learned variance, class-conditional) are blocks of it. This module
holds the facts and the Hub metadata (`ModelCardData`):

- one `EvalResult` per measured metric: FID and KID name the reference dataset and split they were measured against
  (eval.json's `reference_details`), bits/dim (`ddpm-hf evaluate --metric nll`) the dataset and split of the bound;
  the sampler, steps and number of samples (or images) are in each result's name and arguments;
- `base_model` (relation `finetune`) for a run that started from a Hub model (`--init_from user/name`);
- the tags the Hub's filters find: `unconditional-image-generation` as the pipeline tag of an unconditional model;
  a class-conditional one has no Hub task, so it is found by its tags (`class-conditional`, `image-generation`).

A Space that shows the model (`space_id`) gets a link near the top of the card. The Hub itself lists the Space on the
model's page from the Space's own metadata (`models:` in its README), which is where that link is declared.
"""

from __future__ import annotations

import json
import math
import os
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from .conditioning import (
    CONDITIONAL_PIPELINE_CLASS,
    CONDITIONAL_PIPELINE_FILENAME,
    CONDITIONAL_PIPELINE_NAME,
    MODEL_INDEX,
    class_names_of,
    is_conditional_index,
)
from .models import count_parameters
from .repo_contents import CUSTOM_PIPELINE_CLASS, CUSTOM_PIPELINE_FILENAME, CUSTOM_PIPELINE_NAME, LOCAL_PREFIX, hub_id, public_eval, public_training_config
from .run_folder import RunFolder, read_json

# Shipped in the package (setup.cfg package_data), rendered by `ModelCard.from_template` (which needs jinja2).
TEMPLATE = Path(__file__).parent / "templates" / "model_card.md.jinja"

DEFAULT_LICENSE = "apache-2.0"

# The hub datasets that our built-in datasets are subsets of, for the card's `datasets` metadata.
BUILTIN_DATASET_SOURCES = {"builtin:cifar10-1k": "uoft-cs/cifar10"}

# The Hub has a task (pipeline tag) for unconditional generation only. A class-conditional model gets a free task type
# in its results, which keeps them off the unconditional leaderboard, and tags for the Hub's tag filter instead.
UNCONDITIONAL_TASK = ("unconditional-image-generation", "Unconditional Image Generation")
CONDITIONAL_TASK = ("class-conditional-image-generation", "Class-conditional Image Generation")
CONDITIONAL_TAGS = ["class-conditional", "classifier-free-guidance", "image-generation"]


@dataclass
class Samples:
    """The latest sample grid: its training step, its path in the repo and, for a class-conditional model, the
    classes of its rows ('0 (cat), 1 (dog)')."""

    step: int
    path: str
    row_classes: str | None = None


@dataclass
class CardFacts:
    """What the card says of one pipeline folder, as the template reads it (`card.*`)."""

    name: str  # the repo's name: the card's title
    repo_id: str
    load: str  # the arguments of `from_pretrained` that load the repo at its revision
    cli_revision: str  # " --revision dev" for `ddpm-hf sample`, or ""
    conditional: bool
    learned_variance: bool
    channels: int  # image channels; a learned-variance UNet outputs twice as many
    prediction_type: str | None
    training_rows: list[tuple[str, str]]
    custom_pipeline: bool  # the repo holds ddpm_trajectory.py
    samples: Samples | None = None
    # Class-conditional models only.
    num_classes: int = 0
    class_names: list[str] | None = None  # as table cells (`_cell`): they come from the dataset
    label_dropout: Any = None
    example_labels: str = ""  # the Python list of classes the usage samples: '["cat", "dog"]'
    cli_class_labels: str = ""  # the same classes for `ddpm-hf sample --class_labels`
    # Evaluation (eval.json): Metric, Value, Samples, Sampler, Seed, Reference, Weights.
    evaluation_rows: list[tuple[str, ...]] = field(default_factory=list)
    fid_repeats: int = 1  # the FID is the mean of this many independent image sets (`ddpm-hf evaluate --repeats`)
    class_balanced: bool = False
    per_class_fid: list[tuple[str, str]] = field(default_factory=list)
    space_id: str | None = None


def build_model_card(
    output_dir: str | os.PathLike,
    repo_id: str,
    *,
    step: int | None = None,
    hardware: str | None = None,
    license: str = DEFAULT_LICENSE,
    custom_pipeline: bool = True,
    revision: str | None = None,
    run_dir: str | os.PathLike | None = None,
    space_id: str | None = None,
) -> ModelCard:
    """The model card (README.md) of the pipeline in `output_dir` as pushed to `repo_id` at `revision`.

    `step` is the training step of the weights (default: the step eval.json's FID was measured at, as in best/, else
    the configured `max_train_steps`); `hardware` is a free text such as "1 x NVIDIA A100". `run_dir` is where the run
    folder lives when `output_dir` is a snapshot of it. `custom_pipeline`: the repo holds ddpm_trajectory.py.
    `space_id` ("user/name"): a Space that shows the model, linked from the card.

    A class-conditional model (its model_index.json names ddpm_class_conditional.py) gets a card of its own: its
    classes, the grid's rows, usage through that pipeline with classifier-free guidance, and no stock
    `DDPMPipeline` or trajectory-pipeline usage, neither of which can run it.
    """
    run = _Run(Path(output_dir), Path(run_dir) if run_dir is not None else Path(output_dir))
    facts = _card_facts(run, repo_id, step=step, hardware=hardware, custom_pipeline=custom_pipeline, revision=revision, space_id=space_id)
    data = _card_data(run, facts.name, license)
    return ModelCard.from_template(
        data,
        template_path=str(TEMPLATE),
        card=facts,
        trajectory_pipeline={"name": CUSTOM_PIPELINE_NAME, "file": CUSTOM_PIPELINE_FILENAME, "cls": CUSTOM_PIPELINE_CLASS},
        conditional_pipeline={"name": CONDITIONAL_PIPELINE_NAME, "file": CONDITIONAL_PIPELINE_FILENAME, "cls": CONDITIONAL_PIPELINE_CLASS},
    )


# ---- the run folder, as the card sees it ----------------------------------------------------------


class _Run:
    """The files of a pipeline folder that the card reads, without the machine's paths (judged from `run_dir`)."""

    def __init__(self, folder: Path, run_dir: Path):
        self.folder = folder
        self.run_dir = run_dir
        files = RunFolder(folder)
        self.unet = read_json(folder / "unet" / "config.json") or {}
        self.scheduler = read_json(folder / "scheduler" / "scheduler_config.json") or {}
        self.index = read_json(folder / MODEL_INDEX)
        self.config = public_training_config(files.read_training_config() or {}, run_dir)
        self.evaluation = public_eval(files.read_eval(), run_dir)
        self.grids = files.sample_grids()
        self.conditional = is_conditional_index(self.index)
        self.class_names = class_names_of(self.index) if self.conditional else None

    @property
    def fid(self) -> dict[str, Any] | None:
        """eval.json's FID result (its top level), if an evaluation wrote one."""
        return self.evaluation if "fid" in self.evaluation else None

    @property
    def nll(self) -> dict[str, Any] | None:
        """eval.json's bits/dim bound (`ddpm-hf evaluate --metric nll`), if measured."""
        nll = self.evaluation.get("nll")
        return nll if isinstance(nll, dict) and isinstance(nll.get("bits_per_dim"), (int, float)) else None

    @property
    def learned_variance(self) -> bool:
        """Whether the scheduler reads a variance from the UNet's output (2 x C channels: mean part, then v)."""
        return self.scheduler.get("variance_type") in ("learned_range", "learned")

    @property
    def num_classes(self) -> int:
        """K classes: the UNet embeds K + 1 labels, the last the null label."""
        embeds = self.unet.get("num_class_embeds")
        return embeds - 1 if isinstance(embeds, int) and embeds > 1 else len(self.class_names or [])

    @property
    def image_size(self) -> int | None:
        """The side of the images the model was trained at: training_config.json's `resolution`, else the UNet's
        `sample_size` (a folder pushed without its config). The one source of every size the card states."""
        resolution = self.config.get("resolution")
        return resolution if isinstance(resolution, int) else self.unet.get("sample_size")

    @property
    def hub_datasets(self) -> list[str]:
        """The Hub dataset ids the training dataset refers to (none for a local folder or file)."""
        dataset = self.config.get("dataset")
        if dataset in BUILTIN_DATASET_SOURCES:
            return [BUILTIN_DATASET_SOURCES[dataset]]
        found = hub_id(dataset, self.run_dir)
        return [found] if found is not None else []

    @property
    def base_model(self) -> str | None:
        """The Hub model the run was fine-tuned from (`--init_from user/name`); None for a local one or none."""
        return hub_id(self.config.get("init_from"), self.run_dir)


# ---- the facts the template shows -----------------------------------------------------------------


def _card_facts(
    run: _Run, repo_id: str, *, step: int | None, hardware: str | None, custom_pipeline: bool, revision: str | None, space_id: str | None
) -> CardFacts:
    fid = run.fid
    if step is None and fid is not None and isinstance(fid.get("step"), int):
        step = fid["step"]  # best/: the weights are those the FID was measured on
    facts = CardFacts(
        name=repo_id.split("/")[-1],
        repo_id=repo_id,
        load=load_arguments(repo_id, revision),
        cli_revision=f" --revision {revision}" if revision and revision != "main" else "",
        conditional=run.conditional,
        learned_variance=run.learned_variance,
        channels=run.unet.get("in_channels", 3),
        prediction_type=run.scheduler.get("prediction_type"),
        training_rows=_training_rows(run, step, hardware),
        custom_pipeline=custom_pipeline,
        space_id=space_id,
    )
    if run.conditional:
        count, names = run.num_classes, run.class_names
        labels = [json.dumps(label, ensure_ascii=False) if isinstance(label, str) else str(label) for label in _example_labels(count, names)]
        facts.num_classes, facts.label_dropout = count, run.config.get("label_dropout")
        facts.class_names = [_cell(name) for name in names] if names else None
        facts.example_labels, facts.cli_class_labels = "[" + ", ".join(labels) + "]", _cli_class_labels(count, names)
    if run.grids:
        sample_step, sample = run.grids[-1]
        rows = ", ".join(_class_text(i, run.class_names) for i in range(run.num_classes)) if run.conditional else None
        facts.samples = Samples(sample_step, Path(sample).relative_to(run.folder).as_posix(), rows)
    if fid is not None:
        facts.evaluation_rows += _fid_rows(fid)
        facts.fid_repeats = _repeats(fid)
        facts.class_balanced = bool(fid.get("class_balanced"))
        per_class = fid.get("per_class_fid")
        if isinstance(per_class, dict):
            facts.per_class_fid = _per_class_fid_rows(per_class, run.class_names)
    if run.nll is not None:
        facts.evaluation_rows.append(_nll_row(run.nll, run.conditional))
    return facts


def _training_rows(run: _Run, step: int | None, hardware: str | None) -> list[tuple[str, str]]:
    """The rows of the card's Training table."""
    config, scheduler = run.config, run.scheduler
    steps_text = f"{step:,}" if step is not None else f"{config['max_train_steps']:,} (configured)" if "max_train_steps" in config else "unknown"
    rows = [
        ("Architecture", _architecture(run.unet, run.image_size) if run.unet else "`UNet2DModel`"),
        ("Parameters", f"{count_parameters(run.folder / 'unet'):,}"),
        (
            "Scheduler",
            f"`{scheduler.get('_class_name', 'DDPMScheduler')}`, T = {scheduler.get('num_train_timesteps')}, "
            f"{scheduler.get('beta_schedule')} betas {scheduler.get('beta_start')}..{scheduler.get('beta_end')}, "
            f"{_variance_text(scheduler)}, predicts {scheduler.get('prediction_type')}",
        ),
        ("Training steps", steps_text),
    ]
    if run.conditional:
        count = run.num_classes
        dropout = config.get("label_dropout")
        rows.append(
            ("Conditioning", f"{count} classes (`num_class_embeds` = {count + 1}, the last the null label), label dropout p_uncond = {_count(dropout)}")
        )
    if config:
        rows.append(("Objective", _objective(config, run.learned_variance)))
        if config.get("init_from"):
            rows.append(("Started from", _started_from(config["init_from"], run.base_model)))
        rows += [
            (
                "Dataset",
                _dataset_text(config.get("dataset"), run.hub_datasets) + (f" (split {config.get('split')}, {run.image_size}px)" if config.get("split") else ""),
            ),
            ("Batch size", f"{config.get('train_batch_size')} (global)"),
            (
                "Optimizer",
                (f"AdamW (weight decay {config['weight_decay']})" if config.get("weight_decay") else "Adam")
                + f", lr {config.get('learning_rate')}, {config.get('lr_scheduler')} schedule with {config.get('lr_warmup_steps')} warm-up steps",
            ),
            ("EMA", f"decay {config.get('ema_decay')}" if config.get("use_ema") else "off"),
            ("Mixed precision", str(config.get("mixed_precision") or "no")),  # unset: Accelerate's default, no
        ]
    if hardware:
        rows.append(("Hardware", hardware))
    return rows


def _architecture(unet: dict, size: int | None) -> str:
    """The UNet at the images it was trained on (`size`: `_Run.image_size`)."""
    channels = tuple(unet.get("block_out_channels", ()))
    attention = []
    resolution = size if isinstance(size, int) else None
    for block in unet.get("down_block_types", ()):
        if "Attn" in block and resolution is not None:
            attention.append(f"{resolution}x{resolution}")
        if resolution is not None:
            resolution //= 2
    text = (
        f"`UNet2DModel`, {size}x{size}x{unet.get('in_channels', 3)} images, channels {channels}, "
        f"{unet.get('layers_per_block')} residual block(s) per resolution"
    )
    sample_size = unet.get("sample_size")
    if sample_size is not None and sample_size != size:  # saved before training recorded the size it trained at
        text += f" (saved with `sample_size` {sample_size}: pipelines sample at {sample_size}x{sample_size})"
    text += f", self-attention at {', '.join(attention)}" if attention else ", no self-attention"
    if unet.get("dropout"):
        text += f", dropout {unet['dropout']}"
    return text


def _variance_text(scheduler: dict) -> str:
    variance = scheduler.get("variance_type")
    if variance == "learned_range":
        return "variance learned_range (the network's Sigma_theta, between beta-tilde_t and beta_t: Nichol & Dhariwal 2021, Eq. 15)"
    if variance == "learned":
        return "variance learned (the network outputs Sigma_theta itself)"
    return f"variance {variance}"


def _objective(config: dict, learned_variance: bool) -> str:
    """The training objective, from training_config.json (`loss`, `vlb_weight`; a run from before they existed trained L_simple)."""
    loss = config.get("loss", "auto")
    if loss == "auto":
        loss = "hybrid" if learned_variance else "simple"
    if loss == "hybrid":
        return f"L_hybrid = L_simple + lambda L_vlb with lambda = {config.get('vlb_weight')} (Nichol & Dhariwal 2021, Eq. 16)"
    if loss == "vlb":
        return "L_vlb, importance-sampled timesteps (Nichol & Dhariwal 2021, Eq. 17)"
    return "L_simple, the noise-prediction MSE (Ho et al. 2020, Eq. 14)"


def _started_from(init_from: str, base_model: str | None) -> str:
    """The model a fine-tuning run started from: a link to its Hub repo, or "a local model" (never the machine's path)."""
    if base_model is not None:
        return f"[`{base_model}`](https://huggingface.co/{base_model}): fine-tuned from its weights"
    if init_from.startswith(LOCAL_PREFIX):
        return f"a local model (`{_cell(init_from[len(LOCAL_PREFIX) :])}`, not on the Hub): fine-tuned from its weights"
    return "a local model (not on the Hub): fine-tuned from its weights"


def _dataset_text(dataset: Any, hub_datasets: list[str]) -> str:
    if isinstance(dataset, str) and dataset.startswith(LOCAL_PREFIX):
        return f"`{dataset[len(LOCAL_PREFIX) :]}` (a local dataset, not on the Hub)"
    if isinstance(dataset, str) and dataset in hub_datasets:
        return f"[`{dataset}`](https://huggingface.co/datasets/{dataset})"
    return f"`{dataset}`"


def load_arguments(repo_id: str, revision: str | None = None) -> str:
    """The arguments of `from_pretrained` that load `repo_id` at `revision`: '"user/name", revision="dev"'."""
    return f'"{repo_id}"' + (f', revision="{revision}"' if revision and revision != "main" else "")


# ---- class-conditional models ---------------------------------------------------------------------


def _cell(text: Any) -> str:
    """`text` for one cell of a markdown table: one line, its '|' escaped (class names come from the dataset)."""
    return " ".join(str(text).split()).replace("|", "\\|")


def _class_text(class_id: int, names: list[str] | None) -> str:
    """'0 (cat)', or '0' for a model without class names."""
    return f"{class_id} ({_cell(names[class_id])})" if names and class_id < len(names) else str(class_id)


def _example_labels(count: int, names: list[str] | None) -> list[int | str]:
    """The classes the card's usage samples: the model's first two names, or ids 0 and 1 when it has none."""
    return list(names[:2]) if names else list(range(min(2, count)))


def _cli_class_labels(count: int, names: list[str] | None) -> str:
    """`--class_labels` of the same classes for `ddpm-hf sample` (which splits at commas): a name it could not read
    back is given by id."""
    labels = [
        label if isinstance(label, str) and "," not in label and label == label.strip() and label else str(i)
        for i, label in enumerate(_example_labels(count, names))
    ]
    return shlex.quote(",".join(labels))


def _per_class_fid_rows(per_class: dict[str, Any], names: list[str] | None) -> list[tuple[str, str]]:
    """(class, FID) cells of eval.json's `per_class_fid` (keyed by class name or id), by class id; other keys last."""
    lookup = {name: i for i, name in enumerate(names or [])}
    keyed = []
    for key, value in per_class.items():
        class_id = lookup.get(str(key))
        if class_id is None and str(key).strip().isdigit():
            class_id = int(str(key).strip())
        fid = f"{float(value):.2f}" if isinstance(value, (int, float)) else "not recorded"
        text = _class_text(class_id, names) if class_id is not None else _cell(key)
        keyed.append(((class_id is None, class_id if class_id is not None else 0, str(key)), text, fid))
    return [(text, fid) for _, text, fid in sorted(keyed)]


# ---- evaluation -----------------------------------------------------------------------------------


def _count(value: Any) -> str:
    return f"{value:,}" if isinstance(value, int) else "not recorded" if value is None else str(value)


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def fid_setup(evaluation: dict[str, Any]) -> str:
    """How a FID of eval.json was measured, e.g. "ddpm 100 steps" (with the network evaluations when they differ,
    and the guidance scale of a class-conditional model's samples: "ddim 50 steps, guidance scale 1.5")."""
    sampler, steps, nfe = evaluation.get("scheduler"), evaluation.get("steps"), evaluation.get("nfe")
    if sampler is None and steps is None:
        text = "sampler not recorded"
    else:
        text = " ".join(part for part in (sampler, f"{steps} steps" if steps is not None else None) if part is not None)
        if nfe is not None and nfe != steps:
            text += f" ({nfe} network evaluations)"
    guidance = evaluation.get("guidance_scale")
    if guidance is not None:
        text += f", guidance scale {guidance:g}" if isinstance(guidance, (int, float)) else f", guidance scale {guidance}"
    return text


def _fid_reference(fid: dict[str, Any]) -> tuple[str, str | None]:
    """(dataset, split) that a FID (and KID) of eval.json was measured against: its `reference_details` (a Hub id,
    `local:NAME` or a built-in name, and the split), else the reference as given (a run from before they existed)."""
    details = fid.get("reference_details")
    if isinstance(details, dict) and details.get("dataset"):
        split = details.get("split")
        return str(details["dataset"]), str(split) if split is not None else None
    return str(fid.get("reference", "unknown")), None


def _reference_text(fid: dict[str, Any]) -> str:
    """The Reference cell: the reference as given (an alias such as cifar10-test, a file, a dataset), and the dataset
    and split it stands for when they say more."""
    given = fid.get("reference", "not recorded")
    dataset, split = _fid_reference(fid)
    said = f"{dataset}, split {split}" if split is not None else dataset
    return _cell(given if said == given else f"{given} ({said})")


def _repeats(fid: dict[str, Any]) -> int:
    """How many independent image sets a FID of eval.json is the mean of (`ddpm-hf evaluate --repeats`): 1 if one."""
    repeats = fid.get("repeats")
    return repeats if isinstance(repeats, int) and repeats > 1 and _finite(fid.get("fid_std")) and _finite(fid.get("fid_min")) else 1


def _samples_text(fid: dict[str, Any]) -> str:
    """'10,000', or for the mean of several image sets '3 sets of 10,000'."""
    repeats = _repeats(fid)
    return _count(fid.get("num_samples")) if repeats == 1 else f"{repeats} sets of {_count(fid.get('num_samples'))}"


def _fid_rows(fid: dict[str, Any]) -> list[tuple[str, ...]]:
    measured_at = f"step {fid['step']:,}" if isinstance(fid.get("step"), int) else "these weights"
    seeds = [s.get("seed") for s in fid.get("sets", [])] if _repeats(fid) > 1 else []
    seed = ", ".join(_count(s) for s in seeds) if seeds else _count(fid.get("seed"))
    shared = (_samples_text(fid), fid_setup(fid), seed, _reference_text(fid), measured_at)
    value = f"{float(fid['fid']):.2f}"
    if _repeats(fid) > 1:  # mean ± standard deviation over the sets, and the minimum (EDM's way)
        value += f" ± {fid['fid_std']:.2f} (min {fid['fid_min']:.2f})"
    rows = [("FID", value, *shared)]
    if _finite(fid.get("kid")):
        spread = f" ± {fid['kid_std']:.5f}" if _finite(fid.get("kid_std")) else ""
        rows.append(("KID", f"{fid['kid']:.5f}{spread}", *shared))
    return rows


def _nll_dataset(nll: dict[str, Any]) -> tuple[str, str | None]:
    """(dataset, split) of eval.json's bits/dim bound."""
    split = nll.get("split")
    return str(nll.get("dataset", "unknown")), str(split) if split is not None else None


def _nll_setup(nll: dict[str, Any], conditional: bool) -> str:
    """How the bound was computed: over every t, or with a stride (the KL sum then estimated)."""
    stride = nll.get("timestep_stride")
    text = "variational bound, " + ("all T terms" if nll.get("exact_sum_over_t", stride == 1) else f"KL sum estimated every {stride} timesteps")
    return text + (", null label (the unconditional model)" if conditional else "")


def _nll_row(nll: dict[str, Any], conditional: bool) -> tuple[str, ...]:
    dataset, split = _nll_dataset(nll)
    spread = f" ± {nll['bits_per_dim_stderr']:.4f}" if _finite(nll.get("bits_per_dim_stderr")) else ""
    images = f"{nll['num_images']:,} images" if isinstance(nll.get("num_images"), int) else "not recorded"
    reference = _cell(f"{dataset}, split {split}" if split is not None else dataset)
    return (
        "Bits/dim (NLL bound)",
        f"{nll['bits_per_dim']:.4f}{spread}",
        images,
        _nll_setup(nll, conditional),
        _count(nll.get("seed")),
        reference,
        "these weights",
    )


# ---- the Hub metadata -----------------------------------------------------------------------------


def _card_data(run: _Run, name: str, license: str) -> ModelCardData:
    """The card's YAML metadata: library, task or tags, training datasets, licence, base model, results."""
    base_model = run.base_model
    return ModelCardData(
        library_name="diffusers",
        # No Hub pipeline tag fits a class-conditional model (unconditional-image-generation would be wrong): none.
        pipeline_tag=None if run.conditional else UNCONDITIONAL_TASK[0],
        tags=["ddpm", "diffusers", "pytorch"] + (CONDITIONAL_TAGS if run.conditional else [UNCONDITIONAL_TASK[0]]),
        datasets=run.hub_datasets or None,
        license=license,
        base_model=base_model,
        base_model_relation="finetune" if base_model is not None else None,  # --init_from: every weight trained further
        model_name=name,
        eval_results=_eval_results(run) or None,
    )


def _eval_results(run: _Run) -> list[EvalResult]:
    """One `EvalResult` per metric in eval.json: FID, KID, bits/dim."""
    # (dataset, split, metric type, metric name, value, arguments) of each measured metric
    measured: list[tuple[str, str | None, str, str, float, dict[str, Any]]] = []
    fid = run.fid
    if fid is not None:
        dataset, split = _fid_reference(fid)
        keys = ("num_samples", "scheduler", "steps", "nfe", "timestep_spacing", "seed", "guidance_scale", "step")
        arguments = {key: fid[key] for key in keys if fid.get(key) is not None}
        setup = f"{_count(fid.get('num_samples'))} samples, {fid_setup(fid)}"
        if _repeats(fid) > 1:
            arguments.update(repeats=fid["repeats"], fid_std=fid["fid_std"], fid_min=fid["fid_min"])
            setup = f"mean of {_samples_text(fid)} samples, {fid_setup(fid)}"
        measured.append((dataset, split, "fid", f"FID ({setup})", float(fid["fid"]), arguments))
        if _finite(fid.get("kid")):
            spread = {"kid_std": fid["kid_std"]} if _finite(fid.get("kid_std")) else {}
            measured.append((dataset, split, "kid", f"KID ({setup})", float(fid["kid"]), dict(arguments, **spread)))
    nll = run.nll
    if nll is not None:
        dataset, split = _nll_dataset(nll)
        arguments = {key: nll[key] for key in ("num_images", "timestep_stride", "exact_sum_over_t", "seed") if nll.get(key) is not None}
        if _finite(nll.get("bits_per_dim_stderr")):
            arguments["stderr"] = nll["bits_per_dim_stderr"]
        images = f"{nll['num_images']:,} images" if isinstance(nll.get("num_images"), int) else "images not recorded"
        name = f"Bits/dim (NLL bound, {images}, {_nll_setup(nll, run.conditional)})"
        measured.append((dataset, split, "bits_per_dim", name, float(nll["bits_per_dim"]), arguments))
    task_type, task_name = CONDITIONAL_TASK if run.conditional else UNCONDITIONAL_TASK
    return [
        EvalResult(
            task_type=task_type,
            task_name=task_name,
            dataset_type=dataset,
            dataset_name=dataset,
            dataset_split=split,
            metric_type=metric,
            metric_name=name,
            metric_value=value,
            metric_args=arguments or None,
        )
        for dataset, split, metric, name, value, arguments in measured
    ]
