"""The step budget's cost model and rules, without llama.cpp: a robust fit of a + b·n clamped to what is physically
possible, sure only with enough sizes and little spread, and the serial server's order whenever it is unsure."""

from __future__ import annotations

import random

import pytest

from llava_edge.runtime.scheduler import Budget, Job, Scheduler
from llava_edge.runtime.step_budget import StepCost, plan_step, prefill_budget


def measured(samples) -> StepCost:
    cost = StepCost()
    for n, seconds in samples:
        cost.add(n, seconds)
    return cost


def test_step_cost_fits_a_fixed_part_and_a_part_per_position():
    assert StepCost().fit() is None
    clean = [(n, 0.5 + 0.029 * n) for n in (1, 16, 64, 512, 32)]  # a 7B on 2 cores
    fit = measured(clean).fit()
    assert fit.a == pytest.approx(0.5) and fit.b == pytest.approx(0.029)
    assert not fit.sure  # one decode of each size proves nothing
    fit = measured(clean * 3).fit()
    assert fit.sure and fit.spread == pytest.approx(0.0, abs=1e-12)
    assert measured(clean * 3).positions_within(1.0) == 17
    assert measured([(100, 2.0)]).fit() is None  # one size: no line through it


def test_outliers_do_not_move_the_fit():
    """A neighbour's burst doubles some decodes, a page fault makes one 8x: the medians do not follow."""
    rng = random.Random(5)
    samples = []
    for k in range(60):
        n = 512 if k % 10 == 0 else rng.choice((1, 2, 3))
        seconds = (0.3 + 0.029 * n) * rng.uniform(0.95, 1.05)
        samples.append((n, seconds * (2.0 if k % 7 == 3 else 1.0) * (8.0 if k == 41 else 1.0)))
    fit = measured(samples).fit()
    assert fit.a == pytest.approx(0.3, rel=0.15) and fit.b == pytest.approx(0.029, rel=0.15)


def test_a_and_b_stay_physical_and_the_model_unsure_when_times_contradict_sizes():
    # bigger decodes measured faster (a burst during the small ones): no negative cost per position
    fit = measured([(1, 2.0), (1, 2.1), (1, 1.9), (64, 0.5), (64, 0.6), (64, 0.55)]).fit()
    assert fit.b > 0 and fit.a >= 0 and not fit.sure
    fit = measured([(1, 0.3), (1, 0.6), (1, 0.2), (64, 2.0), (64, 4.0), (64, 1.0)]).fit()  # widely spread
    assert fit.b > 0 and not fit.sure


def test_unsure_the_budget_is_the_serial_servers():
    """Answers being written finish first; nothing rides until the model is sure (a lone prompt: whole batches)."""
    cost = StepCost()
    assert prefill_budget(512, cost, 1, 0.25, 3.0, background=False) == Budget(0, 0)
    assert prefill_budget(512, cost, 0, 0.25, 3.0, background=False) == Budget(512, 512)
    cost = measured([(1, 0.3), (1, 0.6), (1, 0.2), (64, 2.0), (64, 4.0), (64, 1.0)])
    assert prefill_budget(512, cost, 2, 0.25, 3.0, background=False) == Budget(0, 0)
    assert prefill_budget(512, cost, 0, 0.25, 3.0, background=False) == Budget(512, 512)


def test_sure_the_budget_keeps_the_answers_next_token_within_its_share():
    cpu = measured([(n, 0.5 + 0.01 * n) for n in (1, 64, 512)] * 3)  # a CPU: 0.5 s per decode, 10 ms per position
    # one answer decoding: its 0.51 s step may grow by a quarter, 0.1275 s: 12 text positions, no image decode
    assert prefill_budget(512, cpu, 1, 0.25, 3.0, background=False) == Budget(12, 0)
    gpu = measured([(n, 0.01 + 0.0001 * n) for n in (1, 64, 512)] * 3)  # a decode's fixed cost is small
    assert prefill_budget(512, gpu, 1, 0.25, 3.0, background=False) == Budget(25, 0)
    assert prefill_budget(512, gpu, 1, 2.0, 3.0, background=False) == Budget(202, 102)
    assert prefill_budget(512, cpu, 0, 0.25, 3.0, background=True) == Budget(250, 250)  # typing: ~3 s steps
    assert prefill_budget(512, cpu, 0, 0.25, 0.1, background=True) == Budget(16, 16)  # never below 16


def test_a_spread_machine_prices_the_ride_pessimistically():
    rng = random.Random(3)
    noisy = measured([(n, (0.5 + 0.01 * n) * rng.uniform(0.85, 1.15)) for n in (1, 64, 512) for _ in range(5)])
    fit = noisy.fit()
    assert fit.sure and 0 < fit.spread <= 0.2
    assert prefill_budget(512, noisy, 1, 0.25, 3.0, background=False).tokens < 12


def test_background_prefill_unsure_is_priced_at_the_dearest_position_seen():
    assert prefill_budget(512, StepCost(), 0, 0.25, 3.0, background=True) == Budget(32, 32)  # unmeasured: small
    cost = measured([(32, 0.5 + 0.01 * 32)])  # one size: not sure; 25 ms per position at worst
    assert prefill_budget(512, cost, 0, 0.25, 3.0, background=True) == Budget(117, 117)


def admitted(n_batch: int, *prompts: tuple[list, dict]) -> Scheduler:
    s = Scheduler(n_slots=len(prompts), queue_limit=4, n_batch=n_batch, embed_text=True)
    for keys, spans in prompts:
        s.reserve()
        s.submit(Job(list(keys), dict(spans)))
    s.admit()
    return s


def image_prompt(name: str, before: int, n: int, after: int) -> tuple[list, dict]:
    keys = list(range(100, 100 + before)) + [("image", name, i) for i in range(n)] + list(range(200, 200 + after))
    return keys, {before: n}


def test_the_next_images_chunk_waits_for_the_first_token_of_the_answer_before_it():
    """A text prompt ends in this step's token decode: a chunk of the image after it, which leaves that prompt
    unfinished, would delay the answer's first token (a prompt that ends in the same step joins the answers)."""
    s = admitted(64, (list(range(1, 6)), {}), image_prompt("b", 2, 40, 3))
    assert plan_step(s, StepCost(), 64, 0.25, 3.0).embeddings.end == 45
    s = admitted(64, (list(range(1, 6)), {}), image_prompt("b", 2, 100, 3))
    plan = plan_step(s, StepCost(), 64, 0.25, 3.0)
    assert [e.token for e in plan.tokens] == [1, 2, 3, 4, 5] and plan.embeddings is None
    s.commit_tokens(plan)
    s.feed(s.slots[0], 9)
    plan = plan_step(s, StepCost(), 64, 0.25, 3.0)  # an answer decoding, the model unsure: the serial order
    assert [e.token for e in plan.tokens] == [9] and plan.embeddings is None


def test_a_later_text_prompt_never_overtakes_an_image_waiting_for_its_turn():
    s = admitted(64, image_prompt("a", 2, 100, 3), (list(range(1, 6)), {}))
    plan = plan_step(s, StepCost(), 64, 0.25, 3.0)  # nothing decoding: the image takes the whole batch
    assert plan.embeddings is not None and plan.embeddings.slot.job.arrival == 0 and plan.tokens == []
    cpu = measured([(n, 0.5 + 0.001 * n) for n in (1, 64, 512)] * 3)  # text would be cheap to ride
    plan = plan_step(s, cpu, 64, 0.25, 3.0)
    assert all(e.slot.job.arrival == 0 for e in plan.tokens)


def test_prompts_that_end_in_the_same_step_are_evaluated_together():
    """Continuous batching stays: several short prompts in one decode, then their answers in one decode each step."""
    s = admitted(64, (list(range(1, 6)), {}), (list(range(11, 16)), {}), (list(range(21, 26)), {}))
    plan = plan_step(s, StepCost(), 64, 0.25, 3.0)
    assert len(plan.tokens) == 15 and sum(e.wants_logits for e in plan.tokens) == 3
