"""Every option of every `ddpm-hf` command: an out-of-range number or an unusable path is the one-line error
(exit 2) while parsing, before any work. (train_ddpm.py's options: tests/test_options.py.)"""

from __future__ import annotations

import argparse

import pytest

from ddpm_hf.cli import build_parser, main

# Options whose value is free text that only the code behind them can judge (a Hub revision, a column name...).
FREE_TEXT = {
    "--revision",
    "--image_column",
    "--split",
    "--split_b",
    "--reference_split",
    "--name",
    "--sweep",
    "--seeds",
    "--timesteps",
    "--dataset_config",
    "--repo_id",
    "--space",
    "--token",
    "--commit_message",
    "--license",
    "--class_labels",
    "--guidance_scales",
}
# Dummy values for the required arguments of each command, so that only the option under test is wrong.
REQUIRED = {"--model": "user/model", "--dataset": "user/dataset", "path_a": "user/a", "path_b": "user/b", "output_dir": "."}


def commands() -> dict[str, argparse.ArgumentParser]:
    """'sample', 'visualize forward', ... -> its parser."""
    found = {}

    def walk(parser, prefix):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    walk(sub, [*prefix, name])
        if prefix and not any(isinstance(a, argparse._SubParsersAction) for a in parser._actions):
            found[" ".join(prefix)] = parser

    walk(build_parser(), [])
    return found


def required_arguments(parser, skip: argparse.Action) -> list[str]:
    words = []
    for action in parser._actions:
        if action is skip or not (action.required or not action.option_strings) or isinstance(action, argparse._HelpAction):
            continue
        key = action.option_strings[0] if action.option_strings else action.dest
        value = REQUIRED[key]
        words += [key, value] if action.option_strings else [value]
    return words


def cases():
    for command, parser in commands().items():
        for action in parser._actions:
            if isinstance(action, argparse._HelpAction) or action.nargs == 0:
                continue
            name = action.option_strings[0] if action.option_strings else action.dest
            bounds, kind = getattr(action.type, "bounds", None), getattr(action.type, "path_kind", None)
            if bounds is not None:
                yield pytest.param(command, action, str(bounds.outside()), id=f"{command} {name} out of range")
                yield pytest.param(command, action, "ten", id=f"{command} {name} not a number")
            elif kind in ("output_file", "output_folder"):
                yield pytest.param(command, action, "UNDER_A_FILE", id=f"{command} {name} unwritable")
            elif kind == "input":
                yield pytest.param(command, action, "./does-not-exist", id=f"{command} {name} missing")
            elif getattr(action.type, "kind", None) == "device":
                yield pytest.param(command, action, "cuda:99", id=f"{command} {name} no such device")
            elif action.choices:
                yield pytest.param(command, action, "no-such-choice", id=f"{command} {name} bad choice")


def test_every_option_that_takes_a_value_declares_what_it_may_be():
    """A new number without bounds, or a path without a kind, fails here."""
    loose = []
    for command, parser in commands().items():
        for action in parser._actions:
            if isinstance(action, argparse._HelpAction) or action.nargs == 0:
                continue
            name = action.option_strings[0] if action.option_strings else action.dest
            declared = any(hasattr(action.type, a) for a in ("bounds", "path_kind", "kind")) or action.choices or name in FREE_TEXT
            if action.type in (int, float) or not declared:
                loose.append(f"{command} {name}")
    assert not loose, loose


@pytest.mark.parametrize("command, action, value", list(cases()))
def test_a_bad_value_is_a_one_line_error_before_any_work(command, action, value, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a relative path in a message or a default output lands here, never in the repo
    if value == "UNDER_A_FILE":
        (tmp_path / "a-file").write_text("")
        value = str(tmp_path / "a-file" / "sub" / "out.png")
    parser = commands()[command]
    option = [action.option_strings[0], value] if action.option_strings else []
    words = [*command.split(), *required_arguments(parser, skip=action), *option]
    if not action.option_strings:  # a positional: put the bad value where the dummy was
        words[words.index(REQUIRED[action.dest])] = value
    with pytest.raises(SystemExit) as exit_info:
        main(words)
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2
    assert len(err) == 1 and err[0].startswith("error: ") and "Traceback" not in err[0], err
    name = action.option_strings[0] if action.option_strings else action.metavar
    assert name in err[0], err
    assert sorted(p.name for p in tmp_path.iterdir()) in ([], ["a-file"])  # nothing written
