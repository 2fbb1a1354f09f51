"""The decoder engine: N sequences in one context give the answers one sequence gives, reuse prefixes,
free cancelled slots, refuse past the queue, and never let bad input reach llama.cpp."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from llava_edge.errors import UserError
from llava_edge.runtime import Engine, EngineBusy, EngineConfig, Message
from llava_edge.runtime.sampling import SamplingConfig
from llava_edge.runtime.session import ChatSession
from llava_edge.runtime.vision import EmbeddingCache

EXAMPLES = Path(__file__).parents[1] / "examples"
SUFFIX = "\nAnswer the question using a single word or phrase."
IMAGES = sorted(EXAMPLES.glob("*.png"))
QUESTIONS = ["Describe the image.", "How many shapes are there?" + SUFFIX, "What color is the triangle?" + SUFFIX]
GREEDY = SamplingConfig(max_tokens=24)


@pytest.fixture(scope="module")
def engine():
    eng = Engine.open(config=EngineConfig(parallel=4), threads=1)
    eng.start()
    yield eng
    eng.close()


@pytest.fixture(scope="module")
def serial_answers():
    """What the one-sequence chat session answers, one request at a time: the oracle for batching."""
    chat = ChatSession.open(threads=1)
    out = {}
    for image in IMAGES:
        for q in QUESTIONS:
            chat.set_image(image)
            out[image.name, q] = chat.answer(q, GREEDY).text
    chat.close()
    return out


def ask(engine, image, question, sampling=GREEDY):
    return engine.generate([Message("user", question, [image.read_bytes()])], sampling)


def test_concurrent_requests_answer_as_the_serial_session(engine, serial_answers):
    assert len(IMAGES) >= 3
    gens = {(i.name, q): ask(engine, i, q) for i in IMAGES for q in QUESTIONS}
    got = {k: "".join(g) for k, g in gens.items()}
    assert got == serial_answers
    assert all(g.answer.text == got[k] for k, g in gens.items())


def test_requests_from_threads_are_batched_and_all_finish(engine, serial_answers):
    results, lock = {}, threading.Lock()

    def client(image, q):
        text = "".join(ask(engine, image, q))
        with lock:
            results[image.name, q] = text

    threads = [threading.Thread(target=client, args=(i, q)) for i in IMAGES[:4] for q in QUESTIONS[:2]]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert results == {k: v for k, v in serial_answers.items() if k in results} and len(results) == len(threads)


def test_a_conversation_resent_in_full_reuses_its_prefix(engine):
    image = (EXAMPLES / "green_triangle.png").read_bytes()
    first = engine.generate([Message("user", QUESTIONS[2], [image])], GREEDY)
    answer = "".join(first)
    second = engine.generate([Message("user", QUESTIONS[2], [image]), Message("assistant", answer),
                              Message("user", QUESTIONS[1])], GREEDY)
    "".join(second)
    t = second.answer.timings
    assert t.n_cached >= engine.model.n_image_tokens + 10
    assert t.n_cached + t.n_prefilled == t.n_prompt_tokens
    assert t.n_prefilled < 40


def test_cancel_frees_the_slot(engine):
    gens = [ask(engine, IMAGES[0], "Describe the image.", SamplingConfig(max_tokens=200, ignore_eos=True))
            for _ in range(4)]
    next(iter(gens[0]))
    for g in gens:
        g.cancel()
    assert all(g.wait(30) is not None for g in gens)
    assert {g.answer.finish_reason for g in gens} <= {"cancelled", "length"}
    assert engine.stats()["busy"] == 0
    assert "".join(ask(engine, IMAGES[0], QUESTIONS[1])) != ""


def test_queue_overflow_is_refused_not_crashed():
    eng = Engine.open(config=EngineConfig(parallel=1, queue=1), threads=1)  # not started: nothing is admitted
    long = SamplingConfig(max_tokens=8)
    for _ in range(3):  # a request that fails in its encode gives its reserved place back
        with pytest.raises(UserError):
            eng.generate([Message("user", "q", [b"not an image"])], long)
    ask(eng, IMAGES[0], QUESTIONS[0], long)
    ask(eng, IMAGES[0], QUESTIONS[0], long)  # one free slot + one queue place
    encodes = []
    encode = eng.vision.encode
    eng.vision.encode = lambda *a, **kw: encodes.append(a) or encode(*a, **kw)
    with pytest.raises(EngineBusy):
        ask(eng, IMAGES[1], QUESTIONS[0], long)
    assert encodes == []  # refused before its image was encoded
    assert eng.stats()["queued"] == 2
    eng.close()


def test_a_prefill_while_the_user_types_changes_nothing_but_the_wait(serial_answers):
    eng = Engine.open(config=EngineConfig(parallel=1), threads=1)
    image, q = IMAGES[2], QUESTIONS[0]
    prefill = eng.prefill([Message("user", "", [image.read_bytes()])])
    assert prefill.wait(0) is None  # not started: nothing steps the engine yet
    eng.start()
    assert prefill.wait(60).finish_reason == "prefilled" and prefill.answer.text == ""
    eng.stop()
    n_prefix = len(eng.slots[0].held)
    assert n_prefix == prefill.answer.timings.n_prompt_tokens > eng.model.n_image_tokens  # the prefix ends at the image
    question = ask(eng, image, q)  # stepped by this thread: the engine's thread is stopped
    assert "".join(question) == serial_answers[image.name, q]
    t = question.answer.timings
    assert t.n_cached == n_prefix and t.n_prefilled == t.n_prompt_tokens - n_prefix < 40
    eng.close()


def test_an_image_a_free_slot_holds_is_not_encoded_again(serial_answers):
    eng = Engine.open(config=EngineConfig(parallel=2), threads=1)
    image, q = IMAGES[1], QUESTIONS[1]
    assert "".join(ask(eng, image, q)) == serial_answers[image.name, q]
    eng.vision.cache = EmbeddingCache()  # it forgets the image; the slot's KV still holds it
    encodes = []
    encode = eng.vision.encode
    eng.vision.encode = lambda *a, **kw: encodes.append(a) or encode(*a, **kw)
    again = ask(eng, image, q)
    assert "".join(again) == serial_answers[image.name, q] and encodes == []
    assert again.answer.timings.n_cached >= eng.model.n_image_tokens
    eng.forget()  # now no KV holds it: encoded
    assert "".join(ask(eng, image, q)) == serial_answers[image.name, q] and len(encodes) == 1
    eng.close()


def test_a_question_asked_during_the_prefill_waits_for_it_and_reuses_it(serial_answers):
    eng = Engine.open(config=EngineConfig(parallel=1, n_batch=16), threads=1)  # small steps: the prefill takes several
    image, q = IMAGES[0], QUESTIONS[2]
    prefill = eng.prefill([Message("user", "", [image.read_bytes()])])
    eng.step()  # one step of it
    assert 0 < len(eng.slots[0].held) < prefill.job.keys.__len__()
    question = ask(eng, image, q)
    assert "".join(question) == serial_answers[image.name, q]
    assert prefill.answer.finish_reason == "prefilled"
    assert question.answer.timings.n_cached == len(prefill.job.keys)
    eng.close()


@pytest.mark.parametrize("messages, match", [
    ([], "no messages"),
    ([Message("robot", "hi")], "unknown message role"),
    ([Message("assistant", "hi", [b"x"]), Message("user", "q")], "only be in user messages"),
    ([Message("user", "q"), Message("assistant", "a")], "end with a user message"),
    ([Message("user", "look: <image> here")], "<image>"),
    ([Message("user", "word " * 2000)], "context holds"),
    ([Message("user", "q", [b"not an image"])], "image"),
])
def test_bad_requests_are_user_errors(engine, messages, match):
    with pytest.raises(UserError, match=match):
        engine.generate(messages, GREEDY)
    assert "".join(ask(engine, IMAGES[0], QUESTIONS[1])) != ""


def test_image_prefix_kv_restored_from_disk_in_a_new_engine(tmp_path, serial_answers):
    config = EngineConfig(parallel=2, kv_cache_dir=str(tmp_path / "kv"))
    image, q = IMAGES[1], QUESTIONS[0]
    cold = Engine.open(config=config, threads=1)
    first = ask(cold, image, q)
    assert "".join(first) == serial_answers[image.name, q] and not first.answer.timings.kv_restored
    cold.close()
    assert len(list((tmp_path / "kv").glob("*.kv"))) == 1

    warm = Engine.open(config=config, threads=1)
    encodes = []
    encode = warm.vision.encode
    warm.vision.encode = lambda *a, **kw: encodes.append(a) or encode(*a, **kw)
    again = ask(warm, image, q)
    assert "".join(again) == serial_answers[image.name, q]
    t = again.answer.timings
    assert t.kv_restored and t.n_cached >= warm.model.n_image_tokens and t.n_prefilled < 40
    assert encodes == [] and t.vision_ms == 0  # a KV hit skips the image encode too
    warm.close()

    for entry in (tmp_path / "kv").glob("*.kv"):  # a damaged entry is not trusted: prefilled again
        entry.write_bytes(entry.read_bytes()[:-10])
    damaged = Engine.open(config=config, threads=1)
    third = ask(damaged, image, q)  # deferred encode, then the entry fails: encoded in the step after all
    assert "".join(third) == serial_answers[image.name, q] and not third.answer.timings.kv_restored
    assert third.answer.timings.n_cached == 0
    damaged.close()
