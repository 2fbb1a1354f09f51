"""Shared fixtures: a tiny SentencePiece BPE model with LLaMA's settings, and one real `llava-edge serve` per
server test module (started with the module's SERVE_ARGS) with the official clients pointed at it."""

import pytest

from spm_fixture import load_spm, train_tiny_spm


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("spm")
    train_tiny_spm(directory)
    return directory


@pytest.fixture(scope="session")
def sp(model_dir):
    return load_spm(model_dir / "tokenizer.model")


@pytest.fixture(scope="module")
def server(request):
    """The module's server. SERVE_ARGS is a tuple of `serve` arguments, or a function of pytest's request that
    returns one (for arguments that come from other fixtures). It must exit 0 when stopped."""
    from server_process import ServerProcess

    args = getattr(request.module, "SERVE_ARGS", ())
    s = ServerProcess(*(args(request) if callable(args) else args))
    yield s
    assert s.stop() == 0, s.stderr()


@pytest.fixture(scope="module")
def openai_client(server):
    import openai

    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def ollama_client(server):
    import ollama

    return ollama.Client(host=server.url, timeout=120)
