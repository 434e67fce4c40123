"""Class-conditional models: class labels, classifier-free guidance, and the pipeline they are saved as.

Ho & Salimans (2022), "Classifier-Free Diffusion Guidance" (arXiv:2207.12598). A `UNet2DModel` with
`num_class_embeds = K + 1` learns K classes (ids 0 .. K-1) and, because each training label is replaced by the
null id K with probability p_uncond (`--label_dropout`), the unconditional model as well. Sampling mixes the two
(their Eq. 6):

    eps~(x_t, c) = (1 + w) eps(x_t, c) - w eps(x_t, null)

Everything here, like diffusers' pipelines, takes the guidance scale s = 1 + w instead and writes the same thing as
`eps_u + s (eps_c - eps_u)`: s = 1 (w = 0) is plain conditional sampling, s = 0 unconditional, s > 1 guided.
The two weights sum to one, so the mix is the same for eps, v and x_0 predictions; a learned variance (2C channels)
is taken from the conditional pass.

A conditional run folder is saved as a diffusers pipeline whose `model_index.json` names the custom pipeline
`ddpm_class_conditional.py` (pipelines/, copied beside it) and holds the class names as `id2label`:

    DiffusionPipeline.from_pretrained(OUTPUT_DIR_or_repo, custom_pipeline="ddpm_class_conditional", trust_remote_code=True)
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Sequence
from pathlib import Path

import torch

from .errors import UserError

CONDITIONAL_PIPELINE_NAME = "ddpm_class_conditional"
CONDITIONAL_PIPELINE_FILENAME = f"{CONDITIONAL_PIPELINE_NAME}.py"
CONDITIONAL_PIPELINE_CLASS = "DDPMClassConditionalPipeline"
MODEL_INDEX = "model_index.json"


def packaged_pipeline_file(filename: str) -> Path | None:
    """A file of pipelines/: `ddpm_hf/pipelines/` in an installed wheel (setup.cfg maps `pipelines/` there),
    `pipelines/` beside the package in a source checkout or editable install; None if neither has it."""
    package = Path(__file__).resolve().parent
    for candidate in (package / "pipelines" / filename, package.parent / "pipelines" / filename):
        if candidate.is_file():
            return candidate
    return None


# ---- the model ------------------------------------------------------------------------------------


def num_classes(unet) -> int | None:
    """K, the classes a UNet was trained on (its last class embedding is the null label), or None if unconditional."""
    config = getattr(unet, "config", None)  # any network: stand-ins in tests, wrappers, UNet2DModel
    embeds = config.get("num_class_embeds") if isinstance(config, dict) else getattr(config, "num_class_embeds", None)
    return embeds - 1 if embeds else None


def class_label_arguments(labels: torch.Tensor | None) -> dict:
    """The keyword arguments that give `labels` to a network: none for an unconditional one, whose forward may not
    take `class_labels` at all."""
    return {"class_labels": labels} if labels is not None else {}


def check_guidance(unet, guidance_scale: float | None, class_labels=None) -> float:
    """The guidance scale to sample with (1.0 when not given); guidance or labels for an unconditional UNet are refused."""
    if num_classes(unet) is None:
        if guidance_scale is not None or class_labels is not None:
            given = "--guidance_scale" if guidance_scale is not None else "--class_labels"
            raise UserError(f"{given} needs a class-conditional model, but this one is unconditional. Train one with --class_conditional, or drop {given}.")
        return 1.0
    return 1.0 if guidance_scale is None else float(guidance_scale)


def guided_model_output(unet, x_t: torch.Tensor, t, labels: torch.Tensor, guidance_scale: float) -> torch.Tensor:
    """The model output for one reverse step with classifier-free guidance: eps_u + s (eps_c - eps_u) on the mean
    channels, in one forward pass of batch 2B (none extra for s = 1); a learned variance comes from the conditional half."""
    if guidance_scale == 1.0:
        return unet(x_t, t, class_labels=labels).sample
    null = torch.full_like(labels, num_classes(unet))
    both = unet(torch.cat([x_t, x_t]), t, class_labels=torch.cat([labels, null])).sample
    eps_c, eps_u = both.chunk(2)
    channels = x_t.shape[1]
    guided = eps_u[:, :channels] + guidance_scale * (eps_c[:, :channels] - eps_u[:, :channels])
    return torch.cat([guided, eps_c[:, channels:]], dim=1)


class ClassConditioned:
    """`unet` with the labels of one training batch bound: called as network(x_t, t), which is how the losses call it."""

    def __init__(self, unet, labels: torch.Tensor):
        self.unet, self.labels = unet, labels

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor):
        return self.unet(x_t, t, class_labels=self.labels)


def drop_labels(labels: torch.Tensor, p_uncond: float, null_id: int) -> torch.Tensor:
    """Each label replaced by the null id with probability p_uncond (Ho & Salimans 2022, Alg. 1), drawn from the
    global RNG on the labels' device (seeded per step by training, so that resuming repeats the draws)."""
    if p_uncond <= 0:
        return labels
    return torch.where(torch.rand(labels.shape, device=labels.device) < p_uncond, torch.full_like(labels, null_id), labels)


# ---- labels of the images to sample ---------------------------------------------------------------


def class_ids(labels: Sequence[str | int], count: int, names: Sequence[str] | None, option: str = "--class_labels") -> list[int]:
    """Class ids for class names or ids (strings of digits count as ids unless they are a class name)."""
    lookup = {name: i for i, name in enumerate(names or [])}
    known = f" Known classes: {', '.join(names)}." if names else f" This model has no class names: use ids 0..{count - 1}."
    ids = []
    for label in labels:
        if isinstance(label, str) and label.strip() in lookup:
            ids.append(lookup[label.strip()])
            continue
        try:
            value = int(label)
        except (TypeError, ValueError):
            raise UserError(f"{option}: unknown class {label!r}.{known}") from None
        if not 0 <= value < count:
            raise UserError(f"{option}: class id {value} is out of range: this model has {count} classes, ids 0..{count - 1}.{known}")
        ids.append(value)
    if not ids:
        raise UserError(f"{option}: no class given. Name one or more classes, e.g. {option} {names[0] if names else 0}.")
    return ids


def labels_in_blocks(ids: Sequence[int], num_images: int) -> list[int]:
    """The class of each of `num_images` images when the classes `ids` share them in order: the first block of
    images is ids[0], the next ids[1], ... (blocks differ in size by at most one)."""
    return [ids[i * len(ids) // num_images] for i in range(num_images)]


def balanced_labels(count: int, num_images: int) -> list[int]:
    """Image i is of class i mod K: every class gets the same number of images (within one), whatever the processes."""
    return [i % count for i in range(num_images)]


# ---- the saved pipeline ---------------------------------------------------------------------------


def class_names_of(model_index: dict | None) -> list[str] | None:
    """The class names of a saved pipeline by id, from its model_index.json's `id2label` ({"0": name, ...})."""
    id2label = (model_index or {}).get("id2label")
    return [str(id2label[key]) for key in sorted(id2label, key=int)] if id2label else None


def is_conditional_index(model_index: dict | None) -> bool:
    name = (model_index or {}).get("_class_name")
    return isinstance(name, (list, tuple)) and list(name) == [CONDITIONAL_PIPELINE_NAME, CONDITIONAL_PIPELINE_CLASS]


def make_conditional_pipeline_folder(folder: str, class_names: Sequence[str] | None) -> None:
    """Turn the DDPMPipeline saved in `folder` into the class-conditional pipeline: `model_index.json` names
    pipelines/ddpm_class_conditional.py (copied beside it, so that the folder loads on its own and pushes with it)
    and holds the class names as `id2label`."""
    source = packaged_pipeline_file(CONDITIONAL_PIPELINE_FILENAME)
    if source is None:
        raise UserError(
            f"the package's {CONDITIONAL_PIPELINE_FILENAME} is missing (pipelines/ in a checkout, ddpm_hf/pipelines/ in a wheel): reinstall ddpm-hf."
        )
    path = os.path.join(folder, MODEL_INDEX)
    with open(path) as f:
        index = json.load(f)
    index["_class_name"] = [CONDITIONAL_PIPELINE_NAME, CONDITIONAL_PIPELINE_CLASS]
    if class_names:  # id2label as diffusers' DiTPipeline has it; a list would be taken for a component on Hub downloads
        index["id2label"] = {str(i): name for i, name in enumerate(class_names)}
    with open(path, "w") as f:
        json.dump(index, f, indent=2, sort_keys=True)
        f.write("\n")
    shutil.copyfile(source, os.path.join(folder, CONDITIONAL_PIPELINE_FILENAME))
