"""Sweeps: several FIDs of one model that differ in one thing, and the files that show them.

* `--sweep "ddpm:1000,ddim:50"`: FID against the sampler and its number of network evaluations (NFE).
* `--frontier 5,10,20,50,100`: FID against NFE for every sampler at each budget (and DDPM with all T steps), with
  the best sampler at each budget (`best_at_budget`). A budget is a number of network evaluations, not of steps:
  each sampler runs the most steps it can within it (`steps_within`; Heun evaluates the network twice per step).
* `--guidance_sweep 0,1,2,4`: FID against the classifier-free guidance scale s = 1 + w (Ho & Salimans 2022).

A `SweepKind` says what a sweep varies and how its table (.csv, .md) and plot (.png) show it; the runs themselves are
ordinary FIDs (evaluation.evaluate_runs). A new kind of sweep is one more `SweepKind`, the option that asks for it
(evaluation.EvaluateOptions.runs) and its lines in evaluation_cli.report_sweep. With `--repeats N` every FID is the
mean over N image sets, and the tables gain its standard deviation and minimum.
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
    annotate: bool = True  # write each point's FID beside it on the plot
    ticks: str | None = None  # the row key whose values mark the x axis (None: `x`)


_RESULT_COLUMNS = (("sampler", "sampler", "{}", "---"), ("steps", "steps", "{}", "---:"), ("nfe", "NFE", "{}", "---:"))
_FID_COLUMNS = (("fid", "FID", "{:.2f}", "---:"), ("seconds", "seconds", "{:.0f}", "---:"))
_REPEAT_COLUMNS = (("fid_std", "FID std", "{:.2f}", "---:"), ("fid_min", "FID min", "{:.2f}", "---:"))  # with --repeats N > 1
SAMPLER_SWEEP = SweepKind(
    "sweep", _RESULT_COLUMNS + _FID_COLUMNS, "nfe", "network evaluations per image (NFE)", "sampler", True, "FID vs sampling cost: {model_name}"
)
FRONTIER = SweepKind(
    "frontier",
    (("nfe_budget", "NFE budget", "{}", "---:"), *_RESULT_COLUMNS, *_FID_COLUMNS),
    "nfe",
    "network evaluations per image (NFE)",
    "sampler",
    True,
    "FID vs NFE, every sampler: {model_name}",
    annotate=False,
    ticks="nfe_budget",  # Heun's 9 NFE sits beside the others' 10: tick the budgets
)
DEFAULT_FRONTIER_BUDGETS = (5, 10, 20, 50, 100)  # network evaluations; DDPM also runs with all T steps
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

_NFE_BUDGET = bounded(int, ge=1)


def nfe_budgets(text: str) -> list[int]:
    """An argparse type: '5,10,20' -> [5, 10, 20], network evaluations per image, each >= 1, none twice, ascending."""
    items = [item.strip() for item in text.split(",")]
    try:
        budgets = [_NFE_BUDGET(item) for item in items]
    except argparse.ArgumentTypeError as error:
        raise argparse.ArgumentTypeError(f'each budget {error}; e.g. "5,10,20,50,100"') from None
    if len(set(budgets)) != len(budgets):
        raise argparse.ArgumentTypeError(f"lists a budget twice: {text}")
    return sorted(budgets)


nfe_budgets.bounds = _NFE_BUDGET.bounds


def steps_within(scheduler, name: str, budget: int, timestep_spacing: str | None = None) -> int:
    """The most steps K of sampler `name` whose network evaluations per image (`Sampler.nfe`, as the sampler counts
    them: 2K - 1 for Heun, K for the others) fit in `budget` and that `make_sampler` accepts. A step count it refuses
    (e.g. a 'leading' chain that would start far from noise) is passed over; when no K is left, its refusal (a
    UserError) is raised."""
    from .sampling import make_sampler

    refusal = None
    for steps in range(min(budget, scheduler.config.num_train_timesteps), 0, -1):
        try:
            if make_sampler(scheduler, name, steps, timestep_spacing).nfe <= budget:
                return steps
        except UserError as error:
            refusal = refusal or error
    raise refusal or UserError(f"--frontier: no step count of {name} fits {budget} network evaluations.")


# ---------------------------------------------------------------------------------------------
# The table and the plot
# ---------------------------------------------------------------------------------------------


def _columns(kind: SweepKind, results: list[dict]) -> tuple:
    """The columns of `kind`, and the spread of the FID when the results are means over several image sets."""
    return kind.columns + (_REPEAT_COLUMNS if "fid_std" in results[0] else ())


def _value(result: dict, key: str):
    if key == "sampler":
        return result["scheduler"]
    if key == "seconds":
        return result["timing"]["sampling_and_features_seconds"]
    return result[key]


def sweep_rows(results: list[dict], kind: SweepKind = SAMPLER_SWEEP) -> list[dict]:
    """One row per result (the dicts eval.json holds), with the columns of `kind`."""
    return [{key: _value(r, key) for key, *_ in _columns(kind, results)} for r in results]


def _table(rows: list[dict], columns) -> str:
    columns = [column for column in columns if column[0] in rows[0]]
    lines = ["| " + " | ".join(header for _, header, _, _ in columns) + " |", "| " + " | ".join(align for *_, align in columns) + " |"]
    lines += ["| " + " | ".join(form.format(r[key]) for key, _, form, _ in columns) + " |" for r in rows]
    return "\n".join(lines)


def sweep_table(rows: list[dict], kind: SweepKind = SAMPLER_SWEEP) -> str:
    """`rows` as a Markdown table."""
    return _table(rows, kind.columns + _REPEAT_COLUMNS)


_BEST_COLUMNS = (
    ("nfe_budget", "NFE budget", "{}", "---:"),
    ("sampler", "best sampler", "{}", "---"),
    ("steps", "steps", "{}", "---:"),
    ("nfe", "NFE", "{}", "---:"),
    ("fid", "FID", "{:.2f}", "---:"),
    ("next", "next best", "{}", "---"),
)


def best_at_budget(results: list[dict]) -> list[dict]:
    """The frontier's summary: per NFE budget (ascending), the sampler with the lowest FID within it, and the next best."""
    rows = []
    for budget in sorted({r["nfe_budget"] for r in results}):
        ranked = sorted((r for r in results if r["nfe_budget"] == budget), key=lambda r: r["fid"])
        best = ranked[0]
        following = f"{ranked[1]['scheduler']} ({ranked[1]['fid']:.2f})" if len(ranked) > 1 else "-"
        rows.append(dict(nfe_budget=budget, sampler=best["scheduler"], steps=best["steps"], nfe=best["nfe"], fid=best["fid"], next=following))
    return rows


def best_table(rows: list[dict]) -> str:
    """`best_at_budget`'s rows as a Markdown table."""
    return _table(rows, _BEST_COLUMNS)


def write_sweep(results: list[dict], output_dir: str, title: str, kind: SweepKind = SAMPLER_SWEEP) -> dict[str, str]:
    """<kind>.csv, <kind>.md (a Markdown table) and <kind>.png: FID against network evaluations (the sampler sweep,
    sweep.*, and the frontier, frontier.*, whose .md starts with the best sampler at each budget) or against the
    guidance scale (guidance_sweep.*); one line per sampler, error bars of one standard deviation with --repeats.
    Returns the three paths by extension."""
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
        if kind is FRONTIER:
            f.write("Best sampler at each budget:\n\n" + best_table(best_at_budget(results)) + "\n\nEvery run:\n\n")
        f.write(sweep_table(rows, kind) + "\n")

    figure, axis = plt.subplots(figsize=(7, 4.5) if kind is FRONTIER else (6, 4), dpi=120)
    for series in dict.fromkeys(r[kind.series] for r in rows) if kind.series else [None]:
        points = sorted((r[kind.x], r["fid"], r.get("fid_std", 0.0)) for r in rows if kind.series is None or r[kind.series] == series)
        xs, fids, spreads = zip(*points)
        axis.errorbar(xs, fids, yerr=spreads if any(spreads) else None, marker="o", markersize=4, capsize=3, label=series)
        for x, fid, _ in points if kind.annotate else ():
            axis.annotate(f"{fid:.2f}", (x, fid), textcoords="offset points", xytext=(4, 4), fontsize=8)
    if kind.log_x:
        axis.set_xscale("log")
    axis.set_xticks(sorted({r[kind.ticks or kind.x] for r in rows}))
    if kind.log_x:
        axis.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
        axis.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    axis.set_xlabel(kind.xlabel)
    repeats = f", mean of {results[0]['repeats']} sets" if "repeats" in results[0] else ""
    axis.set_ylabel(f"FID ({results[0]['num_samples']} samples{repeats}, lower is better)")
    axis.set_title(title)
    axis.grid(True, which="both", alpha=0.3)
    if kind.series:
        axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(paths["png"])
    plt.close(figure)
    return paths
