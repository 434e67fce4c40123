"""Stopping a push: Ctrl-C and SIGTERM end with a one-line error that says how to push again, and leave no
snapshot in the temporary folder. The pushes run in subprocesses; the local Hub holds their commits."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from test_hub import REPO_ROOT, make_output_dir

REPO = "alice/tiny-ddpm"
COMMIT_ROUTE = f"/api/models/{REPO}/commit/"

# Like the end of a training run with --push_every: a background push is in flight when the final push starts.
FINAL_PUSH = r"""
import signal, sys
signal.signal(signal.SIGTERM, signal.SIG_DFL)  # as in a fresh shell, whatever the test runner set
from ddpm_hf.errors import UserError, exit_with
from ddpm_hf.hub import HubPusher

output_dir, token, endpoint = sys.argv[1:]
hub = HubPusher("alice/tiny-ddpm", token, False, output_dir, endpoint=endpoint, backoff=0.01)
hub.check()
hub.push_in_background(300)  # copies the pipeline into TMPDIR; its commit hangs on the paused server
wait = hub.wait

def announce():
    print("WAITING", flush=True)
    wait()

hub.wait = announce
try:
    hub.push_final(600)
except UserError as error:
    exit_with(error)
"""

# `ddpm-hf push`, with Ctrl-C delivered as a terminal would.
CLI_PUSH = r"""
import signal, sys
signal.signal(signal.SIGINT, signal.default_int_handler)
from ddpm_hf.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _wait_until(condition, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def _start(code: str, args: list[str], env: dict, cwd) -> subprocess.Popen:
    env = dict(env, PYTHONPATH=str(REPO_ROOT) + os.pathsep + env.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, "-c", code, *args], env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_sigterm_during_the_final_push_removes_the_snapshots(hub_server, tmp_path):
    output_dir = make_output_dir(tmp_path / "run")
    temporary = tmp_path / "tmp"
    temporary.mkdir()
    release = hub_server.pause(COMMIT_ROUTE)
    process = _start(FINAL_PUSH, [str(output_dir), hub_server.token, hub_server.url], dict(hub_server.env, TMPDIR=str(temporary)), tmp_path)
    try:
        assert process.stdout.readline().strip() == "WAITING", process.stderr.read()
        _wait_until(lambda: hub_server.requests_to(COMMIT_ROUTE, "POST"))  # the background push is sending its snapshot
        assert list(temporary.iterdir()), "the background push made no snapshot"
        process.send_signal(signal.SIGTERM)
        _, err = process.communicate(timeout=60)
    finally:
        release.set()
        if process.poll() is None:
            process.kill()
            process.wait()
    assert list(temporary.iterdir()) == []
    assert process.returncode == 2, err
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"error: the push to {hub_server.url}/{REPO} was stopped by SIGTERM.")
    assert last.endswith(f"push it again with `ddpm-hf push {output_dir} --repo_id {REPO}`.")


def test_ctrl_c_during_a_push_says_how_to_push_again(hub_server, tmp_path):
    output_dir = make_output_dir(tmp_path / "run")
    release = hub_server.pause(COMMIT_ROUTE)
    args = ["push", str(output_dir), "--repo_id", REPO, "--token", hub_server.token, "--revision", "dev"]
    process = _start(CLI_PUSH, args, hub_server.env, tmp_path)
    try:
        _wait_until(lambda: hub_server.requests_to(COMMIT_ROUTE, "POST") or process.poll() is not None)
        assert process.poll() is None, process.stderr.read()
        process.send_signal(signal.SIGINT)
        _, err = process.communicate(timeout=60)
    finally:
        release.set()
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 2, err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    assert err.strip().splitlines()[-1] == (
        f"error: the push to {hub_server.url}/{REPO} was stopped by Ctrl-C. The local output in {output_dir} is intact; "
        f"push it again with `ddpm-hf push {output_dir} --repo_id {REPO} --revision dev`."
    )
