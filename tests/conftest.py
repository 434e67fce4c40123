import pytest


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
