"""Print the README's table of training options from TrainingConfig, or check it is up to date.

    python scripts/options_table.py            # print the table
    python scripts/options_table.py --write    # replace the table between the markers in README.md
"""

import dataclasses
import os
import sys
import typing

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ddpm_hf.config import PRESETS, TrainingConfig  # noqa: E402

BEGIN, END = "<!-- options:begin -->", "<!-- options:end -->"
README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")


def _type_name(annotation) -> str:
    if typing.get_origin(annotation) is typing.Literal:
        return " \\| ".join(str(a) for a in typing.get_args(annotation))
    text = str(annotation)
    return text.replace("typing.", "").replace("Optional[", "").rstrip("]") if "Optional" in text else getattr(annotation, "__name__", text)


def table() -> str:
    hints = typing.get_type_hints(TrainingConfig, include_extras=False)
    lines = ["| option | type | default (cifar10) | quickstart | what it does |", "|---|---|---|---|---|"]
    for f in dataclasses.fields(TrainingConfig):
        default = PRESETS["cifar10"].get(f.name, f.default)
        quick = PRESETS["quickstart"].get(f.name, "")
        lines.append(f"| `--{f.name}` | {_type_name(hints[f.name])} | `{default}` | {f'`{quick}`' if quick != '' else ''} | {f.metadata['help']} |")
    return "\n".join(lines)


def readme_with_table(text: str) -> str:
    start, end = text.index(BEGIN) + len(BEGIN), text.index(END)
    return text[:start] + "\n" + table() + "\n" + text[end:]


if __name__ == "__main__":
    if "--write" in sys.argv:
        with open(README) as f:
            text = f.read()
        with open(README, "w") as f:
            f.write(readme_with_table(text))
    else:
        print(table())
