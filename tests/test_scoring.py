"""scoring.py: the shapes world's answer rules and LLaVA's POPE yes/no reading (hand-worked cases)."""

import pytest

from llava_edge.scoring import pope_f1, pope_label, score_answer


def test_score_answer():
    assert score_answer("color", " red. ", "Red")
    assert not score_answer("color", "Blue", "Red")
    assert score_answer("count", "2", "Two") and score_answer("count", "Two!", "Two")
    assert not score_answer("count", "3", "Two")
    assert score_answer("exists", "yes", "Yes") and not score_answer("exists", "Yes, there is.", "No")
    assert score_answer("describe", "a red circle and a  blue square", "A red circle and a blue square.")
    assert not score_answer("describe", "A blue square and a red circle.", "A red circle and a blue square.")


def test_pope_label_follows_llava_rule():
    assert pope_label("No") == "no"
    assert pope_label("no, there is not.") == "no"
    assert pope_label("There is not a red square.") == "no"
    assert pope_label("Yes") == "yes"
    assert pope_label("Yes. There is no blue circle.") == "yes"  # only the first sentence counts
    assert pope_label("Nothing here") == "yes"  # whole words only
    assert pope_label("No\n") == "no"


def test_pope_f1_hand_worked():
    # preds yes,yes,no,no,yes ; golds yes,no,no,yes,yes -> TP=2 FP=1 TN=1 FN=1
    m = pope_f1(["Yes", "yes", "No", "no.", "Yes, there is."], ["yes", "no", "No", "Yes", "yes"])
    assert m["precision"] == pytest.approx(2 / 3)
    assert m["recall"] == pytest.approx(2 / 3)
    assert m["f1"] == pytest.approx(2 / 3)
    assert m["accuracy"] == pytest.approx(3 / 5)
    assert m["yes_ratio"] == pytest.approx(3 / 5)
    allno = pope_f1(["No", "No"], ["yes", "no"])
    assert allno == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "accuracy": 0.5, "yes_ratio": 0.0}
    with pytest.raises(ValueError):
        pope_f1(["Yes"], [])
