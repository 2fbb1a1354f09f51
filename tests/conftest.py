"""Shared fixtures: a tiny SentencePiece BPE model with LLaMA's settings (and the transformers tokenizer on it,
the oracle of LLaVA's tokenization), one real `llava-edge serve` per server test module (started with the
module's SERVE_ARGS) with the official clients pointed at it, the folder of images that `caption` runs on,
and a stand-in for the chat's session."""

import contextlib
import shutil
from pathlib import Path

import pytest

from spm_fixture import load_hf_llama_tokenizer, load_spm, train_tiny_spm

ROOT = Path(__file__).parents[1]


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("spm")
    train_tiny_spm(directory)
    return directory


@pytest.fixture(scope="session")
def sp(model_dir):
    return load_spm(model_dir / "tokenizer.model")


@pytest.fixture(scope="session")
def hf_tokenizer(model_dir):
    pytest.importorskip("transformers")
    return load_hf_llama_tokenizer(model_dir)


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


@pytest.fixture(scope="session")
def caption_folder(tmp_path_factory):
    """What `caption` runs on: the examples, the test images (PNG, JPEG, RGBA, 16-bit, palette, grey), a byte copy
    of the green triangle and a truncated PNG."""
    d = tmp_path_factory.mktemp("photos")
    for p in [*sorted((ROOT / "examples").glob("*.png")), *sorted(f for f in (ROOT / "tests" / "data").iterdir()
                                                                  if f.is_file())]:
        shutil.copy(p, d / p.name)
    shutil.copy(ROOT / "examples" / "green_triangle.png", d / "zz_copy.png")
    (d / "broken.png").write_bytes((ROOT / "examples" / "red_circle_blue_triangle.png").read_bytes()[:400])
    return d


class FakeChatSession:
    """Stands in for the ChatSession in the REPL's tests: keeps the images set and the questions asked, and
    answers `answer`. Ctrl-C is played by KeyboardInterrupt: while the n-th image loads (n in `stop_image`), or
    after the first piece of the n-th answer (n in `stop_answer`)."""

    def __init__(self, answer: str = "answer", stop_image=(), stop_answer=()):
        self.images, self.asked = [], []
        self.answer, self.stop_image, self.stop_answer = answer, set(stop_image), set(stop_answer)

    def while_typing(self):
        return contextlib.nullcontext()

    def set_image(self, image):
        self.images.append(image)
        if len(self.images) in self.stop_image:
            raise KeyboardInterrupt

    def ask(self, question, sampling):
        self.asked.append(question)
        yield self.answer
        if len(self.asked) in self.stop_answer:
            raise KeyboardInterrupt


@pytest.fixture
def fake_session():
    """FakeChatSession, to be made with the stops a test plays."""
    return FakeChatSession
