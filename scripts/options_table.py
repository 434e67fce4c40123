"""Print the README's table of training options from TrainingConfig, or check it is up to date.

python scripts/options_table.py            # print the table
python scripts/options_table.py --write    # replace the table between the markers in README.md
"""

import dataclasses
import os
import sys
import typing

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ddpm_hf.config import PRESETS, TrainingConfig, bounds_text, value_type  # noqa: E402

BEGIN, END = "<!-- options:begin -->", "<!-- options:end -->"
README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")


# The path kinds validate() checks before a run starts (the others are checked when the data, weights or checkpoint load).
_CHECKED_PATHS = {"file": "existing file", "output": "writable folder"}


def _type_name(name: str) -> str:
    kind = value_type(name)
    if typing.get_origin(kind) is typing.Literal:
        return " \\| ".join(str(a) for a in typing.get_args(kind))
    return kind.__name__


def table() -> str:
    """One row per TrainingConfig field, everything read from the field and its metadata (see config.option)."""
    lines = [
        "| option | type | valid | default (cifar10) | quickstart | may change on resume | what it does |",
        "|---|---|---|---|---|---|---|",
    ]
    for f in dataclasses.fields(TrainingConfig):
        default = PRESETS["cifar10"].get(f.name, f.default)
        quick = f"`{PRESETS['quickstart'][f.name]}`" if f.name in PRESETS["quickstart"] else ""
        valid = bounds_text(f.name) or _CHECKED_PATHS.get(f.metadata["path"], "")
        resumable = "yes" if f.metadata["resumable"] else ""
        lines.append(f"| `--{f.name}` | {_type_name(f.name)} | {valid} | `{default}` | {quick} | {resumable} | {f.metadata['help']} |")
    return "\n".join(lines)


def readme_with_table(text: str) -> str:
    start, end = text.index(BEGIN) + len(BEGIN), text.index(END)
    return text[:start] + "\n" + table() + "\n" + text[end:]


if __name__ == "__main__":
    if "--write" in sys.argv:
        with open(README) as f:
            text = f.read()
        new_text = readme_with_table(text)  # built before the file is opened for writing: a failure leaves README intact
        with open(README, "w") as f:
            f.write(new_text)
    else:
        print(table())
