import contextlib
import os

import pytest


def pytest_configure(config):
    """On pytest-xdist's workers (setup.cfg runs two), one intra-op thread per worker and per subprocess it starts:
    each worker has one of the two cores, and torch's default of a thread per core then makes two threads fight over
    each core, OpenMP's busy-waiting slowing both several-fold (a 30 s learning test took 440 s)."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        import torch

        os.environ["OMP_NUM_THREADS"] = "1"
        torch.set_num_threads(1)


@contextlib.contextmanager
def _one_intra_op_thread():
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture
def one_thread():
    """One intra-op thread for a test: on tiny tensors it is as fast, and two threads fighting over two busy
    cores are several times slower."""
    with _one_intra_op_thread():
        yield


@pytest.fixture(scope="module")
def one_thread_per_module():
    """`one_thread` for a whole module, its module-scoped fixtures included."""
    with _one_intra_op_thread():
        yield


@pytest.fixture
def hub_server(monkeypatch, tmp_path):
    """A local Hub (tests/hub_server.py) on 127.0.0.1, empty, for one test.

    Gives the `HubServer` with `.url`, `.user` and `.token` (a write token of `.user`), plus `.read_token` (read-only,
    same user), `.other_user`/`.other_token` (another account) and `.env` (the environment a subprocess needs to use
    it: HF_ENDPOINT, HF_HUB_DISABLE_XET, HF_HUB_DISABLE_TELEMETRY, a fresh HF_HOME, no HF_TOKEN).

    In this process, the real token, login and Xet are switched off so that nothing can reach the real Hub; pass
    `endpoint=hub_server.url` to `HfApi`/`HubPusher`.
    """
    import os

    import huggingface_hub.constants as constants
    from hub_server import HubServer

    tokens = {
        "hf_test_alice_write": ("alice", "write"),
        "hf_test_alice_read": ("alice", "read"),
        "hf_test_bob_write": ("bob", "write"),
    }
    server = HubServer(tokens=tokens, orgs={"ddpm-org": {"alice"}}).start()
    server.user, server.token, server.read_token = "alice", "hf_test_alice_write", "hf_test_alice_read"
    server.other_user, server.other_token = "bob", "hf_test_bob_write"

    hf_home = tmp_path / "hf_home"
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(hf_home / "token"))
    monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", str(hf_home / "stored_tokens"))
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_TELEMETRY", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hf_home / "hub"))

    env = {k: v for k, v in os.environ.items() if k not in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_OFFLINE")}
    env.update(
        HF_ENDPOINT=server.url,
        HF_HUB_DISABLE_XET="1",
        HF_HUB_DISABLE_TELEMETRY="1",
        HF_HOME=str(hf_home),
        DIFFUSERS_VERBOSITY="error",
    )
    server.env = env
    try:
        yield server
    finally:
        server.stop()


# ---- evaluation helpers -------------------------------------------------------------------------


@pytest.fixture
def fid_stand_in(tmp_path, monkeypatch):
    """The FID Inception network replaced by tests/inception_stand_in.py (for tests of what surrounds it), and a
    statistics cache (DDPM_HF_CACHE) of the test's own."""
    from inception_stand_in import stand_in_inception

    from ddpm_hf import fid

    monkeypatch.setattr(fid, "load_inception", stand_in_inception)
    monkeypatch.setenv("DDPM_HF_CACHE", str(tmp_path / "cache"))


# ---- training helpers ---------------------------------------------------------------------------

REPO_ROOT = __import__("os").path.dirname(__import__("os").path.dirname(__import__("os").path.abspath(__file__)))
SHARED_CIFAR10 = __import__("os").path.join(REPO_ROOT, "..", "shared", "data", "cifar10")

# A UNet small enough for seconds of CPU training: two levels, no attention.
MICRO_UNET = dict(
    in_channels=3,
    out_channels=3,
    layers_per_block=1,
    block_out_channels=[32, 64],
    down_block_types=["DownBlock2D", "DownBlock2D"],
    up_block_types=["UpBlock2D", "UpBlock2D"],
    norm_num_groups=8,
)


@pytest.fixture
def micro_unet_config(tmp_path):
    """Path of a JSON file describing MICRO_UNET, for --model_config."""
    import json

    path = tmp_path / "micro_unet.json"
    path.write_text(json.dumps(MICRO_UNET))
    return str(path)


@pytest.fixture
def train_in_process():
    """Run ddpm_hf.training.train on a config built from keyword options, resetting Accelerate's singletons."""
    from accelerate.state import AcceleratorState, GradientState

    from ddpm_hf.config import config_from_dict
    from ddpm_hf.training import train

    def run(**options):
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
        return train(config_from_dict(options))

    yield run
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def offline_env(**extra) -> dict:
    """The environment of a subprocess that runs our commands: offline (no Hub), one thread per process, this
    checkout importable, no Hub token; `extra` adds variables (DDPM_HF_CACHE=...)."""
    import os

    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONPATH=REPO_ROOT, **extra)
    env.pop("HF_TOKEN", None)
    return env


def as_flags(options: dict) -> list[str]:
    """{"max_train_steps": 4, ...} -> ["--max_train_steps", "4", ...]: options as a command line."""
    return [word for name, value in options.items() for word in (f"--{name}", str(value))]


def quick_options(output_dir, model_config, **overrides):
    """Options of a few-second run on the built-in CIFAR-10 subset at 16x16."""
    options = dict(
        preset="quickstart",
        output_dir=str(output_dir),
        model_config=model_config,
        resolution=16,
        max_train_samples=64,
        train_batch_size=8,
        max_train_steps=4,
        lr_warmup_steps=2,
        logging_steps=2,
        sample_every=0,
        checkpoint_every=0,
        num_sample_images=4,
        sample_steps=5,
    )
    options.update(overrides)
    return options


@pytest.fixture(autouse=True, scope="session")
def _private_decode_cache(tmp_path_factory):
    """Decoded datasets are cached per user (ddpm_hf/data.py); tests keep theirs in a temporary folder."""
    import os

    previous = os.environ.get("DDPM_HF_CACHE")
    os.environ["DDPM_HF_CACHE"] = str(tmp_path_factory.mktemp("ddpm_hf_cache"))
    yield
    if previous is None:
        os.environ.pop("DDPM_HF_CACHE", None)
    else:
        os.environ["DDPM_HF_CACHE"] = previous
