"""Every training option is checked against its field's metadata before any work starts.

The lists below come from TrainingConfig's fields, so an option added later is walked too, and one that
forgets its bounds fails `test_every_number_has_bounds`.
"""

import dataclasses
import json
import os
import subprocess
import sys
import typing

import pytest

from ddpm_hf.config import PATH_KINDS, REMOVED_OPTIONS, TrainingConfig, non_resumable_changes, parse_training_config, value_type
from ddpm_hf.errors import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIELDS = dataclasses.fields(TrainingConfig)
NUMBERS = [f for f in FIELDS if value_type(f.name) in (int, float)]
CHOICES = [f for f in FIELDS if typing.get_origin(value_type(f.name)) is typing.Literal]


def _out_of_range(f: dataclasses.Field) -> list:
    """A value just past each end of the field's range."""
    meta, values = f.metadata, []
    if meta["gt"] is not None:
        values.append(meta["gt"])
    if meta["ge"] is not None:
        values.append(meta["ge"] - 1)
    if meta["lt"] is not None:
        values.append(meta["lt"])
    if meta["le"] is not None:
        values.append(meta["le"] + 1)
    return [value_type(f.name)(v) for v in values]


def _user_error(argv: list[str]) -> str:
    with pytest.raises(UserError) as error:
        parse_training_config(argv)
    message = str(error.value)
    assert "\n" not in message
    return message


def test_every_number_has_bounds():
    assert NUMBERS, "no numeric options found"
    missing = [f.name for f in NUMBERS if not _out_of_range(f)]
    assert not missing, f"give these options bounds (gt/ge/lt/le in config.option): {missing}"


def test_every_field_has_complete_metadata():
    for f in FIELDS:
        assert f.metadata["help"], f.name
        assert isinstance(f.metadata["resumable"], bool), f.name
        assert f.metadata["path"] in (None, *PATH_KINDS), f.name


@pytest.mark.parametrize("name, value", [(f.name, v) for f in NUMBERS for v in _out_of_range(f)])
def test_out_of_range_numbers_are_one_line_errors_naming_the_option(name, value, tmp_path):
    message = _user_error([f"--{name}", str(value), "--output_dir", str(tmp_path / "run")])
    assert message.startswith(f"--{name} must be ") and f"got {value}" in message


@pytest.mark.parametrize("value", ["nan", "inf"])
def test_non_finite_floats_are_refused(value, tmp_path):
    for f in NUMBERS:
        if value_type(f.name) is float:
            assert f"--{f.name}" in _user_error([f"--{f.name}", value, "--output_dir", str(tmp_path)])


@pytest.mark.parametrize("name", [f.name for f in CHOICES])
def test_invalid_choices_are_one_line_errors(name, tmp_path):
    assert "invalid choice" in _user_error([f"--{name}", "not-a-choice", "--output_dir", str(tmp_path)])
    # The same from a YAML file, which argparse does not check.
    path = tmp_path / "run.yaml"
    path.write_text(f"{name}: not-a-choice\n")
    assert f"--{name} 'not-a-choice': invalid choice" in _user_error(["--config", str(path), "--output_dir", str(tmp_path)])


def test_wrongly_typed_yaml_values_are_one_line_errors(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("max_train_steps: 1.5\n")
    assert "--max_train_steps must be a whole number" in _user_error(["--config", str(path)])
    path.write_text("learning_rate: [1, 2]\n")
    assert "--learning_rate must be a finite number" in _user_error(["--config", str(path)])


def test_yaml_yes_and_no_are_words_for_choice_options(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("compile: no\nchannels_last: yes\n")
    config = parse_training_config(["--config", str(path), "--output_dir", str(tmp_path)])
    assert (config.compile, config.channels_last) == ("no", "yes")


def test_missing_files_are_one_line_errors(tmp_path):
    files = [f.name for f in FIELDS if f.metadata["path"] == "file"]
    assert sorted(files) == ["config", "model_config"]
    for name in files:
        missing = str(tmp_path / f"missing-{name}")
        message = _user_error([f"--{name}", missing, "--output_dir", str(tmp_path)])
        assert message.startswith(f"--{name} {missing}: no such file")


def test_output_dir_must_be_a_folder_that_can_be_made(tmp_path):
    a_file = tmp_path / "file.txt"
    a_file.write_text("")
    assert _user_error(["--output_dir", str(a_file)]).startswith(f"--output_dir {a_file} is a file")
    # Root may write anywhere, so the unwritable case is a parent that is a file: nothing can be made under it.
    under_a_file = a_file / "run" / "deeper"
    assert _user_error(["--output_dir", str(under_a_file)]).startswith(f"--output_dir {under_a_file} cannot be created")
    # A folder that does not exist yet is fine, and validation creates nothing.
    config = parse_training_config(["--output_dir", str(tmp_path / "new" / "run")])
    assert config.output_dir == str(tmp_path / "new" / "run") and not (tmp_path / "new").exists()


def test_removed_options_say_so(tmp_path):
    for name in REMOVED_OPTIONS:
        path = tmp_path / "old.yaml"
        path.write_text(f"{name}: 4\n")
        assert f"option {name} was removed" in _user_error(["--config", str(path)])
        assert f"option {name} was removed" in _user_error([f"--{name}", "4"])


def test_non_resumable_changes_reads_the_fields(tmp_path):
    config = parse_training_config(["--preset", "quickstart", "--output_dir", str(tmp_path)])
    previous = json.loads(json.dumps(config.to_json_dict()))
    previous["dataloader_num_workers"] = 4  # a removed option in an older run's training_config.json
    assert non_resumable_changes(previous, config) == []
    resumed = dataclasses.replace(config, max_train_steps=1, overwrite=True, resume_from_checkpoint="latest", compile="no")
    assert non_resumable_changes(previous, resumed) == []
    assert non_resumable_changes(previous, dataclasses.replace(config, learning_rate=0.5, seed=3)) == [
        ("learning_rate", config.learning_rate, 0.5),
        ("seed", config.seed, 3),
    ]


def test_train_ddpm_refuses_a_bad_option_before_any_work(tmp_path):
    output_dir = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, os.path.join(ROOT, "train_ddpm.py"), "--preset", "quickstart", "--learning_rate", "-1", "--output_dir", str(output_dir)],
        capture_output=True,
        text=True,
        check=False,
        cwd=tmp_path,
        timeout=120,
    )
    assert result.returncode == 2, result.stderr
    assert result.stderr.splitlines() == ["error: --learning_rate must be > 0, got -1.0."]
    assert "Traceback" not in result.stderr and not output_dir.exists()


@pytest.mark.parametrize(
    "line",
    [
        "output_dir: 2024",
        "dataset: [a, b]",
        "logging_dir: 5",
        "resume_from_checkpoint: 5",
        "hub_model_id: [a]",
        "hub_model_id: 5",
        "split: 2020",
        "dataset_config: 2020",
    ],
)
def test_text_options_of_another_type_in_yaml_are_one_line_errors_exit_2(line, tmp_path, monkeypatch, capsys):
    """Issue 24: YAML gives numbers and lists their own types; flags are always text."""
    import runpy

    name = line.split(":")[0]
    path = tmp_path / "run.yaml"
    path.write_text(line + "\n")
    argv = ["--config", str(path)] + ([] if name == "output_dir" else ["--output_dir", str(tmp_path / "run")])
    assert _user_error(argv).startswith(f"--{name} must be text, got ")
    monkeypatch.chdir(tmp_path)  # output_dir 2024 would be a folder here
    monkeypatch.setattr(sys, "argv", ["train_ddpm.py", *argv])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(os.path.join(ROOT, "train_ddpm.py"), run_name="__main__")
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(err) == 1 and err[0].startswith(f"error: --{name} must be text")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.yaml"]  # nothing written


def _wrong_values(name: str) -> list:
    """Values of a type option `name` does not take, as YAML writes them."""
    kind = value_type(name)
    if kind in (int, float):
        return ["[1, 2]", "{a: 1}", "not-a-number"]
    if kind is bool:
        return ["[1, 2]", "5", "not-a-bool"]
    if kind is str:
        return ["[1, 2]", "{a: 1}", "5", "true"]
    return ["[1, 2]", "{a: 1}", "5"]  # choices (true is yes where yes is a choice)


@pytest.mark.parametrize("name", [f.name for f in FIELDS if f.name != "config"])  # a YAML file's own path replaces a config: key
def test_every_option_checks_its_type_from_yaml(name, tmp_path):
    """The general rule: whatever its type, an option given a value of another type in YAML is a one-line error naming it."""
    path = tmp_path / "run.yaml"
    for value in _wrong_values(name):
        path.write_text(f"{name}: {value}\n")
        message = _user_error(["--config", str(path), "--output_dir", str(tmp_path / "run")] if name != "output_dir" else ["--config", str(path)])
        assert name in message and "\n" not in message, (value, message)
