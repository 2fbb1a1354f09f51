"""The runtime's front door: a command opens its bundle once and checks a request's image budget once; the
engine counts a prompt's positions without encoding; the Model owns what it opened."""

import numpy as np
import pytest
from typer.testing import CliRunner

from llava_edge.cli import app
from llava_edge.errors import UserError
from llava_edge.runtime import ChatSession, Engine, EngineConfig, ImageBudget, Message, Model, SamplingConfig
from llava_edge.runtime import bundle as bundle_module
from test_runtime import EXAMPLES

GREEN = EXAMPLES / "green_triangle.png"
COLOR_Q = "What color is the triangle?\nAnswer the question using a single word or phrase."


@pytest.fixture
def counted(monkeypatch):
    """Counts of manifest reads and image-budget checks while the test runs."""
    counts = {"manifest": 0, "budget": 0}
    read, check = bundle_module.read_manifest, Model.image_budget

    def counting_read(*args, **kwargs):
        counts["manifest"] += 1
        return read(*args, **kwargs)

    def counting_check(self, image_tokens=None):
        counts["budget"] += 1
        return check(self, image_tokens)

    monkeypatch.setattr(bundle_module, "read_manifest", counting_read)
    monkeypatch.setattr(Model, "image_budget", counting_check)
    return counts


@pytest.mark.parametrize("extra", [[], ["--image-tokens", "32"]])
def test_chat_reads_the_manifest_once_and_checks_k_once(counted, extra):
    result = CliRunner().invoke(app, ["chat", str(GREEN), "--prompt", COLOR_Q, "--threads", "1", *extra])
    assert result.exit_code == 0, result.output
    assert counted == {"manifest": 1, "budget": 1}  # the engine's budget, checked when it was made


def test_caption_reads_the_manifest_once(counted, tmp_path):
    out = tmp_path / "out.jsonl"
    result = CliRunner().invoke(app, ["caption", str(EXAMPLES), "--out", str(out), "--threads", "1",
                                      "--image-tokens", "48"])
    assert result.exit_code == 0, result.output
    assert counted["manifest"] == 1 and counted["budget"] == 1
    assert len(out.read_text().splitlines()) == len(list(EXAMPLES.glob("*.png")))


def test_a_request_with_its_own_k_is_checked_once_and_one_without_is_not(counted):
    engine = Engine.open(config=EngineConfig(parallel=2), threads=1)
    engine.start()
    try:
        assert counted == {"manifest": 1, "budget": 1}
        engine.generate([Message("user", COLOR_Q, [GREEN])], SamplingConfig(max_tokens=4)).wait()
        assert counted["budget"] == 1
        engine.generate([Message("user", COLOR_Q, [GREEN])], SamplingConfig(max_tokens=4), 16).wait()
        assert counted["budget"] == 2
    finally:
        engine.close()


def test_one_model_serves_several_engines_and_frees_their_contexts():
    model = Model.open(threads=1)
    chat = ChatSession(model, EngineConfig(n_ctx=256))
    engine = Engine(model, EngineConfig(parallel=2))
    engine.start()
    try:
        chat.set_image(GREEN)
        alone = chat.answer(COLOR_Q).text
        batched = engine.generate([Message("user", COLOR_Q, [GREEN])]).wait().text
        assert alone == batched == "Green"
        assert len(model.decoders) == 2
        engine.close()
        assert len(model.decoders) == 1  # an engine frees its context, not the model
    finally:
        chat.close()
        model.close()
    assert model.decoders == ()


def test_count_positions_is_the_prompt_the_engine_evaluates():
    engine = Engine.open(config=EngineConfig(parallel=1), threads=1)
    engine.start()
    try:
        messages = [Message("system", "Be brief."), Message("user", COLOR_Q, [GREEN])]
        answer = engine.generate(messages, SamplingConfig(max_tokens=2)).wait()
        assert engine.count_positions(messages) == answer.timings.n_prompt_tokens
        assert engine.count_positions(messages, 16) == answer.timings.n_prompt_tokens - 64 + 16
        assert engine.count_positions([Message("user", "no image")]) < 64
        with pytest.raises(UserError, match="unknown message role"):
            engine.count_positions([Message("robot", "hi")])
    finally:
        engine.close()


def test_image_budget_tags_tell_budgets_apart():
    model = Model.open(threads=1)
    try:
        assert model.image_budget() == model.image_budget(64) == ImageBudget(64, None)
        assert model.image_budget(np.int64(8)) == ImageBudget(8, 8) and model.image_budget(8).tag == "-k8"
        assert model.image_budget().tag == ""
        with pytest.raises(UserError, match="from 1 to 64"):
            model.image_budget(65)
    finally:
        model.close()


@pytest.mark.parametrize("n_ctx, message", [(64, "too small: an image alone takes 64"), ("x", "whole number"),
                                            (-5, "--n-ctx -5 is too small")])
def test_context_length_is_checked_by_the_model(n_ctx, message):
    model = Model.open(threads=1)
    try:
        assert model.context_length() == 512 and model.context_length(300) == 300
        with pytest.raises(UserError, match=message):
            model.context_length(n_ctx)
    finally:
        model.close()


def test_the_device_choice_places_the_decoder_and_a_gpu_it_cannot_serve_is_one_note(capsys):
    import llama_cpp

    from llava_edge.runtime import Model
    from llava_edge.runtime.llama_loader import decoder_gpu_layers

    assert decoder_gpu_layers("cpu", gpu_offload=True) == 0
    assert decoder_gpu_layers("auto", gpu_offload=True) == -1 and decoder_gpu_layers("cuda", gpu_offload=True) == -1
    assert decoder_gpu_layers("auto", gpu_offload=False) == 0 and capsys.readouterr().err == ""
    assert decoder_gpu_layers("tensorrt", gpu_offload=False) == 0
    assert decoder_gpu_layers("tensorrt", gpu_offload=False) == 0
    assert capsys.readouterr().err.count("built without GPU offload") == 1  # once per process
    model = Model.open(None, device="auto")
    try:
        assert model.gpu_layers == (-1 if llama_cpp.llama_supports_gpu_offload() else 0)
    finally:
        model.close()
