"""Push a run to the Hugging Face Hub: the pre-flight check, the background pusher, retries and snapshots.

What a push uploads, without the machine's paths, is decided in repo_contents.py; the model card it writes,
README.md, in model_card.py. A push makes the repo's `ALLOWED` files exactly those of the run pushed (an
unconditional run pushed over a conditional one removes `ddpm_class_conditional.py`) and leaves others alone.

An unconditional run's repo stays a stock diffusers repo: `DDPMPipeline.from_pretrained("user/name")` and
`DDIMPipeline.from_pretrained("user/name")` load it with no extra code, and
`DiffusionPipeline.from_pretrained("user/name", custom_pipeline="ddpm_trajectory", trust_remote_code=True)` loads
the trajectory pipeline shipped beside it (diffusers looks for `<custom_pipeline>.py` in the repo and loads it at
the same revision as the weights). A class-conditional run's repo (conditioning.py) loads only with its own
pipeline, `DiffusionPipeline.from_pretrained("user/name", custom_pipeline="ddpm_class_conditional",
trust_remote_code=True)`; stock `DDPMPipeline.from_pretrained` refuses it, and its card says so. Pulling is
diffusers' `from_pretrained` (and `ddpm-hf sample --model user/name`): nothing of this module is needed.

`HubPusher` is what training and `ddpm-hf push` use:

    pusher = HubPusher(repo_id, token, private, output_dir)
    pusher.check()                  # before the first training step: token, repo id, create the repo
    pusher.push_in_background(step) # every --push_every steps, after saving the pipeline: never waits on the network
    pusher.push_final(step)         # at the end: blocking, retried; a failure, Ctrl-C or SIGTERM is a `UserError`

With `space_id`, the pusher also owns the model's Space (space.py): `check` creates it too, before anything is
uploaded, the card links it, and `push_final` pushes it after the model, with the same token and retries.

A background push sends a snapshot of the run folder, so that training may save again while it uploads. Files that
the run's writers replace by a new file (the pipeline: training.save_pipeline's os.replace; training_config.json
and eval.json: run_folder's atomic writer) are hard-linked into it, which costs no copy; a sample grid, which a
resumed run rewrites in place, is copied.
"""

from __future__ import annotations

import argparse
import contextlib
import fnmatch
import json
import logging
import os
import re
import shlex
import shutil
import signal
import tempfile
import threading
import time
import unicodedata
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi, get_token
from huggingface_hub.errors import HfHubHTTPError, HFValidationError
from huggingface_hub.utils import validate_repo_id

from .arguments import existing_folder
from .conditioning import CONDITIONAL_PIPELINE_FILENAME, CONDITIONAL_PIPELINE_NAME
from .errors import UserError
from .model_card import DEFAULT_LICENSE, build_model_card, load_arguments
from .repo_contents import (
    CUSTOM_PIPELINE_FILENAME,
    check_pipeline_folder,
    default_custom_pipeline_file,
    files_to_upload,
    is_allowed,
    is_conditional_folder,
    local_files,
    public_eval,
    public_training_config,
)
from .run_folder import EVAL_FILE, TRAINING_CONFIG, RunFolder
from .space import is_space_file, space_files

logger = logging.getLogger(__name__)

TRANSIENT_STATUS = (408, 429, 500, 502, 503, 504)
DEFAULT_REPO_NAME = "ddpm"  # when nothing of the output folder's name is usable

# What a snapshot may hard-link: files that the run's writers replace by a new file rather than rewrite in place
# (training.save_pipeline moves each part of the pipeline into place with os.replace; run_folder writes the JSON files
# through a temporary file and os.replace). A link keeps the content of the moment; everything else is copied.
REPLACED_NOT_REWRITTEN = ("model_index.json", "unet/*", "scheduler/*", CONDITIONAL_PIPELINE_FILENAME, TRAINING_CONFIG, EVAL_FILE)


def describe_hardware(num_processes: int = 1) -> str:
    """'2 x NVIDIA H100 80GB HBM3', or 'CPU' when no accelerator is visible: for the card's Hardware row."""
    try:
        import torch

        if torch.cuda.is_available():
            return f"{num_processes} x {torch.cuda.get_device_name(0)}"
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return "Apple silicon (MPS)"
    except Exception:  # the card is still useful without it
        pass
    return f"CPU ({num_processes} process{'es' if num_processes > 1 else ''})"


# ---- errors ---------------------------------------------------------------------------------------


def _causes(error: BaseException):
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        yield error
        error = error.__cause__ or error.__context__


def is_transient(error: BaseException) -> bool:
    """A 408/429/5xx answer or a network failure (connection refused/reset, timeout): worth retrying."""
    for e in _causes(error):
        if isinstance(e, HfHubHTTPError) and e.response is not None:
            return e.response.status_code in TRANSIENT_STATUS
        if isinstance(e, (ConnectionError, TimeoutError)):
            return True
        # The HTTP library's network errors (httpx's TransportError, requests' ConnectionError/Timeout).
        if any(c.__name__ in ("TransportError", "ConnectionError", "Timeout", "TimeoutException") for c in type(e).__mro__):
            return True
    return False


def _status(error: BaseException) -> int | None:
    for e in _causes(error):
        if isinstance(e, HfHubHTTPError) and e.response is not None:
            return e.response.status_code
    return None


def _describe(error: BaseException) -> str:
    """One line about what went wrong, for messages."""
    for e in _causes(error):
        if isinstance(e, HfHubHTTPError) and e.response is not None:
            detail = e.server_message or str(e).strip().splitlines()[0]
            return f"HTTP {e.response.status_code} from {e.response.request.method} {e.response.url}: {' '.join(detail.split())}"
    return f"{type(error).__name__}: {' '.join(str(error).split())}"


# ---- pushing --------------------------------------------------------------------------------------


def default_repo_name(output_dir: str | os.PathLike) -> str:
    """A valid repo name from the output folder's name: "my run (v2)" -> "my-run-v2".

    Letters are reduced to ASCII, every other run of characters the Hub refuses becomes one '-', '--' and '..'
    are collapsed, and the ends are trimmed; "ddpm" when nothing is left.
    """
    name = unicodedata.normalize("NFKD", Path(output_dir).resolve().name).encode("ascii", "ignore").decode()
    name = re.sub(r"[^A-Za-z0-9_.-]+", "-", name)
    name = re.sub(r"-{2,}", "-", re.sub(r"\.{2,}", ".", name))
    name = name[:96].strip("-._")
    if name.endswith(".git"):
        name = name[: -len(".git")].strip("-._")
    return name or DEFAULT_REPO_NAME


class _Terminated(BaseException):
    """SIGTERM during a blocking push. Raised in the main thread instead of dying at once, so that `finally`
    removes the snapshot folders (a full pipeline copy each). A BaseException, like KeyboardInterrupt."""


@contextlib.contextmanager
def _sigterm_raises() -> Iterator[None]:
    # Only the main thread may set handlers, and a handler someone else installed (training's graceful stop) wins.
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        yield
        return

    def handle(signum, frame):
        raise _Terminated()

    signal.signal(signal.SIGTERM, handle)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _snapshot_file(source: Path, target: Path, link: bool) -> None:
    """Put `source` at `target`: a hard link when `link` (no copy: the link keeps this content when the writer
    replaces the file), else, or where the file system gives no link (another device, no hard links), a copy."""
    if link:
        try:
            os.link(source, target)
            return
        except OSError:
            pass
    shutil.copyfile(source, target)


@dataclass
class _Upload:
    """What one push sends: repo path -> local file or content. `folder` is a snapshot to delete afterwards."""

    step: int | None
    contents: dict[str, Path | bytes]
    folder: Path | None = None

    def cleanup(self) -> None:
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)
            self.folder = None


DEFAULT_PUSH_RETRIES = 5  # 2 + 4 + 8 + 16 + 32 s: a minute of a flaky network or a Hub hiccup


def push_retries() -> int:
    """How often a failed final push is retried: `DDPM_HF_PUSH_RETRIES` (a whole number >= 0), else 5."""
    value = os.environ.get("DDPM_HF_PUSH_RETRIES", "").strip()
    if not value:
        return DEFAULT_PUSH_RETRIES
    if not value.isdigit():
        raise UserError(f"DDPM_HF_PUSH_RETRIES={value!r}: give a whole number of retries >= 0, or unset it for {DEFAULT_PUSH_RETRIES}.")
    return int(value)


class HubPusher:
    """Pushes the pipeline in `output_dir` to the Hub repo `repo_id`, with the same token for every call.

    Args:
        repo_id: "user/name" or "org/name"; None: "<your user name>/<output_dir's name made valid>".
        token: a Hub token; None: `HF_TOKEN`, then the token saved by `hf auth login`.
        private: create the repo as private (an existing repo keeps its visibility).
        output_dir: the training run's OUTPUT_DIR.
        revision: the branch to push to (created if missing); None: main.
        commit_message: default "Upload pipeline (step N)".
        hardware: free text for the model card, e.g. `describe_hardware(accelerator.num_processes)`.
        license: the `license` of the card's metadata.
        endpoint: the Hub URL; None: `HF_ENDPOINT` or https://huggingface.co.
        max_retries, backoff: the final push retries transient errors `max_retries` times (None:
            `DDPM_HF_PUSH_RETRIES`, else 5), waiting `backoff`, 2 * `backoff`, 4 * `backoff`... seconds.
        custom_pipeline_file: the custom pipeline uploaded as `ddpm_trajectory.py`; None: the package's. A
            class-conditional run's `ddpm_class_conditional.py` always comes from the package (`conditional_pipeline_file`).
        command: "training" (train_ddpm.py --push_to_hub) or "push" (`ddpm-hf push`): what error messages advise.
        repo_flag, token_flag: the option names that error messages tell the user to change; None: those of `command`.
        space_id: "user/name" of a Gradio Space that shows the model (space.py), pushed after it; None: no Space.
    """

    def __init__(
        self,
        repo_id: str | None,
        token: str | None,
        private: bool,
        output_dir: str | os.PathLike,
        *,
        revision: str | None = None,
        commit_message: str | None = None,
        hardware: str | None = None,
        license: str = DEFAULT_LICENSE,
        endpoint: str | None = None,
        max_retries: int | None = None,
        backoff: float = 2.0,
        custom_pipeline_file: str | os.PathLike | None = None,
        command: str = "training",
        repo_flag: str | None = None,
        token_flag: str | None = None,
        space_id: str | None = None,
    ):
        if command not in ("training", "push"):
            raise ValueError(f"command must be 'training' or 'push', not {command!r}")
        self.repo_id = repo_id
        self.token = token
        self.private = private
        self.output_dir = Path(output_dir)
        self.revision = revision or "main"
        self.commit_message = commit_message
        self.hardware = hardware
        self.license = license
        self.max_retries = push_retries() if max_retries is None else max_retries
        self.backoff = backoff
        self.command = command
        self.repo_flag = repo_flag or ("--repo_id" if command == "push" else "--hub_model_id")
        self.token_flag = token_flag or ("--token" if command == "push" else "--hub_token")
        self.space_id = space_id
        self.custom_pipeline_file = Path(custom_pipeline_file) if custom_pipeline_file is not None else default_custom_pipeline_file()
        if self.custom_pipeline_file is None:
            logger.warning(f"{CUSTOM_PIPELINE_FILENAME} was not found in the package: the push will not include the custom pipeline.")
        self.api = HfApi(endpoint=endpoint)
        self.user: str | None = None
        self._token_source = "given with " + self.token_flag if token else None
        self._checked = False
        self._cond = threading.Condition()
        self._pending: _Upload | None = None
        self._worker: threading.Thread | None = None
        # Every snapshot of a background push lives in this one temporary folder, so that one rmtree removes them all.
        self._snapshots: tempfile.TemporaryDirectory | None = None

    @property
    def url(self) -> str:
        return f"{self.api.endpoint}/{self.repo_id}"

    def retry_command(self) -> str:
        """The `ddpm-hf push` command that pushes `output_dir` again, for messages."""
        command = ["ddpm-hf", "push", str(self.output_dir)]
        if self.repo_id is not None:
            command += ["--repo_id", self.repo_id]
        if self.revision != "main":
            command += ["--revision", self.revision]
        if self.license != DEFAULT_LICENSE:
            command += ["--license", self.license]
        if self.space_id is not None:
            command += ["--space", self.space_id]
        return shlex.join(command)

    # ---- before training ------------------------------------------------------------------------
    def check(self) -> str:
        """Resolve the token, reject a bad one, validate the repo id and create the repo (or check it exists).

        Takes seconds; call it before the first training step. Returns the full repo id. Raises `UserError`.
        """
        if self.token is None:
            self.token = get_token()
            if self.token is None:
                raise UserError(
                    f"pushing to the Hub needs a token with write access: pass {self.token_flag}, set HF_TOKEN, "
                    "or run `hf auth login` (create a token at https://huggingface.co/settings/tokens)."
                )
            self._token_source = "from HF_TOKEN" if os.environ.get("HF_TOKEN") == self.token else "saved by `hf auth login`"

        whoami = self._check_call(lambda: self.api.whoami(token=self.token), "checking the token")
        self.user = whoami["name"]
        namespaces = [self.user] + [org["name"] for org in whoami.get("orgs", []) if "name" in org]
        role = ((whoami.get("auth") or {}).get("accessToken") or {}).get("role")
        if role == "read":
            raise UserError(
                f"the token {self._token_source} is read-only, so it cannot push. Create a token with write access at "
                f"https://huggingface.co/settings/tokens and pass it with {self.token_flag} or HF_TOKEN."
            )

        self.repo_id = self._full_repo_id(self.repo_id or default_repo_name(self.output_dir), self.repo_flag, namespaces)
        if self.space_id is not None:
            self.space_id = self._full_repo_id(self.space_id, "--space", namespaces)

        self._check_call(
            lambda: self.api.create_repo(self.repo_id, token=self.token, private=self.private, exist_ok=True),
            f"creating {self.repo_id}",
        )
        info = self._check_call(lambda: self.api.repo_info(self.repo_id, token=self.token), f"reading {self.repo_id}")
        if self.private and not info.private:
            logger.warning(
                f"{self.repo_id} already exists and is public: --private does not change it. Make it private in the repo's settings on the Hub if you meant to."
            )
        if self.revision != "main":
            self._check_call(
                lambda: self.api.create_branch(self.repo_id, branch=self.revision, token=self.token, exist_ok=True),
                f"creating the branch {self.revision}",
            )
        if self.space_id is not None:
            self._check_call(
                lambda: self.api.create_repo(self.space_id, token=self.token, private=self.private, repo_type="space", space_sdk="gradio", exist_ok=True),
                f"creating the Space {self.space_id}",
            )
        self._checked = True
        logger.info(f"Hub: pushing to {self.url} as {self.user}.")
        return self.repo_id

    def _full_repo_id(self, repo_id: str, flag: str, namespaces: list[str]) -> str:
        """`repo_id` as "namespace/name" ("name" goes in the user's namespace), checked to be valid and writable."""
        if "/" not in repo_id:
            repo_id = f"{self.user}/{repo_id}"
        try:
            validate_repo_id(repo_id)
            if repo_id.count("/") != 1:
                raise HFValidationError("it must be 'namespace/name'")
        except HFValidationError as e:
            raise UserError(
                f"{flag} {repo_id!r} is not a valid repo id ({' '.join(str(e).split())}). "
                f"Use 'user/name', e.g. '{self.user}/ddpm-cifar10': letters, digits, '-', '_' and '.', at most 96 characters."
            ) from None
        namespace = repo_id.split("/")[0]
        if namespace not in namespaces:
            raise UserError(
                f"{flag} {repo_id}: the token {self._token_source} belongs to '{self.user}', who cannot "
                f"push to the namespace '{namespace}' (yours: {', '.join(namespaces)}). Use {flag} "
                f"{self.user}/{repo_id.split('/')[1]}, or a token of an account that may write to '{namespace}'."
            )
        return repo_id

    def _check_call(self, fn: Callable[[], Any], what: str):
        # A check should fail in seconds: two retries at most for a network blip.
        return self._with_retries(fn, what, self._explain_check, retries=min(self.max_retries, 2))

    def _explain_check(self, error: BaseException) -> UserError:
        status = _status(error)
        if status == 401:
            return UserError(
                f"the Hub rejected the token {self._token_source} ({_describe(error)}). Pass a valid token with "
                f"{self.token_flag}, set HF_TOKEN, or run `hf auth login`; create one with write access at "
                "https://huggingface.co/settings/tokens."
            )
        if status in (403, 404):
            return UserError(
                f"'{self.user}' may not create or write to {self.repo_id} ({_describe(error)}). Choose a repo you own "
                f"with {self.repo_flag} {self.user}/NAME, or use a token with write access to it."
            )
        if status == 400:
            return UserError(f"the Hub refused {self.repo_flag} {self.repo_id} ({_describe(error)}). Choose another name.")
        # What to do meanwhile depends on the command: a training run can go on without the Hub, a push cannot.
        if self.command == "push":
            later = f"then run `{self.retry_command()}` again"
        else:
            later = "or train without --push_to_hub and push later with `ddpm-hf push OUTPUT_DIR`"
        if is_transient(error):
            return UserError(f"cannot reach the Hub at {self.api.endpoint} ({_describe(error)}). Check the network (and HF_ENDPOINT), {later}.")
        return UserError(f"the Hub check for {self.repo_id or 'the repo'} failed ({_describe(error)}). Fix the cause, {later}.")

    # ---- pushes ---------------------------------------------------------------------------------
    def push_in_background(self, step: int) -> None:
        """Snapshot the pipeline as it is now and push it from a worker thread; returns at once.

        Call it after the pipeline (and sample grid) of `step` are saved. The files are copied first, so training
        may overwrite them while the upload runs. If a push is still running, this one waits and replaces any
        older waiting one. A failure is logged as a warning and training goes on: the next push sends everything.
        """
        self._require_checked()
        try:
            upload = self._snapshot(step)
        except (UserError, OSError) as error:
            logger.warning(f"Hub: cannot push step {step} ({error}). Training goes on.")
            return
        with self._cond:
            if self._pending is not None:
                logger.info(f"Hub: skipping the push of step {self._pending.step}, superseded by step {step}.")
                self._pending.cleanup()
            self._pending = upload
            if self._worker is None:
                self._worker = threading.Thread(target=self._work, name="hub-push", daemon=True)
                self._worker.start()

    def wait(self) -> None:
        """Block until background pushes are done."""
        with self._cond:
            while self._worker is not None:
                self._cond.wait()

    def push_final(self, step: int | None = None) -> str:
        """Push the pipeline in `output_dir` and wait for it, retrying transient errors; returns the commit sha.

        Waits for background pushes first. Raises `UserError` when the push fails for good, or is stopped by Ctrl-C
        or SIGTERM: the local output is untouched and the message says how to push it again. The snapshots of
        background pushes are gone when it returns or raises.
        """
        with _sigterm_raises():
            try:
                self.wait()
                if not self._checked:
                    self.check()
                check_pipeline_folder(self.output_dir)
                upload = _Upload(step, self._contents(self.output_dir, step))
                target = self.url
                try:
                    sha = self._with_retries(lambda: self._commit(upload), f"pushing to {self.repo_id}", None)
                    if self.space_id is not None:
                        target = f"{self.api.endpoint}/spaces/{self.space_id}"
                        space = _Upload(None, space_files(self.output_dir, self.repo_id, self.revision, self.license))
                        self._with_retries(lambda: self._commit(space, repo_type="space"), f"pushing the Space {self.space_id}", None)
                    return sha
                except UserError:
                    raise
                except Exception as error:
                    raise UserError(
                        f"pushing to {target} failed ({_describe(error)}). The local output in {self.output_dir} is "
                        f"intact; push it again with `{self.retry_command()}`."
                    ) from error
            except (KeyboardInterrupt, _Terminated) as stop:
                # One line that says how to finish the job, instead of a traceback.
                by = "Ctrl-C" if isinstance(stop, KeyboardInterrupt) else "SIGTERM"
                raise UserError(
                    f"the push to {self.url} was stopped by {by}. The local output in {self.output_dir} is intact; push it again with `{self.retry_command()}`."
                ) from None
            finally:
                self._discard_snapshots()

    # ---- internals ------------------------------------------------------------------------------
    def _require_checked(self) -> None:
        if not self._checked:
            raise RuntimeError("HubPusher.check() must run (before training starts) before pushing.")

    def _contents(self, folder: Path, step: int | None) -> dict[str, Path | bytes]:
        """Repo path -> file or content of a push of `folder` (the output folder or a snapshot of it)."""
        contents: dict[str, Path | bytes] = dict(local_files(folder, self.custom_pipeline_file))
        run = RunFolder(folder)
        # The JSON files go up without the machine's paths; paths are judged from where the run lives.
        for name, read, public in ((TRAINING_CONFIG, run.read_training_config, public_training_config), (EVAL_FILE, run.read_eval, public_eval)):
            if name in contents:
                values = read()
                if values:
                    contents[name] = (json.dumps(public(values, self.output_dir), indent=2, sort_keys=True) + "\n").encode()
                else:
                    logger.warning(f"Hub: {name} in {folder} is not a JSON object; it is not uploaded.")
                    del contents[name]
        card = build_model_card(
            folder,
            self.repo_id,
            step=step,
            hardware=self.hardware,
            license=self.license,
            custom_pipeline=self.custom_pipeline_file is not None,
            revision=self.revision,
            run_dir=self.output_dir,
            space_id=self.space_id,
        )
        contents["README.md"] = str(card).encode()
        return contents

    def _snapshot(self, step: int) -> _Upload:
        check_pipeline_folder(self.output_dir)
        with self._cond:
            if self._snapshots is None:
                self._snapshots = tempfile.TemporaryDirectory(prefix="ddpm-hf-push-")
            root = Path(tempfile.mkdtemp(prefix=f"step-{step}-", dir=self._snapshots.name))
        upload = _Upload(step, {}, root)
        try:
            for repo_path, source in local_files(self.output_dir, None).items():
                target = root / repo_path
                target.parent.mkdir(parents=True, exist_ok=True)
                replaced = source == self.output_dir / repo_path and any(fnmatch.fnmatchcase(repo_path, p) for p in REPLACED_NOT_REWRITTEN)
                _snapshot_file(source, target, link=replaced)
            upload.contents = self._contents(root, step)
        except BaseException:
            upload.cleanup()
            raise
        return upload

    def _discard_snapshots(self) -> None:
        """Remove every snapshot, the one a background push may still be sending included (it then fails)."""
        with self._cond:
            if self._pending is not None:
                self._pending.cleanup()
                self._pending = None
            snapshots, self._snapshots = self._snapshots, None
        if snapshots is not None:
            snapshots.cleanup()

    def _work(self) -> None:
        while True:
            with self._cond:
                upload, self._pending = self._pending, None
                if upload is None:
                    self._worker = None
                    self._cond.notify_all()
                    return
            try:
                self._commit(upload)
            except Exception as error:
                logger.warning(
                    f"Hub: the background push of step {upload.step} to {self.repo_id} failed ({_describe(error)}). "
                    "Training goes on; the next push sends everything again."
                )
            finally:
                upload.cleanup()

    def _commit(self, upload: _Upload, repo_type: str = "model") -> str:
        operations = [
            CommitOperationAdd(path_in_repo=path, path_or_fileobj=value if isinstance(value, bytes) else str(value))
            for path, value in sorted(upload.contents.items())
        ]
        # The repo's ALLOWED files become exactly this push's: an older grid, or the eval.json and
        # training_config.json of another run, would describe other weights. Files added by hand stay.
        # A Space's files (space.py) likewise; it runs its main branch.
        repo_id, revision, managed = (self.repo_id, self.revision, is_allowed) if repo_type == "model" else (self.space_id, "main", is_space_file)
        remote = self.api.list_repo_files(repo_id, revision=revision, repo_type=repo_type, token=self.token)
        operations += [CommitOperationDelete(path_in_repo=path) for path in remote if managed(path) and path not in upload.contents]
        if repo_type == "space":
            message = f"Space of {self.repo_id}"
        else:
            message = self.commit_message or (f"Upload pipeline (step {upload.step})" if upload.step is not None else "Upload pipeline")
        info = self.api.create_commit(repo_id, operations, commit_message=message, revision=revision, repo_type=repo_type, token=self.token)
        logger.info(f"Hub: pushed {'the Space' if repo_type == 'space' else f'step {upload.step}'} to {repo_id} ({info.oid[:7]}).")
        return info.oid

    def _with_retries(self, fn: Callable[[], Any], what: str, explain: Callable[[BaseException], UserError] | None, retries: int | None = None):
        """Run `fn`, retrying transient errors with exponential backoff; `explain` turns a final error into a UserError."""
        retries = self.max_retries if retries is None else retries
        delay = self.backoff
        for attempt in range(retries + 1):
            try:
                return fn()
            except Exception as error:
                if not is_transient(error) or attempt == retries:
                    if explain is not None:
                        raise explain(error) from error
                    raise
                logger.warning(f"Hub: {what} failed ({_describe(error)}); retry {attempt + 1}/{retries} in {delay:g}s.")
                time.sleep(delay)
                delay *= 2


# ---- ddpm-hf push ---------------------------------------------------------------------------------


def run_push(args: argparse.Namespace) -> None:
    check_pipeline_folder(args.output_dir)
    pusher = HubPusher(
        args.repo_id,
        args.token,
        args.private,
        args.output_dir,
        revision=args.revision,
        commit_message=args.commit_message,
        license=args.license,
        command="push",
        space_id=args.space,
    )
    try:
        pusher.check()
    except KeyboardInterrupt:
        raise UserError(f"stopped by Ctrl-C before anything was pushed. Push with `{pusher.retry_command()}`.") from None
    sha = pusher.push_final()
    load = load_arguments(pusher.repo_id, pusher.revision)
    cli_revision = f" --revision {pusher.revision}" if pusher.revision != "main" else ""
    print(
        f"Pushed {args.output_dir} to {pusher.url} (revision {pusher.revision}, commit {sha[:7]}): {len(files_to_upload(args.output_dir, pusher.custom_pipeline_file))} files."
    )
    if is_conditional_folder(args.output_dir):
        print(
            f'Load it with DiffusionPipeline.from_pretrained({load}, custom_pipeline="{CONDITIONAL_PIPELINE_NAME}", trust_remote_code=True) '
            f"or `ddpm-hf sample --model {pusher.repo_id}{cli_revision} --class_labels ... --guidance_scale 2.0`."
        )
    else:
        print(f"Load it with DDPMPipeline.from_pretrained({load}) or `ddpm-hf sample --model {pusher.repo_id}{cli_revision}`.")
    if pusher.space_id is not None:
        print(f"Its Space: {pusher.api.endpoint}/spaces/{pusher.space_id} (the Hub builds and starts it in a few minutes).")


def add_cli(subparsers) -> None:
    parser = subparsers.add_parser(
        "push",
        help="Upload a finished run's pipeline, model card and latest samples to the Hugging Face Hub.",
        description=(
            "Upload OUTPUT_DIR to a Hub model repo: model_index.json, unet/, scheduler/, a model card (README.md), the "
            "latest sample grid, training_config.json, eval.json and the custom pipeline ddpm_trajectory.py (and, for a "
            "class-conditional run, ddpm_class_conditional.py), without the machine's paths. Those files of an earlier push that this one does not have are deleted from the repo. "
            "Checkpoints and logs are never uploaded."
        ),
    )
    parser.add_argument("output_dir", metavar="OUTPUT_DIR", type=existing_folder, help="The training run's output folder (holds model_index.json).")
    parser.add_argument("--repo_id", default=None, help="Hub repo, 'user/name' (default: your user name / the folder name).")
    parser.add_argument("--private", action="store_true", help="Create the repo as private.")
    parser.add_argument("--token", default=None, help="Hub token with write access (default: HF_TOKEN or `hf auth login`).")
    parser.add_argument("--revision", default=None, help="Branch to push to, created if missing (default: main).")
    parser.add_argument("--commit_message", default=None, help="Commit message (default: 'Upload pipeline').")
    parser.add_argument("--license", default=DEFAULT_LICENSE, help=f"License in the model card's metadata (default: {DEFAULT_LICENSE}).")
    parser.add_argument(
        "--space",
        default=None,
        help="Also push a Gradio Space, 'user/name', that samples the model in the browser (the `ddpm-hf demo` page); the card links it.",
    )
    parser.set_defaults(func=run_push)
