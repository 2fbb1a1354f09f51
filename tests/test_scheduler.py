"""The scheduler's rules, without llama.cpp: which slot a request takes, never resuming inside an image, the
per-step budgets, first come first served prefill, cancels and the queue limit."""

from __future__ import annotations

import pytest

from llava_edge.runtime.scheduler import Budget, EngineBusy, Job, Scheduler, common_prefix


def image(name: str, n: int) -> list:
    return [("image", name, i) for i in range(n)]


def job(keys: list, **kw) -> Job:
    spans, start = {}, None
    for i, k in enumerate(keys):
        if isinstance(k, tuple):
            if start is None or keys[i - 1][1] != k[1] or k[2] == 0:
                start = i
                spans[start] = 0
            spans[start] += 1
        else:
            start = None
    return Job(list(keys), spans, **kw)


def submit(s: Scheduler, j: Job) -> Job:
    s.reserve()
    s.submit(j)
    return j


def run_to_decoding(s: Scheduler, budget: int = 512) -> None:
    """Execute plans as an executor would until every active job is decoding (or prefilled)."""
    for _ in range(100):
        if all(sl.job.decoding or sl.job.prefilled for sl in s.active()):
            return
        plan = s.plan(budget)
        s.commit_tokens(plan)
        for e in plan.tokens:
            if e.wants_logits:
                s.feed(e.slot, 7)
        if plan.embeddings is not None:
            s.commit_embeddings(plan)
            if plan.embeddings.wants_logits:
                s.feed(plan.embeddings.slot, 7)
    raise AssertionError("did not settle")


PROMPT = [1, 10, 11] + image("a", 8) + [12, 13, 14]


def test_a_request_takes_the_free_slot_sharing_the_longest_prefix():
    s = Scheduler(n_slots=3, queue_limit=4, n_batch=64)
    s.slots[0].held = [1, 10, 99]
    s.slots[1].held = PROMPT[:9]  # the text and most of the image
    s.slots[2].held = PROMPT + [50, 51]  # everything and more: the best
    j = submit(s, job(PROMPT))
    (a,), dropped = s.admit()
    assert not dropped and a.slot is s.slots[2] and a.job is j
    assert a.keep == len(PROMPT) - 1  # the last prompt position is evaluated again, for its logits
    assert s.slots[2].held == PROMPT[:-1] and j.cursor == len(PROMPT) - 1


def test_ties_go_to_the_least_recently_used_slot():
    s = Scheduler(n_slots=2, queue_limit=4, n_batch=64)
    submit(s, job([1, 2, 3]))
    (a,), _ = s.admit()
    s.release(a.slot)  # used last
    submit(s, job([4, 5]))  # shares nothing with either slot
    (b,), _ = s.admit()
    assert b.slot is not a.slot


def test_never_resumes_inside_an_image():
    s = Scheduler(n_slots=1, queue_limit=4, n_batch=64)
    s.slots[0].held = PROMPT[:7]  # three text positions and four of the image's eight
    submit(s, job(PROMPT))
    (a,), _ = s.admit()
    assert a.keep == 3 and s.slots[0].held == PROMPT[:3]
    plan = s.plan(512)
    assert plan.tokens == [] and (plan.embeddings.begin, plan.embeddings.end) == (3, 11)
    assert plan.embeddings.pos == 3


def test_an_image_of_another_budget_is_another_image():
    reduced = [1, 10, 11] + [("image", "a:4", i) for i in range(4)] + [12]
    assert common_prefix(PROMPT, reduced) == 3


def test_decoding_tokens_come_first_and_prefill_is_first_come_first_served():
    s = Scheduler(n_slots=3, queue_limit=4, n_batch=64)
    a = submit(s, job([1, 2, 3]))
    s.admit()
    run_to_decoding(s)
    assert a.decoding
    b = submit(s, job([1] + image("b", 20) + [5]))
    c = submit(s, job([1, 8, 9, 10]))
    s.admit()
    plan = s.plan(6)
    # a's next token, then b's text (b came first), then b's image chunk within the budget; c waits
    assert [(e.slot.job, e.token) for e in plan.tokens] == [(a, 7), (b, 1)]
    assert plan.embeddings.slot.job is b and (plan.embeddings.begin, plan.embeddings.end) == (1, 6)
    assert all(e.slot.job is not c for e in plan.tokens)
    s.commit_tokens(plan)
    s.commit_embeddings(plan)
    assert b.cursor == 6 and a.pending is None


def test_the_prefill_budget_leaves_room_for_every_decoding_token():
    s = Scheduler(n_slots=4, queue_limit=4, n_batch=8)
    for k in range(3):
        submit(s, job([1, 2, 3 + k]))
    s.admit()
    run_to_decoding(s)
    submit(s, job(list(range(3, 40))))
    s.admit()
    plan = s.plan(512)
    assert len(plan.tokens) == 8  # n_batch: 3 decoding tokens and 5 of prefill
    assert sum(e.wants_logits for e in plan.tokens) == 3


def test_an_image_chunk_never_exceeds_n_batch():
    s = Scheduler(n_slots=1, queue_limit=1, n_batch=4)
    submit(s, job([1] + image("a", 10) + [2]))
    s.admit()
    sizes = []
    while True:
        plan = s.plan(512)
        if plan.empty:
            break
        s.commit_tokens(plan)
        if plan.embeddings:
            sizes.append(plan.embeddings.end - plan.embeddings.begin)
            s.commit_embeddings(plan)
        if any(e.wants_logits for e in plan.tokens):
            break
    assert sum(sizes) == 10 and sizes[0] == 3 and max(sizes) == 4  # the first shares its step with a text token


def test_a_plan_without_image_budget_leaves_the_image_for_later():
    s = Scheduler(n_slots=2, queue_limit=2, n_batch=64)
    submit(s, job([1, 2, 3]))
    s.admit()
    run_to_decoding(s)
    b = submit(s, job([1, 5] + image("b", 20) + [6]))
    s.admit()
    plan = s.plan(Budget(tokens=8, image=0))
    assert [e.token for e in plan.tokens] == [7, 1, 5] and plan.embeddings is None
    s.commit_tokens(plan)
    assert b.cursor == 2
    plan = s.plan(Budget(tokens=8, image=8))
    assert (plan.embeddings.begin, plan.embeddings.end) == (2, 10)


def test_prefill_only_job_evaluates_everything_and_wants_no_logits():
    s = Scheduler(n_slots=1, queue_limit=1, n_batch=64)
    j = submit(s, job([1, 2] + image("a", 5), prefill_only=True))
    s.admit()
    run_to_decoding(s)
    assert j.prefilled and not j.decoding and s.slots[0].held == j.keys


def test_prefill_only_job_with_its_prefix_held_has_nothing_to_do():
    s = Scheduler(n_slots=1, queue_limit=1, n_batch=64)
    keys = [1, 2] + image("a", 5)
    s.slots[0].held = list(keys)
    j = submit(s, job(keys, prefill_only=True))
    (a,), _ = s.admit()
    assert a.keep == len(keys) and j.prefilled and s.plan(512).empty


def test_a_question_after_a_prefill_reuses_all_of_it():
    s = Scheduler(n_slots=1, queue_limit=2, n_batch=64)
    prefix = [1, 2] + image("a", 5)
    p = submit(s, job(prefix, prefill_only=True))
    q = submit(s, job(prefix + [30, 31, 32]))
    (a,), _ = s.admit()
    assert a.job is p and s.admit() == ([], [])  # the question waits for the one slot
    run_to_decoding(s)
    s.release(s.slots[0])
    (a,), _ = s.admit()
    assert a.job is q and a.keep == len(prefix)
    plan = s.plan(512)
    assert [e.token for e in plan.tokens] == [30, 31, 32] and plan.embeddings is None


def test_queue_limit_counts_reserved_places_and_free_slots():
    s = Scheduler(n_slots=2, queue_limit=1, n_batch=64)
    for _ in range(3):  # two free slots and one queue place
        s.reserve()
    with pytest.raises(EngineBusy):
        s.reserve()
    s.unreserve()  # an encode failed: its place is given back
    s.reserve()
    assert s.counts() == {"slots": 2, "busy": 0, "queued": 3}


def test_cancelled_waiting_jobs_are_dropped_and_cancelled_running_ones_reported():
    s = Scheduler(n_slots=1, queue_limit=2, n_batch=64)
    running = submit(s, job([1, 2, 3]))
    waiting = submit(s, job([4, 5, 6]))
    s.admit()
    s.cancel(waiting, "cancelled")
    s.cancel(running, "interrupted")
    s.cancel(running, "cancelled")  # the first reason stands
    assert [sl.job for sl in s.cancelled()] == [running] and running.cancel_reason == "interrupted"
    s.release(s.slots[0])
    admitted, dropped = s.admit()
    assert admitted == [] and dropped == [waiting]


def test_restored_prefix_moves_the_cursor():
    s = Scheduler(n_slots=1, queue_limit=1, n_batch=64)
    j = submit(s, job(PROMPT))
    (a,), _ = s.admit()
    assert a.keep == 0
    s.restored(a.slot, 11)  # the disk store gave the text and the image
    assert s.slots[0].held == PROMPT[:11] and j.cursor == 11
    plan = s.plan(512)
    assert [e.token for e in plan.tokens] == [12, 13, 14] and plan.tokens[-1].wants_logits


def test_with_embedded_text_the_text_around_an_image_shares_its_decode():
    plain, embedded = (Scheduler(n_slots=1, queue_limit=4, n_batch=64, embed_text=e) for e in (False, True))
    for s in (plain, embedded):
        submit(s, job(PROMPT))
        s.admit()
    first = plain.plan(512)
    assert [e.token for e in first.tokens] == [1, 10, 11] and (first.embeddings.begin, first.embeddings.end) == (3, 11)
    plan = embedded.plan(512)  # one decode of 14 rows instead of three decodes
    assert plan.tokens == [] and (plan.embeddings.begin, plan.embeddings.end, plan.embeddings.wants_logits) == (0, 14, True)


def test_an_embeddings_chunk_stops_at_the_cut_and_at_n_batch():
    s = Scheduler(n_slots=1, queue_limit=4, n_batch=8, embed_text=True)
    j = submit(s, job(PROMPT, cut=11))  # the disk store saves the KV at the image's end
    s.admit()
    spans = []
    for _ in range(4):
        plan = s.plan(512)
        if plan.embeddings is not None:
            spans.append((plan.embeddings.begin, plan.embeddings.end))
            s.commit_embeddings(plan)
        else:
            spans.append([e.token for e in plan.tokens])
            s.commit_tokens(plan)
        if j.prefilled:
            break
    assert spans == [(0, 8), (8, 11), [12, 13, 14]]  # n_batch, then the cut; then text alone, as tokens


def test_text_leading_to_an_image_waits_for_the_image_s_decode():
    s = Scheduler(n_slots=2, queue_limit=4, n_batch=64, embed_text=True)
    submit(s, job([1, 2, 3]))
    s.admit()
    run_to_decoding(s)
    submit(s, job(PROMPT))
    s.admit()
    plan = s.plan(Budget(2, 0))  # no image decode fits this step: its text waits too, for the image's decode
    assert [e.token for e in plan.tokens] == [7] and plan.embeddings is None
    plan = s.plan(Budget(2, 16))
    assert [e.token for e in plan.tokens] == [7] and (plan.embeddings.begin, plan.embeddings.end) == (0, 14)


def test_a_later_request_s_text_does_not_delay_the_first_one_s_answer():
    s = Scheduler(n_slots=3, queue_limit=4, n_batch=64, embed_text=True)
    first = submit(s, job(PROMPT))
    submit(s, job([1, 20, 21] + image("b", 8) + [22]))
    chat = submit(s, job([1, 30, 31]))  # no image: its text goes in the token decode as always
    s.admit()
    plan = s.plan(512)
    assert plan.embeddings.slot.job is first and (plan.embeddings.begin, plan.embeddings.end) == (0, 14)
    assert [e.token for e in plan.tokens] == [1, 30, 31] and all(e.slot.job is chat for e in plan.tokens)


def test_forced_tokens_ride_in_one_decode_after_the_drawn_token_and_only_the_last_wants_logits():
    s = Scheduler(n_slots=2, queue_limit=4, n_batch=64)
    a = submit(s, job([1, 2, 3]))
    b = submit(s, job([1, 5, 6, 8]))
    s.admit()
    run_to_decoding(s)
    s.feed(s.slots[0], [40, 41, 42])  # a drew 40; its format forces 41 and 42
    plan = s.plan(0)
    assert [(e.slot.job, e.token, e.pos, e.wants_logits) for e in plan.tokens] == [
        (a, 40, 3, False), (a, 41, 4, False), (a, 42, 5, True), (b, 7, 4, True)]
    s.commit_tokens(plan)
    assert s.slots[0].held == [1, 2, 3, 40, 41, 42] and not a.decoding and a.forced == []
    assert s.slots[1].held == [1, 5, 6, 8, 7] and a.cursor == 3 and b.cursor == 4  # the prompt cursors stay
