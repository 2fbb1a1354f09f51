"""`llava-edge eval`'s readers and scorers on files built with LLaVA's exact names, keys and columns, scored
against values worked out by hand; bad files give one line naming the file and the key. No model runs here."""

import base64
import io
import json
from pathlib import Path

import pytest
from PIL import Image

from llava_edge.errors import UserError
from llava_edge.eval import mmbench, mme, pope, seed
from llava_edge.eval.benchmarks import load_benchmark
from llava_edge.eval.items import OPTION_LETTER, SHORT_ANSWER
from llava_edge.train.shapes_benchmarks import build_all


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    return build_all(tmp_path_factory.mktemp("sets"), 12, seed=3)


def write_lines(path: Path, records) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def png(path: Path | None = None, color=(200, 30, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (32, 32), color).save(buffer, format="PNG")
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(buffer.getvalue())
    return buffer.getvalue()


# ----------------------------------------------------------------------------- POPE

POPE_LABELS = ["yes", "yes", "yes", "yes", "yes", "no", "no", "no", "no", "no"]
# TP 3 (0-2), FN 2 (3 "No.", 4 "not"), FP 1 (5: a second sentence does not count), TN 4 (9: "no" mid-sentence)
POPE_ANSWERS = ["Yes", "Yes.", "yes it is", "No.", "There is not one", "Yes, there is one. No.", "No", "no",
                "No, there is not.", "I see no cat"]


def pope_set(root: Path) -> Path:
    questions, labels = [], []
    for i, label in enumerate(POPE_LABELS):
        image = f"COCO_val2014_{i:012d}.jpg"
        png(root / "val2014" / image)
        text = f"Is there a cat number {i} in the image?"
        questions.append({"question_id": 100 + i, "image": image, "text": text + "\n" + SHORT_ANSWER,
                          "category": "adversarial"})
        labels.append({"question_id": 100 + i, "image": image, "text": text, "label": label})
    write_lines(root / "llava_pope_test.jsonl", questions)
    write_lines(root / "coco" / "coco_pope_adversarial.json", labels[::-1])  # another order than the questions
    return root


def test_pope_f1_and_yes_ratio_by_hand_with_labels_in_another_order(tmp_path):
    qs = load_benchmark("pope", pope_set(tmp_path)).questions
    assert [q.meta["label"] for q in qs] == POPE_LABELS
    got = pope.score(qs, {q.key: a for q, a in zip(qs, POPE_ANSWERS)})
    precision, recall = 3 / 4, 3 / 5
    assert got["adversarial/precision"] == pytest.approx(precision)
    assert got["adversarial/recall"] == pytest.approx(recall)
    assert got["adversarial/f1"] == pytest.approx(2 * precision * recall / (precision + recall))  # 0.6667
    assert got["adversarial/accuracy"] == pytest.approx(7 / 10)
    assert got["adversarial/yes_ratio"] == pytest.approx(4 / 10)
    assert got["mean/f1"] == got["adversarial/f1"]


def test_pope_labels_counted_from_one_per_file_join_by_image_and_text(tmp_path):
    root = pope_set(tmp_path)
    path = root / "coco" / "coco_pope_adversarial.json"
    lines = [json.loads(l) for l in path.read_text().splitlines()]
    write_lines(path, [{**l, "question_id": n} for n, l in enumerate(lines, 1)])  # POPE's own ids
    assert [q.meta["label"] for q in load_benchmark("pope", root).questions] == POPE_LABELS


def test_pope_built_from_the_shapes_world(sets):
    qs = load_benchmark("pope", sets["pope"]).questions
    assert {q.meta["category"] for q in qs} == {"random", "popular", "adversarial"} and len(qs) == 36
    assert all(q.prompt.endswith("\n" + SHORT_ANSWER) and Path(q.image).is_file() for q in qs)
    right = {q.key: q.meta["label"].capitalize() for q in qs}
    assert pope.score(qs, right)["mean/f1"] == 1.0


@pytest.mark.parametrize("damage, named", [
    (lambda r: r.pop("category"), "'category'"),
    (lambda r: r.update(image="COCO_val2014_missing.jpg"), "COCO_val2014_missing.jpg"),
])
def test_pope_bad_question_line_names_file_and_key(tmp_path, damage, named):
    root = pope_set(tmp_path)
    lines = [json.loads(l) for l in (root / "llava_pope_test.jsonl").read_text().splitlines()]
    damage(lines[2])
    write_lines(root / "llava_pope_test.jsonl", lines)
    with pytest.raises(UserError, match=rf"llava_pope_test.jsonl: line 3.*{named}|llava_pope_test.jsonl: line 3"):
        load_benchmark("pope", root)


def test_pope_missing_label_names_the_label_file(tmp_path):
    root = pope_set(tmp_path)
    path = root / "coco" / "coco_pope_adversarial.json"
    write_lines(path, [json.loads(l) for l in path.read_text().splitlines()][1:])
    with pytest.raises(UserError, match="coco_pope_adversarial.json: no label for question_id"):
        load_benchmark("pope", root)


# ----------------------------------------------------------------------------- MME


def test_mme_one_of_two_right_counts_for_acc_not_acc_plus(sets):
    qs = load_benchmark("mme", sets["mme"]).questions
    tasks = {q.meta["task"] for q in qs}
    assert tasks == {"existence", "count", "color"} and len(qs) == 24
    assert all(q.prompt.endswith("\n" + SHORT_ANSWER) and "Please answer" not in q.prompt for q in qs)
    answers = {q.key: q.meta["label"].capitalize() for q in qs}
    first = next(q for q in qs if q.meta["task"] == "existence")
    mates = [q for q in qs if q.meta["image"] == first.meta["image"]]
    assert len(mates) == 2
    answers[mates[1].key] = "yes" if mates[1].meta["label"] == "no" else "No, it is not."
    got = mme.score(qs, answers)
    n_images = len({q.meta["image"] for q in qs if q.meta["task"] == "existence"})
    acc, acc_plus = (2 * n_images - 1) / (2 * n_images), (n_images - 1) / n_images
    assert got["existence/acc"] == pytest.approx(acc) and got["existence/acc+"] == pytest.approx(acc_plus)
    assert got["existence"] == pytest.approx(100 * acc + 100 * acc_plus)
    assert got["count"] == 200.0 and got["perception"] == pytest.approx(got["existence"] + 400.0)
    assert "cognition" not in got


def test_mme_reads_both_layouts_without_llava_jsonl(sets, tmp_path):
    import shutil

    shutil.copytree(sets["mme"] / mme.RELEASE, tmp_path / mme.RELEASE)
    with_jsonl = load_benchmark("mme", sets["mme"]).questions
    without = load_benchmark("mme", tmp_path / mme.RELEASE).questions
    assert sorted((q.key, q.prompt, q.meta["label"]) for q in without) == \
        sorted((q.key, q.prompt, q.meta["label"]) for q in with_jsonl)
    assert any("/images/" in q.image for q in without) and any("/images/" not in q.image for q in without)


def test_mme_answer_reading():
    assert [mme.yes_no(a) for a in ("Yes", "no", "Yes, it is.", "Not at all", "The answer is yes")] == \
        ["yes", "no", "yes", "no", "other"]


# ----------------------------------------------------------------------------- MMBench


def test_mmbench_single_pass_right_circular_wrong(tmp_path):
    image = base64.b64encode(png()).decode()
    header = "index\tquestion\thint\tA\tB\tC\tD\tanswer\tcategory\timage\tsource\tl2-category\tcomment\tsplit"
    row = f"7\tWhat shape is it?\tnan\tCircle\tSquare\tTriangle\tnan\tB\tidentity\t{image}\tx\tperception\tnan\tdev"
    (tmp_path / "mmbench_dev_20230712.tsv").write_text(header + "\n" + row + "\n")
    qs = load_benchmark("mmbench", tmp_path).questions
    assert [q.meta["options"] for q in qs] == [["Circle", "Square", "Triangle"], ["Square", "Triangle", "Circle"],
                                               ["Triangle", "Circle", "Square"]]
    assert [q.meta["answer"] for q in qs] == ["B", "A", "C"]
    assert qs[0].prompt == f"What shape is it?\nA. Circle\nB. Square\nC. Triangle\n{OPTION_LETTER}"
    got = mmbench.score(qs, {qs[0].key: "B", qs[1].key: "Square", qs[2].key: "A"})  # rotation 2 wrong
    assert got["single"] == 1.0 and got["circular"] == 0.0
    assert got["identity/single"] == 1.0 and got["identity/circular"] == 0.0
    assert mmbench.score(qs, {qs[0].key: "B.", qs[1].key: "A", qs[2].key: "C. Square"})["circular"] == 1.0


def test_mmbench_reads_fields_quoted_as_pandas_writes_them(tmp_path):
    import csv

    with (tmp_path / "q.tsv").open("w", newline="") as f:
        writer = csv.writer(f, delimiter="\t")  # pandas' to_csv quotes the same way (minimal)
        writer.writerow(["index", "question", "hint", "A", "B", "C", "D", "answer", "category", "image"])
        writer.writerow([1, 'Which "shape"\tis it?', "Line one\nline two", "Circle", "Square", "None", "", "A", "c",
                         base64.b64encode(png()).decode()])
    qs = load_benchmark("mmbench", tmp_path / "q.tsv").questions
    assert len(qs) == 2 and qs[0].prompt.startswith('Line one\nline two\nWhich "shape"\tis it?\nA. Circle\nB. Square\n')


def test_mmbench_built_from_the_shapes_world(sets):
    qs = load_benchmark("mmbench", sets["mmbench"]).questions
    indices = {q.meta["index"] for q in qs}
    assert len(indices) == 12 and len(qs) == sum(len(q.meta["options"]) for q in qs if q.meta["rotation"] == 0)
    assert all(isinstance(q.image, bytes) and q.prompt.endswith(OPTION_LETTER) for q in qs)
    assert any(q.prompt.startswith("The image shows") for q in qs)  # the hint goes first
    limited = load_benchmark("mmbench", sets["mmbench"], limit=2).questions
    assert len({q.meta["index"] for q in limited}) == 2 and limited == qs[: len(limited)]


def test_mmbench_missing_column_and_bad_answer_are_one_line(tmp_path):
    (tmp_path / "a.tsv").write_text("index\tquestion\n1\tq\n")
    with pytest.raises(UserError, match=r"a.tsv: no column 'hint'"):
        load_benchmark("mmbench", tmp_path / "a.tsv")
    image = base64.b64encode(png()).decode()
    header = "index\tquestion\thint\tA\tB\tC\tD\tanswer\tcategory\timage"
    (tmp_path / "a.tsv").write_text(f"{header}\n3\tq?\tnan\tx\ty\tnan\tnan\tC\tc\t{image}\n")
    with pytest.raises(UserError, match=r"a.tsv: index 3: 'answer' 'C' is not one of its options A, B"):
        load_benchmark("mmbench", tmp_path / "a.tsv")


# ----------------------------------------------------------------------------- SEED-Bench


def test_seed_accuracy_per_type_by_hand(tmp_path):
    types = {"Scene Understanding": 1, "Instances Counting": 5}
    questions, prompts = [], []
    for i, (type_id, answer) in enumerate([(1, "A"), (1, "B"), (5, "C"), (5, "D"), (5, "A")]):
        png(tmp_path / "SEED-Bench-image" / f"{i}.jpg")
        questions.append({"answer": answer, "choice_a": "a", "choice_b": "b", "choice_c": "c", "choice_d": "d",
                          "data_id": f"{i}.jpg", "data_type": "image", "question": "q?", "question_id": str(50 + i),
                          "question_type_id": type_id})
        prompts.append({"image": f"SEED-Bench-image/{i}.jpg", "text": f"q?\nA. a\n{OPTION_LETTER}",
                        "question_id": str(50 + i)})
    questions.append({**questions[0], "question_id": "99", "data_type": "video"})  # its frame is absent: left out
    prompts.append({"image": "SEED-Bench-video-image/v99.png", "text": "q?", "question_id": "99"})
    (tmp_path / "SEED-Bench.json").write_text(json.dumps({"question_type": types, "questions": questions}))
    write_lines(tmp_path / "llava-seed-bench.jsonl", prompts)
    qs = load_benchmark("seed", tmp_path).questions
    assert len(qs) == 5
    got = seed.score(qs, dict(zip([q.key for q in qs], ["A", "C", "C", "D", "A."])))  # "A." is not "A" for LLaVA
    assert got["Scene Understanding"] == 0.5 and got["Instances Counting"] == pytest.approx(2 / 3)
    assert got["overall"] == pytest.approx(3 / 5) and got["image"] == got["overall"]


def test_seed_built_from_the_shapes_world_and_a_bad_id(sets, tmp_path):
    qs = load_benchmark("seed", sets["seed"]).questions
    assert len(qs) == 12 and all(q.prompt.endswith(OPTION_LETTER) and "\nD. " in q.prompt for q in qs)
    assert seed.score(qs, {q.key: q.meta["answer"] for q in qs})["overall"] == 1.0
    import shutil

    shutil.copytree(sets["seed"], tmp_path / "s")
    lines = [json.loads(l) for l in (tmp_path / "s" / "llava-seed-bench.jsonl").read_text().splitlines()]
    lines[4]["question_id"] = "nope"
    write_lines(tmp_path / "s" / "llava-seed-bench.jsonl", lines)
    with pytest.raises(UserError, match=r"llava-seed-bench.jsonl: line 5: question_id nope is not in"):
        load_benchmark("seed", tmp_path / "s")


def test_unknown_benchmark_and_missing_data(tmp_path):
    with pytest.raises(UserError, match="unknown benchmark 'vqav2'"):
        load_benchmark("vqav2", tmp_path)
    with pytest.raises(UserError, match="llava_pope_test.jsonl: not found"):
        load_benchmark("pope", tmp_path)


# ----------------------------------------------------------------------------- the table, the sweep, --compare


def test_table_delta_and_identical_share():
    from llava_edge.eval.run import EvalRun, SideResult
    from llava_edge.eval.table import markdown_table, rows_of

    ref = SideResult("reference", "ckpt:x", None, {"perception": 150.0, "cognition": 40.0}, {"a": "Yes", "b": "No"},
                     None)
    k32 = SideResult("bundle", "bundle:y", 32, {"perception": 125.5, "cognition": 40.0}, {"a": "Yes", "b": "Yes"}, 9.0)
    rows = rows_of(EvalRun("mme", 2, [ref, k32]))
    assert [(r.metric, r.delta, r.identical) for r in rows] == [("perception", -24.5, 0.5), ("cognition", 0.0, 0.5)]
    assert "| mme | perception | 32 | 150.0 | 125.5 | -24.5 | 50.0% |" in markdown_table(rows)


def test_sweep_parsing():
    from llava_edge.eval.eval_config import parse_sweep

    assert parse_sweep(None) == [None] and parse_sweep("576, 192,64") == [576, 192, 64]
    assert parse_sweep("all,16") == [None, 16]
    with pytest.raises(UserError, match="--image-tokens takes whole numbers"):
        parse_sweep("192,half")


def test_compare_needs_every_answer(tmp_path):
    from llava_edge.eval.items import Question
    from llava_edge.eval.predictions import compared_answers

    qs = [Question("1", "x.jpg", "q"), Question("2", "x.jpg", "q")]
    line = {"benchmark": "pope", "model": "ckpt:r", "side": "reference", "image_tokens": None, "question_id": "1",
            "answer": "Yes"}
    write_lines(tmp_path / "p.jsonl", [line, {**line, "model": "bundle:b", "side": "bundle", "question_id": "2"}])
    with pytest.raises(UserError, match=r"p.jsonl: no answer to pope question_id '2'"):
        compared_answers(tmp_path / "p.jsonl", "pope", qs)
    write_lines(tmp_path / "p.jsonl", [line, {**line, "question_id": "2", "answer": "No"}])
    assert compared_answers(tmp_path / "p.jsonl", "pope", qs) == ("ckpt:r", {"1": "Yes", "2": "No"})
