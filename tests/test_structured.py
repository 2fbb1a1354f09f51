"""Structured answers in the engine (demo bundle): answers held to JSON mode and to schemas, per slot, mixed with
free answers in one batch; forced tokens decoded together change no greedy answer; the log-probabilities are
llama-cpp-python's own; bad formats are one line before any image encode."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import numpy as np
import pytest

from llava_edge.errors import UserError
from llava_edge.runtime import Message
from llava_edge.runtime.sampling import SamplingConfig
from llava_edge.runtime.token_choice import log_softmax
from test_engine import engine  # noqa: F401  (the fixture: the demo bundle, 4 slots, stepping on its thread)

EXAMPLES = Path(__file__).parents[1] / "examples"
IMAGES = sorted(EXAMPLES.glob("*.png"))
SUFFIX = "\nAnswer the question using a single word or phrase."
SHAPES = {"type": "object", "properties": {
    "shape": {"enum": ["circle", "square", "triangle"]},
    "color": {"enum": ["red", "green", "blue", "yellow"]},
    "count": {"type": "integer", "minimum": 1, "maximum": 3}},
    "required": ["shape", "color", "count"], "additionalProperties": False}
FREE = [("Describe the image.", None), ("How many shapes are there?" + SUFFIX, None)]
HELD = [("Describe the image as JSON.", SHAPES), ("Describe the image.", "json")]


def ask(engine, image, question, fmt=None, **kw):
    sampling = SamplingConfig(max_tokens=kw.pop("max_tokens", 48), format=fmt, **kw)
    return engine.generate([Message("user", question, [image.read_bytes()])], sampling)


def check(answer, fmt) -> None:
    value = json.loads(answer.text)
    if fmt == "json":
        assert isinstance(value, dict)
    else:
        jsonschema.validate(value, fmt)


def test_held_answers_parse_and_free_answers_equal_the_serial_ones_in_one_batch(engine):
    serial = {(i.name, q): "".join(ask(engine, i, q)) for i in IMAGES[:2] for q, _ in FREE}
    gens = {(i.name, q, json.dumps(f)): ask(engine, i, q, f) for i in IMAGES[:2] for q, f in FREE + HELD}
    for (name, q, f), gen in gens.items():
        answer = gen.wait()
        fmt = json.loads(f)
        if fmt is None:
            assert answer.text == serial[name, q]
        else:
            assert answer.finish_reason == "stop", answer
            check(answer, fmt)


def test_forced_tokens_decoded_together_change_no_greedy_answer(engine):
    for image in IMAGES:
        together = ask(engine, image, *HELD[0]).wait()
        alone = ask(engine, image, *HELD[0], forced_together=False).wait()
        assert together.text == alone.text and together.finish_reason == alone.finish_reason == "stop"
        check(together, SHAPES)


def test_max_tokens_mid_object_ends_as_length(engine):
    answer = ask(engine, IMAGES[0], *HELD[0], max_tokens=3).wait()
    assert answer.finish_reason == "length"
    with pytest.raises(json.JSONDecodeError):
        json.loads(answer.text)


@pytest.mark.parametrize("fmt, match", [
    ("yaml", "format must be \"json\" or a JSON schema"),
    (["json"], "format must be"),
    ({"type": "object", "properties": {"a": {"type": "string", "pattern": "(?<=a)b"}}}, "not supported"),
    ({"type": 5}, "\"type\" must be"),
    ({"anyOf": json.loads("[" * 40 + "]" * 40)}, "nests deeper"),
    ({"enum": ["x" * 70000]}, "bytes; at most"),
])
def test_bad_formats_are_one_line_before_any_image_encode(engine, fmt, match):
    encodes = engine.vision.encode

    def no_encode(*a, **k):
        raise AssertionError("encoded an image for a bad format")

    engine.vision.encode = no_encode
    try:
        with pytest.raises(UserError, match=match):
            ask(engine, IMAGES[-1], "Describe the image.", fmt)
    finally:
        engine.vision.encode = encodes


HOSTILE = [{"$ref": "#"}, {"type": "object", "properties": {"a": {"$ref": "#"}}, "required": ["a"]},
           {"type": "string", "pattern": "(a*)*b{1000}{1000}"}, {"type": "string", "minLength": 10 ** 9},
           {"type": "array", "minItems": 10 ** 6, "items": {"type": "integer"}}, {"$ref": "#/nope"}]


def test_hostile_schemas_are_refused_or_answered_and_the_batch_goes_on(engine):
    free = ask(engine, IMAGES[0], "Describe the image.")
    outcomes = []
    for schema in HOSTILE:
        try:
            gen = ask(engine, IMAGES[1], "Describe the image.", schema, max_tokens=16)
            outcomes.append(gen.wait().finish_reason)
            if gen.error is not None:  # the request's own format got stuck: its answer alone ends, with why
                assert gen.error.startswith("the answer's format") and gen.answer.finish_reason == "error"
        except UserError as e:
            outcomes.append(str(e))
    assert outcomes[0] == "the JSON schema is not supported: it admits no JSON value (NoExtensionBias)"
    assert "Pointer '/nope' does not exist" in outcomes[-1]
    assert all(o in ("stop", "length", "error") or o.startswith("the JSON schema") for o in outcomes), outcomes
    assert free.wait().finish_reason == "stop" and free.answer.text == "".join(ask(engine, IMAGES[0],
                                                                                  "Describe the image."))


def test_logprobs_are_llama_cpp_pythons_own_before_the_mask(engine):
    """The oracle: llama-cpp-python's own Llama on the same GGUF (flash attention, as the engine opens it)
    evaluates the prompt, then the answer one token at a time, and the log-softmax of its logits must give the
    engine's numbers. The answer is held to a schema, so its tokens are not the model's likeliest: their
    log-probabilities are far from 0, as they are before the mask."""
    import llama_cpp

    engine.forget()  # the prompt is evaluated whole, as the oracle evaluates it (no prefix kept from before)
    gen = engine.generate([Message("user", "What shapes are there? Answer as JSON.")],
                          SamplingConfig(max_tokens=8, format=SHAPES, logprobs=True, top_logprobs=5))
    gen.wait()
    prompt, answer = list(gen.job.keys), [e.token for e in gen.logprobs]
    assert len(answer) == gen.answer.timings.n_generated == 8
    llm = llama_cpp.Llama(str(engine.bundle.decoder_file), n_ctx=512, logits_all=True, flash_attn=True,
                          n_threads=1, verbose=False)
    llm.eval(prompt)
    for i, entry in enumerate(gen.logprobs):
        lp = log_softmax(np.asarray(llm.scores[llm.n_tokens - 1]))
        assert entry.logprob == pytest.approx(lp[entry.token], abs=1e-3)
        assert np.allclose([v for _, v in entry.top], np.sort(lp)[::-1][:5], atol=1e-3)
        assert entry.top[0][0] == int(np.argmax(lp))
        llm.eval([answer[i]])
    assert min(e.logprob for e in gen.logprobs) < -1  # held to the schema: not what the model would say
    llm.close()


def run_cli(*args):
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "llava_edge.cli", *args, "--threads", "1"], capture_output=True,
                          text=True, timeout=300, cwd=Path(__file__).parents[1])


@pytest.mark.slow
def test_chat_and_caption_take_a_format_and_a_bad_one_is_one_line(tmp_path):
    schema = tmp_path / "shapes.json"
    schema.write_text(json.dumps(SHAPES))
    done = run_cli("chat", str(IMAGES[0]), "--prompt", "Describe the image.", "--format", str(schema))
    assert done.returncode == 0, done.stderr
    jsonschema.validate(json.loads(done.stdout), SHAPES)
    (tmp_path / "bad.json").write_text(json.dumps({"type": "object", "properties": {"a": {"pattern": "(?<=a)"}}}))
    for bad, words in [("bad.json", "the JSON schema is not supported"), ("missing.json", "cannot read"),
                       ("shapes.json-not", "cannot read")]:
        failed = run_cli("chat", str(IMAGES[0]), "--prompt", "Describe the image.", "--format", str(tmp_path / bad))
        assert failed.returncode == 2 and words in failed.stderr and "Traceback" not in failed.stderr
    failed = run_cli("caption", str(IMAGES[0]), "--out", str(tmp_path / "bad.jsonl"), "--format",
                     str(tmp_path / "bad.json"))
    assert failed.returncode == 2 and "the JSON schema is not supported" in failed.stderr, failed.stderr
    out = tmp_path / "out.jsonl"
    for fmt in (str(schema), "json", str(schema)):
        done = run_cli("caption", str(IMAGES[0]), str(IMAGES[1]), "--out", str(out), "--format", fmt)
        assert done.returncode == 0, done.stderr
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(lines) == 4  # the schema's two, json mode's two; the third run found both done
    for line in lines:
        assert line["parsed"] == json.loads(line["answer"]) and line["format"] in (SHAPES, "json")
        if line["format"] == SHAPES:
            jsonschema.validate(line["parsed"], SHAPES)
