"""The draw's filters and penalty against direct computations on small rows: top-k, min-p and top-p keep exactly
the tokens their definitions name; the repeat penalty is llama.cpp's; a format's mask only removes tokens."""

from __future__ import annotations

import numpy as np
import pytest

from llava_edge.errors import UserError
from llava_edge.runtime.sampling import SamplingConfig, apply_repeat_penalty, sample_token

LOGITS = np.log(np.array([0.05, 0.4, 0.1, 0.3, 0.15]))  # probabilities at temperature 1


def drawn(n: int = 4000, **kw) -> set[int]:
    rng, top_p = np.random.default_rng(0), kw.pop("top_p", 1.0)
    return {sample_token(LOGITS, 1.0, top_p, rng, **kw) for _ in range(n)}


def test_top_k_min_p_and_top_p_keep_the_tokens_their_definitions_name():
    assert drawn() == {0, 1, 2, 3, 4}
    assert drawn(top_k=2) == {1, 3}
    assert drawn(min_p=0.3) == {1, 3, 4}  # p >= 0.3 * 0.4 = 0.12
    assert drawn(top_p=0.75) == {1, 3, 4}  # 0.4 + 0.3 < 0.75 <= 0.4 + 0.3 + 0.15
    assert drawn(top_k=3, min_p=0.3) == {1, 3, 4}
    assert sample_token(LOGITS, 0.0, 0.5, np.random.default_rng(0), top_k=3, min_p=0.9) == 1  # greedy


def test_the_repeat_penalty_divides_positive_logits_and_multiplies_negative_ones_once_per_token():
    row = np.array([2.0, -1.0, 0.5, 3.0])
    got = apply_repeat_penalty(row, [0, 1, 1, 7], 2.0)  # 7 lies outside the row: ignored
    assert got.tolist() == [1.0, -2.0, 0.5, 3.0] and row.tolist() == [2.0, -1.0, 0.5, 3.0]
    assert apply_repeat_penalty(row, [0], 1.0) is row


@pytest.mark.parametrize("field, value", [("top_k", -1), ("min_p", 1.5), ("repeat_penalty", 0), ("top_logprobs", 21),
                                          ("repeat_last_n", -2), ("format", "yaml"), ("format", 3)])
def test_bad_settings_are_one_line(field, value):
    with pytest.raises(UserError):
        SamplingConfig(**{field: value})
