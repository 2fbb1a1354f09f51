"""The step budget's cost model and rules, without llama.cpp: a robust fit of a + b·n clamped to what is physically
possible, sure only with enough sizes and little spread, and the serial server's order whenever it is unsure."""

from __future__ import annotations

import random

import pytest

from llava_edge.runtime.scheduler import Budget
from llava_edge.runtime.step_budget import StepCost, prefill_budget


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
