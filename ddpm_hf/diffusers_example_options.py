"""The option names of diffusers' `examples/unconditional_image_generation/train_unconditional.py`, for users who
bring its command line: each is an alias of one of ours with the same meaning, mapped onto ours, accepted as
already true here, or refused with a message that names what to use instead. README ("Coming from the diffusers
example") has the same table for people.

Only names differ in the aliases; one option shares a name but not a meaning: the example's --train_batch_size is
per device, ours is the global batch (processes x accumulation x per-device batch).
"""

from __future__ import annotations

from .errors import UserError

# The example's name -> ours: the same meaning, another name.
ALIASES: dict[str, str] = {
    "dataset_name": "dataset",
    "train_data_dir": "dataset",
    "dataset_config_name": "dataset_config",
    "model_config_name_or_path": "model_config",
    "overwrite_output_dir": "overwrite",
    "eval_batch_size": "num_sample_images",
    "adam_weight_decay": "weight_decay",
    "logger": "report_to",
    "ddpm_num_steps": "num_train_timesteps",
    "ddpm_num_inference_steps": "sample_steps",
    "ddpm_beta_schedule": "beta_schedule",
    "checkpointing_steps": "checkpoint_every",
}
# The example's EMA always ramps its decay up to --ema_max_decay: ours with --ema_warmup and that cap.
MAPPED: dict[str, tuple[str, list[str]]] = {
    "ema_max_decay": ("ema_decay", ["--ema_warmup", "true"]),
}
# Flags that say what this trainer always does (they take no value, or one we do not need).
ALREADY_SO: dict[str, tuple[bool, str]] = {  # name -> (takes a value, why)
    "center_crop": (False, "images are always resized on the short side and center-cropped here"),
    "local_rank": (True, "the launcher's LOCAL_RANK is read from the environment"),
}
REFUSED: dict[str, str] = {
    "cache_dir": "set HF_DATASETS_CACHE (or HF_HOME) to choose where downloaded datasets are kept",
    "enable_xformers_memory_efficient_attention": "PyTorch's scaled-dot-product attention is used already; drop the flag",
}


def _split(word: str) -> tuple[str, str | None]:
    """'--name=value' -> ('name', 'value'); '--name' -> ('name', None); hyphens read as underscores."""
    name, _, value = word[2:].partition("=")
    return name.replace("-", "_"), (value if "=" in word else None)


def translate_flags(argv: list[str]) -> list[str]:
    """The command line with the example's option names turned into ours (see the tables above)."""
    words, translated = list(argv), []
    while words:
        word = words.pop(0)
        if not word.startswith("--"):
            translated.append(word)
            continue
        name, value = _split(word)
        if name in ALIASES:
            translated.append(f"--{ALIASES[name]}" + (f"={value}" if value is not None else ""))
        elif name in MAPPED:
            target, extra = MAPPED[name]
            translated += [f"--{target}" + (f"={value}" if value is not None else ""), *([] if value is not None or not words else [words.pop(0)]), *extra]
        elif name in ALREADY_SO:
            takes_value, _ = ALREADY_SO[name]
            if takes_value and value is None and words and not words[0].startswith("--"):
                words.pop(0)
        elif name in REFUSED:
            raise UserError(f"--{name} (from the diffusers example) is not an option here: {REFUSED[name]}.")
        else:
            translated.append(word)
    return translated


def translate_keys(values: dict) -> dict:
    """A YAML mapping of options with the example's names turned into ours, as `translate_flags` does."""
    translated = {}
    for name, value in values.items():
        if name in REFUSED:
            raise UserError(f"{name} (from the diffusers example) is not an option here: {REFUSED[name]}.")
        if name in ALREADY_SO:
            continue
        if name in MAPPED:
            target, _ = MAPPED[name]
            translated.update({target: value, "ema_warmup": True})
            continue
        translated[ALIASES.get(name, name)] = value
    return translated
