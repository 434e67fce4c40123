"""Sweeps: several FIDs of one model that differ in one thing, and the files that show them.

* `--sweep "ddpm:1000,ddim:50"`: FID against the sampler and its number of network evaluations (NFE).
* `--guidance_sweep 0,1,2,4`: FID against the classifier-free guidance scale s = 1 + w (Ho & Salimans 2022).

A `SweepKind` says what a sweep varies and how its table (.csv, .md) and plot (.png) show it; the runs themselves are
ordinary FIDs (evaluation.evaluate_runs). A new kind of sweep is one more `SweepKind`, the option that asks for it
(evaluation.EvaluateOptions.runs) and its lines in evaluation_cli.report_sweep.
"""

from __future__ import annotations

import argparse
import csv
import os
import re
from dataclasses import dataclass

from .arguments import bounded
from .errors import UserError
from .sampling import SAMPLERS


@dataclass(frozen=True)
class SweepKind:
    """What a sweep varies, and how its files show it: `name`.csv/.md/.png and eval.json section `name`."""

    name: str
    columns: tuple[tuple[str, str, str, str], ...]  # (row key, table header, cell format, alignment "---" or "---:")
    x: str  # the row key on the plot's x axis
    xlabel: str
    series: str | None  # one line per value of this row key (None: one line)
    log_x: bool
    title: str  # the plot's title: str.format of `model_name` (the model folder's name) and the first run's result


_RESULT_COLUMNS = (("sampler", "sampler", "{}", "---"), ("steps", "steps", "{}", "---:"), ("nfe", "NFE", "{}", "---:"))
_FID_COLUMNS = (("fid", "FID", "{:.2f}", "---:"), ("seconds", "seconds", "{:.0f}", "---:"))
SAMPLER_SWEEP = SweepKind(
    "sweep", _RESULT_COLUMNS + _FID_COLUMNS, "nfe", "network evaluations per image (NFE)", "sampler", True, "FID vs sampling cost: {model_name}"
)
GUIDANCE_SWEEP = SweepKind(
    "guidance_sweep",
    (("guidance_scale", "guidance scale s", "{:g}", "---:"), *_RESULT_COLUMNS, *_FID_COLUMNS),
    "guidance_scale",
    "guidance scale s = 1 + w",
    None,
    False,
    "FID vs guidance: {model_name}, {scheduler} {steps} steps",
)


# ---------------------------------------------------------------------------------------------
# What the options ask for
# ---------------------------------------------------------------------------------------------


def parse_sweep(text: str) -> list[tuple[str, int]]:
    """'ddpm:1000,ddim:50' -> [('ddpm', 1000), ('ddim', 50)]."""
    runs = []
    for item in text.split(","):
        item = item.strip()
        match = re.fullmatch(r"([a-z]+):(\d+)", item)
        if not match or match.group(1) not in SAMPLERS:  # "auto" is no sampler of its own
            raise UserError(f'--sweep: {item!r} is not SAMPLER:STEPS with SAMPLER one of {", ".join(SAMPLERS)}; e.g. --sweep "ddpm:1000,ddim:50,dpmsolver:20".')
        runs.append((match.group(1), int(match.group(2))))
    return runs


_GUIDANCE_SCALE = bounded(float, ge=0)


def guidance_scales(text: str) -> list[float]:
    """An argparse type: '0,1,2,4' -> [0.0, 1.0, 2.0, 4.0], each scale a number >= 0, none twice."""
    items = [item.strip() for item in text.split(",")]
    if not all(items):
        raise argparse.ArgumentTypeError(f'must be comma-separated guidance scales, e.g. "0,1,2,4", got {text!r}')
    scales = []
    for item in items:
        try:
            scales.append(_GUIDANCE_SCALE(item))
        except argparse.ArgumentTypeError as error:
            raise argparse.ArgumentTypeError(f'each scale {error}; e.g. "0,1,2,4"') from None
    if len(set(scales)) != len(scales):
        raise argparse.ArgumentTypeError(f"lists a guidance scale twice: {text}")
    return scales


guidance_scales.bounds = _GUIDANCE_SCALE.bounds  # each scale's (tests/test_cli_options.py)


# ---------------------------------------------------------------------------------------------
# The table and the plot
# ---------------------------------------------------------------------------------------------


def sweep_rows(results: list[dict], kind: SweepKind = SAMPLER_SWEEP) -> list[dict]:
    """One row per result (the dicts eval.json holds), with the columns of `kind`."""

    def value(result: dict, key: str):
        if key == "sampler":
            return result["scheduler"]
        if key == "seconds":
            return result["timing"]["sampling_and_features_seconds"]
        return result[key]

    return [{key: value(r, key) for key, *_ in kind.columns} for r in results]


def sweep_table(rows: list[dict], kind: SweepKind = SAMPLER_SWEEP) -> str:
    """`rows` as a Markdown table."""
    lines = ["| " + " | ".join(header for _, header, _, _ in kind.columns) + " |", "| " + " | ".join(align for *_, align in kind.columns) + " |"]
    lines += ["| " + " | ".join(form.format(r[key]) for key, _, form, _ in kind.columns) + " |" for r in rows]
    return "\n".join(lines)


def write_sweep(results: list[dict], output_dir: str, title: str, kind: SweepKind = SAMPLER_SWEEP) -> dict[str, str]:
    """<kind>.csv, <kind>.md (a Markdown table) and <kind>.png: FID against network evaluations (the sampler sweep,
    sweep.*) or against the guidance scale (guidance_sweep.*). Returns the three paths by extension."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    os.makedirs(output_dir, exist_ok=True)
    rows = sweep_rows(results, kind)
    paths = {name: os.path.join(output_dir, f"{kind.name}.{name}") for name in ("csv", "md", "png")}
    with open(paths["csv"], "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    with open(paths["md"], "w") as f:
        f.write(sweep_table(rows, kind) + "\n")

    figure, axis = plt.subplots(figsize=(6, 4), dpi=120)
    for series in dict.fromkeys(r[kind.series] for r in rows) if kind.series else [None]:
        points = sorted((r[kind.x], r["fid"]) for r in rows if kind.series is None or r[kind.series] == series)
        axis.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=series)
        for x, fid in points:
            axis.annotate(f"{fid:.2f}", (x, fid), textcoords="offset points", xytext=(4, 4), fontsize=8)
    if kind.log_x:
        axis.set_xscale("log")
    axis.set_xticks(sorted({r[kind.x] for r in rows}))
    if kind.log_x:
        axis.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
        axis.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    axis.set_xlabel(kind.xlabel)
    axis.set_ylabel(f"FID ({results[0]['num_samples']} samples, lower is better)")
    axis.set_title(title)
    axis.grid(True, which="both", alpha=0.3)
    if kind.series:
        axis.legend()
    figure.tight_layout()
    figure.savefig(paths["png"])
    plt.close(figure)
    return paths
