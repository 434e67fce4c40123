"""Install the declared lower bound of every direct dependency in a fresh venv and run the package on it.

    python scripts/check_min_deps.py                     # minimums of install_requires and the test extra
    python scripts/check_min_deps.py --only torch        # torch at its bound, the rest as pip resolves it (newest)
    python scripts/check_min_deps.py --torch 2.13.0      # another torch (e.g. the CPU wheel on disk)
    python scripts/check_min_deps.py -- tests/test_hub.py -x   # other pytest arguments

For every `name>=X` in setup.cfg's install_requires and `test` extra it installs `name==X`, all in one pip
resolve (their own dependencies resolve as pip would for a user), then this repository with --no-deps, and
checks: the versions are exactly the bounds, `pip check` is clean, every module of ddpm_hf imports, and the
tests run on them (by default the files below, which call the version-sensitive APIs: fused AdamW, Accelerate's
save_state/trackers, the diffusers schedulers and pipelines, datasets, the Hub client against a local server,
the FID network). A requirement without a lower bound is an error: an honest bound is the point.

Too slow for every CI run (several GB of old wheels, torch's among them): run it when a bound changes and
put the summary it ends with in the commit message. Uses the pip configuration of this machine (index,
find-links, constraints). Exit status 0 only when everything passed.
"""

from __future__ import annotations

import argparse
import configparser
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_TESTS = [
    "tests/test_dependencies.py",
    "tests/test_config.py",
    "tests/test_forward_process.py",
    "tests/test_training.py",
    "tests/test_sampling.py",
    "tests/test_custom_pipeline.py",
    "tests/test_data.py",
    "tests/test_hub.py",
    "tests/test_evaluation.py",
    "-m",
    "not slow",
]
# Tests whose harness, not the package, needs newer versions than the package's lower bounds; deselected with
# the reason printed in the summary. With huggingface_hub < 1.4, `HfApi(endpoint=...)` (only the in-process
# tests pass an endpoint; the package uses HF_ENDPOINT) fails after a successful commit, because CommitInfo
# parses the commit URL against the default endpoint; tests/hub_server.py reads `visibility`, not the
# `private` that older clients send; and older clients word the 401 of whoami differently.
HARNESS_NEEDS_NEWER = {
    "tests/test_hub.py::test_push_uploads_only_the_allowed_files": "huggingface_hub>=1.4 with HfApi(endpoint=...)",
    "tests/test_hub.py::test_model_card_parses_and_carries_the_metadata": "huggingface_hub>=1.4 with HfApi(endpoint=...)",
    "tests/test_hub.py::test_private_repo_needs_the_token": "huggingface_hub>=1.4 with HfApi(endpoint=...); hub_server reads `visibility`",
    "tests/test_hub.py::test_the_given_token_is_used_for_every_call": "huggingface_hub>=1.4 with HfApi(endpoint=...)",
    "tests/test_hub.py::test_token_from_the_environment": "huggingface_hub>=1.4 with HfApi(endpoint=...)",
    "tests/test_hub.py::test_push_to_a_branch": "huggingface_hub>=1.4 with HfApi(endpoint=...)",
    "tests/test_hub.py::test_check_derives_a_valid_repo_id_from_any_folder_name": "huggingface_hub>=1.4 with HfApi(endpoint=...)",
    "tests/test_hub.py::test_periodic_push_failure_does_not_stop_training_and_final_push_retries": "huggingface_hub>=1.4 with HfApi(endpoint=...)",
    "tests/test_hub.py::test_bad_token_or_repo_id_fails_at_check_in_seconds[bad-": "its regex wants newer huggingface_hub's 'Invalid user token'",
}
REQUIREMENT = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)\s*>=\s*([0-9][^,;\s]*)$")


def declared_requirements(setup_cfg: str, extras: list[str]) -> list[str]:
    parser = configparser.ConfigParser()
    parser.read(setup_cfg)
    lines = parser["options"]["install_requires"].splitlines()
    for extra in extras:
        lines += parser["options.extras_require"][extra].splitlines()
    return [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]


def lower_bounds(requirements: list[str]) -> dict[str, str]:
    """name -> lower bound, for requirements that are exactly `name>=X`; anything else is refused."""
    bounds = {}
    for requirement in requirements:
        match = REQUIREMENT.match(requirement)
        if match is None:
            sys.exit(f"check_min_deps: {requirement!r} is not of the form 'name>=X': give every dependency a lower bound.")
        bounds[match.group(1)] = match.group(2)
    return bounds


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def same_version(installed: str, wanted: str) -> bool:
    """PEP 440 equality of plain release numbers: 0.6 == 0.6.0; a local label (2.13.0+cpu) is ignored."""

    def release(version: str) -> tuple[int, ...] | None:
        match = re.fullmatch(r"([0-9]+(?:\.[0-9]+)*)(\+.*)?", version)
        if match is None:
            return None
        parts = [int(p) for p in match.group(1).split(".")]
        while len(parts) > 1 and parts[-1] == 0:
            parts.pop()
        return tuple(parts)

    return release(installed) is not None and release(installed) == release(wanted)


def installed_version(python: str, name: str) -> str:
    code = "import importlib.metadata, sys; print(importlib.metadata.version(sys.argv[1]))"
    return subprocess.run([python, "-c", code, name], capture_output=True, text=True).stdout.strip() or "?"


def run(command: list[str], log, **kwargs) -> subprocess.CompletedProcess:
    print("$ " + " ".join(command), file=log, flush=True)
    result = subprocess.run(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kwargs)
    log.write(result.stdout)
    log.flush()
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--venv", default=None, help="where to create the venv (default: a temporary folder, removed at the end)")
    parser.add_argument("--keep", action="store_true", help="keep the venv")
    parser.add_argument("--python", default=sys.executable, help="the interpreter to create the venv with")
    parser.add_argument("--torch", default=None, help="install this torch instead of its lower bound (say so in the summary)")
    parser.add_argument("--extras", default="test", help="comma-separated extras whose bounds are installed too (default: test)")
    parser.add_argument("--log", default=None, help="also write pip's and pytest's full output here")
    parser.add_argument("--only", default=None, help="comma-separated: pin only these at their bounds, e.g. --only torch (a user's older torch)")
    parser.add_argument("--no-deselect", action="store_true", help="also run the tests in HARNESS_NEEDS_NEWER")
    parser.add_argument("pytest_args", nargs="*", help="pytest arguments after `--` (default: a set of test files, -m 'not slow')")
    args = parser.parse_args()

    extras = [e for e in args.extras.split(",") if e]
    bounds = lower_bounds(declared_requirements(os.path.join(REPO, "setup.cfg"), extras))
    only = {canonical(n) for n in args.only.split(",") if n} if args.only else None
    unknown = only - {canonical(n) for n in bounds} if only else set()
    if unknown:
        sys.exit(f"check_min_deps: --only {args.only}: not declared: {', '.join(sorted(unknown))}")
    pins = {name: version for name, version in bounds.items() if only is None or canonical(name) in only}
    if args.torch is not None:
        pins["torch"] = args.torch
    # Without --only every dependency is at its bound; with it, the others resolve as pip would for a user (newest).
    free = [f"{name}>={version}" for name, version in bounds.items() if name not in pins]
    venv = args.venv or tempfile.mkdtemp(prefix="ddpm-hf-min-deps-")
    log = open(args.log, "w") if args.log else open(os.devnull, "w")  # closed in `finally`
    summary: list[str] = []
    ok = True

    def say(line: str) -> None:
        summary.append(line)
        print(line, flush=True)
        print(line, file=log, flush=True)

    started = time.monotonic()
    version = subprocess.run([args.python, "-c", "import platform; print(platform.python_version())"], capture_output=True, text=True).stdout.strip()
    say(f"check_min_deps: Python {version}, fresh venv {venv}")
    try:
        if os.path.exists(venv):
            shutil.rmtree(venv)
        subprocess.run([args.python, "-m", "venv", venv], check=True)
        python = os.path.join(venv, "bin", "python")
        run([python, "-m", "pip", "install", "-q", "--upgrade", "pip"], log)

        requirements = [f"{name}=={version}" for name, version in pins.items()]
        step = time.monotonic()
        result = run([python, "-m", "pip", "install", "--only-binary", ":all:", *requirements, *free], log)
        if result.returncode != 0:
            errors = [line for line in result.stdout.splitlines() if line.startswith("ERROR")] or result.stdout.splitlines()[-5:]
            ok = False
            say("  FAIL: pip could not install the lower bounds together: " + " | ".join(errors[-6:]))
            return 1
        say(f"  installed the lower bounds ({time.monotonic() - step:.0f} s): " + " ".join(requirements))
        if free:
            newest = [f"{name}=={installed_version(python, name)}" for name, _ in bounds.items() if name not in pins]
            say("  and, as resolved by pip (--only): " + " ".join(newest))
        if args.torch is not None:
            say(f"  NOTE: torch is {args.torch}, not its declared lower bound {bounds.get('torch')} (--torch)")

        installed = dict(
            line.split("==", 1)
            for line in subprocess.run([python, "-m", "pip", "list", "--format=freeze"], capture_output=True, text=True).stdout.splitlines()
            if "==" in line
        )
        installed = {canonical(name): value for name, value in installed.items()}
        wrong = [
            f"{name} {installed.get(canonical(name))} (wanted {want})"
            for name, want in pins.items()
            if not same_version(installed.get(canonical(name), ""), want)
        ]
        if wrong:
            ok = False
            say("  FAIL: installed versions differ from the pins: " + ", ".join(wrong))

        result = run([python, "-m", "pip", "install", "-q", "--no-deps", "-e", REPO], log)
        if result.returncode != 0:
            ok = False
            say("  FAIL: pip install --no-deps -e . failed (see the log)")
            return 1
        result = run([python, "-m", "pip", "check"], log)
        say("  pip check: " + (result.stdout.strip().splitlines() or ["(no output)"])[-1])
        ok &= result.returncode == 0

        env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
        # Every module of ddpm_hf, and the custom pipeline file(s) by path (pipelines/ becomes ddpm_hf.pipelines
        # only in a built wheel), from outside the repository so that the installed package is what is imported.
        imports = (
            "import glob, importlib, importlib.util, os, pkgutil, sys, ddpm_hf\n"
            "names = [m.name for m in pkgutil.iter_modules(ddpm_hf.__path__, 'ddpm_hf.') if m.name != 'ddpm_hf.__main__']\n"
            "[importlib.import_module(n) for n in names]\n"
            "files = sorted(glob.glob(os.path.join(sys.argv[1], 'pipelines', '*.py')))\n"
            "for f in files:\n"
            "    spec = importlib.util.spec_from_file_location(os.path.basename(f)[:-3], f)\n"
            "    spec.loader.exec_module(importlib.util.module_from_spec(spec))\n"
            "print(len(names), 'modules and', len(files), 'pipeline file(s)')\n"
        )
        result = run([python, "-c", imports, REPO], log, cwd=tempfile.gettempdir(), env=env)
        say(
            "  import of every ddpm_hf module: "
            + ("ok, " + result.stdout.strip().splitlines()[-1] if result.returncode == 0 else "FAIL: " + result.stdout.strip().splitlines()[-1])
        )
        ok &= result.returncode == 0

        pytest_args = args.pytest_args or DEFAULT_TESTS
        if not args.pytest_args and not args.no_deselect and "huggingface_hub" in pins:
            pytest_args = pytest_args + [f"--deselect={node}" for node in HARNESS_NEEDS_NEWER]
            say(f"  deselected {len(HARNESS_NEEDS_NEWER)} tests whose harness needs newer versions (--no-deselect runs them):")
            for node, reason in HARNESS_NEEDS_NEWER.items():
                say(f"    {node.split('::')[1]}: {reason}")
        step = time.monotonic()
        result = run([python, "-m", "pytest", "-q", "-p", "no:cacheprovider", *pytest_args], log, cwd=REPO, env=env)
        last = (result.stdout.strip().splitlines() or ["(no output)"])[-1]
        shown = " ".join(a for a in pytest_args if not a.startswith("--deselect="))
        say(f"  pytest {shown}: {last} ({time.monotonic() - step:.0f} s)")
        if result.returncode != 0:
            ok = False
            for line in result.stdout.splitlines():
                if line.startswith(("FAILED", "ERROR")):
                    say("    " + line[:300])

        if "ruff" in pins:  # the CI's lint step (.ci/run), with the lowest ruff allowed
            ruff = os.path.join(venv, "bin", "ruff")
            for command in (["format", "--check", "."], ["check", "."]):
                result = run([ruff, *command], log, cwd=REPO)
                say(f"  ruff {' '.join(command)}: {(result.stdout.strip().splitlines() or ['(no output)'])[-1]}")
                ok &= result.returncode == 0
        return 0 if ok else 1
    finally:
        say(f"RESULT: {'ok' if ok else 'FAILED'} ({time.monotonic() - started:.0f} s)")
        log.close()
        if args.venv is None and not args.keep:
            shutil.rmtree(venv, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
