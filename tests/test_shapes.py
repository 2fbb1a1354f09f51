import hashlib
import json
import re
from collections import Counter

import numpy as np
import pytest
import sentencepiece as spm
from PIL import Image

from llava_edge import scoring
from llava_edge.conversation import VICUNA_SYSTEM
from llava_edge.train import shapes
from llava_edge.train.shapes import (
    COLOR_RGB,
    SHORT_ANSWER_SUFFIX,
    Scene,
    ShapeObject,
    build_dataset,
    caption,
    questions_for,
    render_scene,
    sample_scene,
    train_tokenizer,
    world_texts,
)


def _scenes(n, seed=0):
    rng = np.random.default_rng(seed)
    return [sample_scene(rng) for _ in range(n)]


def _tree_digest(root):
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp("world")
    return out, build_dataset(out, n_train_images=12, n_test_images=6, seed=3, progress=False)


# ---------------------------------------------------------------- scenes and pixels


def test_same_seed_same_files_other_seed_differs(dataset, tmp_path):
    out, _ = dataset
    build_dataset(tmp_path / "again", 12, 6, seed=3, progress=False)
    build_dataset(tmp_path / "other", 12, 6, seed=4, progress=False)
    reference = _tree_digest(out)
    assert _tree_digest(tmp_path / "again") == reference
    other = _tree_digest(tmp_path / "other")
    assert other["images/train_000000.png"] != reference["images/train_000000.png"]
    assert other["stage2.json"] != reference["stage2.json"]


def test_scene_sizes_objects_and_separation():
    counts = Counter()
    for scene in _scenes(300):
        assert 160 <= scene.width <= 320 and 160 <= scene.height <= 320
        assert all(215 <= c <= 255 for c in scene.background)
        assert 1 <= len(scene.objects) <= 3
        counts[len(scene.objects)] += 1
        short = min(scene.width, scene.height)
        pairs = [(o.color, o.shape) for o in scene.objects]
        assert len(set(pairs)) == len(pairs)
        for o in scene.objects:
            assert short / 5 <= o.size <= 0.45 * short
            x0, y0, x1, y1 = o.bbox
            assert x0 >= 0 and y0 >= 0 and x1 <= scene.width and y1 <= scene.height
        for i, a in enumerate(scene.objects):
            for b in scene.objects[i + 1:]:
                ax0, ay0, ax1, ay1 = a.bbox
                bx0, by0, bx1, by1 = b.bbox
                assert ax1 <= bx0 or bx1 <= ax0 or ay1 <= by0 or by1 <= ay0, (a, b)
    assert all(counts[n] > 50 for n in (1, 2, 3))
    assert len({(s.width, s.height) for s in _scenes(50)}) > 40  # sizes vary, non-square is normal


def test_rendered_pixels_show_each_object_in_its_colour():
    for scene in _scenes(40, seed=1):
        pixels = np.asarray(render_scene(scene)).astype(int)
        assert pixels.shape == (scene.height, scene.width, 3)
        assert (pixels[0, 0] == scene.background).all()  # objects keep off the edges
        for o in scene.objects:
            x0, y0, x1, y1 = o.bbox
            inside = pixels[y0:y1, x0:x1]
            filled = (np.abs(inside - np.array(o.fill)).max(axis=-1) == 0).mean()
            # circle ~0.785 of its box, triangle ~0.5, square 1
            expected = {"circle": 0.7, "square": 0.95, "triangle": 0.45}[o.shape]
            assert filled >= expected, (o, filled)
            palette = np.array(COLOR_RGB[o.color])
            assert np.abs(np.array(o.fill) - palette).max() <= shapes.COLOR_JITTER
            # nearest palette colour of the fill is the object's named colour
            nearest = min(COLOR_RGB, key=lambda c: np.abs(np.array(COLOR_RGB[c]) - o.fill).sum())
            assert nearest == o.color


def test_shapes_are_drawn_as_their_shape():
    scene = Scene(200, 200, (240, 240, 240), [
        ShapeObject("circle", "red", 50, 50, 60),
        ShapeObject("square", "blue", 150, 50, 60),
        ShapeObject("triangle", "green", 100, 150, 60),
    ])
    px = np.asarray(render_scene(scene)).astype(int)
    assert tuple(px[21, 21]) == (240, 240, 240)  # circle's box corner is background
    assert tuple(px[50, 50]) == COLOR_RGB["red"]
    assert tuple(px[21, 121]) == COLOR_RGB["blue"]  # square's box corner is filled
    assert tuple(px[122, 100]) == COLOR_RGB["green"]  # triangle apex column near the top
    assert tuple(px[122, 72]) == (240, 240, 240)  # top-left of triangle's box is background
    assert tuple(px[178, 72]) == COLOR_RGB["green"]  # bottom-left corner is filled


# ---------------------------------------------------------------- language


def test_caption_orders_objects_left_to_right():
    bg = (240, 240, 240)
    one = Scene(200, 200, bg, [ShapeObject("triangle", "yellow", 100, 100, 50)])
    two = Scene(200, 200, bg, [ShapeObject("square", "blue", 150, 100, 50),
                               ShapeObject("circle", "red", 50, 100, 50)])
    three = Scene(300, 200, bg, [ShapeObject("triangle", "green", 250, 50, 50),
                                 ShapeObject("circle", "red", 50, 100, 50),
                                 ShapeObject("square", "blue", 150, 150, 50)])
    assert caption(one) == "A yellow triangle."
    assert caption(two) == "A red circle and a blue square."
    assert caption(three) == "A red circle, a blue square and a green triangle."


QUESTION_PREFIXES = {"What color": "color", "What shape": "shape", "How many": "count",
                     "Is there": "exists", "Describe": "describe"}


def _answer_from_scene(scene, qtype, question):
    objs = scene.objects
    if qtype == "color":
        shape = re.match(r"What color is the (\w+)\?", question).group(1)
        matches = [o for o in objs if o.shape == shape]
        assert len(matches) == 1, "color question must name a shape present exactly once"
        return matches[0].color.capitalize()
    if qtype == "shape":
        color = re.match(r"What shape is the (\w+) object\?", question).group(1)
        matches = [o for o in objs if o.color == color]
        assert len(matches) == 1, "shape question must name a colour present exactly once"
        return matches[0].shape.capitalize()
    if qtype == "count":
        return ["One", "Two", "Three"][len(objs) - 1]
    if qtype == "exists":
        color, shape = re.match(r"Is there a (\w+) (\w+) in the image\?", question).groups()
        return "Yes" if any(o.color == color and o.shape == shape for o in objs) else "No"
    return caption(scene)


def test_questions_are_answerable_and_correct():
    rng = np.random.default_rng(7)
    types = Counter()
    for scene in _scenes(400, seed=2):
        qas = questions_for(scene, rng)
        assert [t for t, _, _ in qas] == sorted({t for t, _, _ in qas}, key=scoring.QUESTION_TYPES.index)
        assert {"count", "exists", "describe"} <= {t for t, _, _ in qas}
        for qtype, question, answer in qas:
            types[qtype] += 1
            if qtype == "describe":
                assert question == "Describe the image."
            else:
                assert question.endswith(SHORT_ANSWER_SUFFIX)
                assert len(answer.split()) == 1 and answer[0].isupper()
            assert answer == _answer_from_scene(scene, qtype, question), (scene, question)
    assert types["color"] > 300 and types["shape"] > 300


def test_color_question_skipped_when_shape_is_ambiguous():
    bg = (240, 240, 240)
    scene = Scene(300, 200, bg, [ShapeObject("circle", "red", 50, 100, 50),
                                 ShapeObject("circle", "blue", 150, 100, 50)])
    for seed in range(20):
        qas = questions_for(scene, np.random.default_rng(seed))
        assert "color" not in [t for t, _, _ in qas]
        shape_q = [q for t, q, _ in qas if t == "shape"]
        assert shape_q and ("red" in shape_q[0] or "blue" in shape_q[0])


def test_exists_questions_are_balanced_and_no_is_mostly_near_miss():
    rng = np.random.default_rng(11)
    answers, near = Counter(), 0
    for scene in _scenes(1000, seed=5):
        _, question, answer = next(qa for qa in questions_for(scene, rng) if qa[0] == "exists")
        answers[answer] += 1
        if answer == "No":
            color, shape = re.match(r"Is there a (\w+) (\w+)", question).groups()
            near += any(o.color == color or o.shape == shape for o in scene.objects)
    assert 0.45 < answers["Yes"] / 1000 < 0.55
    assert near / answers["No"] > 0.85  # uniform over absent pairs gives ~0.68


# ---------------------------------------------------------------- dataset files


def test_dataset_json_has_llava_structure(dataset):
    out, paths = dataset
    assert set(paths) == {"images", "stage1", "stage2", "test", "clip_pairs", "tokenizer"}
    stage1 = json.loads(paths["stage1"].read_text())
    stage2 = json.loads(paths["stage2"].read_text())
    test = json.loads(paths["test"].read_text())
    clip_pairs = json.loads(paths["clip_pairs"].read_text())
    assert len(stage1) == len(stage2) == len(clip_pairs) == 12

    for rec in stage1:
        assert (out / rec["image"]).is_file() and rec["image"].startswith("images/train_")
        assert rec["conversations"][0] == {"from": "human", "value": "<image>\n"}
        assert rec["conversations"][1]["from"] == "gpt"
        assert re.fullmatch(r"A [a-z ,]+\.", rec["conversations"][1]["value"])

    for rec in stage2:
        conv = rec["conversations"]
        assert 4 <= len(conv) <= 8 and len(conv) % 2 == 0
        assert [t["from"] for t in conv] == ["human", "gpt"] * (len(conv) // 2)
        assert conv[0]["value"].startswith("<image>\n")
        assert all("<image>" not in t["value"] for t in conv[1:])

    by_image = {r["image"]: r for r in clip_pairs}
    for rec in stage1:
        assert by_image[rec["image"]]["caption"] == rec["conversations"][1]["value"]
        assert by_image[rec["image"]]["texts"][0] == rec["conversations"][1]["value"]

    for pair in clip_pairs:  # the boxes for the tower's grounding term: each one holds its object's colour
        pixels = np.asarray(Image.open(out / pair["image"]))
        assert list(pixels.shape[1::-1]) == pair["size"]
        for obj in pair["objects"]:
            x0, y0, x1, y1 = obj["bbox"]
            centre = pixels[(y0 + y1) // 2 + (y1 - y0) // 4, (x0 + x1) // 2].astype(int)  # below the middle
            assert np.abs(centre - shapes.COLOR_RGB[obj["color"]]).max() <= shapes.COLOR_JITTER

    assert {r["question_type"] for r in test} == set(scoring.QUESTION_TYPES)
    train_images = {r["image"] for r in stage1}
    for rec in test:
        assert rec["image"].startswith("images/test_") and rec["image"] not in train_images
        assert (out / rec["image"]).is_file()
        human, gpt = rec["conversations"]
        assert human["from"] == "human" and human["value"].startswith("<image>\n")
        assert gpt == {"from": "gpt", "value": rec["answer"]}
    assert len({r["id"] for r in test}) == len(test)


def test_stage2_answers_match_the_rendered_scene(dataset):
    # Rebuild the scene from the per-image seed and check every turn against it.
    out, paths = dataset
    for rec in json.loads(paths["stage2"].read_text())[:6]:
        i = int(rec["id"].split("_")[1])
        scene = sample_scene(np.random.default_rng([3, 0, i]))
        assert np.array_equal(np.asarray(render_scene(scene)), np.asarray(Image.open(out / rec["image"])))
        conv = rec["conversations"]
        for human, gpt in zip(conv[0::2], conv[1::2]):
            question = human["value"].removeprefix("<image>\n")
            qtype = next(t for prefix, t in QUESTION_PREFIXES.items() if question.startswith(prefix))
            assert gpt["value"] == _answer_from_scene(scene, qtype, question)


def test_describe_always_adds_the_description_and_changes_nothing_else(dataset, tmp_path):
    out, paths = dataset
    other = tmp_path / "describe"
    build_dataset(other, 12, 6, seed=3, progress=False, describe_always=True)
    reference, changed = _tree_digest(out), _tree_digest(other)
    assert {k for k in reference if reference[k] != changed[k]} == {"stage2.json"}

    default_turns = [[t["value"] for t in r["conversations"][0::2]] for r in json.loads(paths["stage2"].read_text())]
    turns = [[t["value"] for t in r["conversations"][0::2]] for r in json.loads((other / "stage2.json").read_text())]
    is_describe = [[q.removeprefix("<image>\n") == shapes.DESCRIBE_QUESTION for q in conv] for conv in turns]
    assert all(sum(flags) == 1 for flags in is_describe)
    assert len({flags.index(True) for flags in is_describe}) > 1  # not always the same turn
    assert not all(any(q.endswith(shapes.DESCRIBE_QUESTION) for q in conv) for conv in default_turns)


# ---------------------------------------------------------------- tokenizer


def test_tokenizer_has_llama_ids_and_bpe_type(dataset):
    from sentencepiece import sentencepiece_model_pb2

    _, paths = dataset
    assert paths["tokenizer"].name == "tokenizer.model"
    sp = spm.SentencePieceProcessor(model_file=str(paths["tokenizer"]))
    assert (sp.unk_id(), sp.bos_id(), sp.eos_id(), sp.pad_id()) == (0, 1, 2, -1)
    assert sp.vocab_size() == 512
    assert sp.id_to_piece(3) == "<0x00>" and sp.id_to_piece(258) == "<0xFF>"

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(paths["tokenizer"].read_bytes())
    spec, norm = proto.trainer_spec, proto.normalizer_spec
    assert spec.model_type == sentencepiece_model_pb2.TrainerSpec.BPE
    assert spec.byte_fallback and spec.split_digits and spec.allow_whitespace_only_pieces
    assert norm.name == "identity" and norm.add_dummy_prefix and not norm.remove_extra_whitespaces


def test_tokenizer_is_compact_on_world_text_and_round_trips_anything(dataset):
    _, paths = dataset
    sp = spm.SentencePieceProcessor(model_file=str(paths["tokenizer"]))
    # world words are single pieces, not spelled out
    caption_text = "A red circle, a blue square and a green triangle."
    assert len(sp.encode(caption_text)) == len(caption_text.split()) + 2  # + "," and "."
    assert len(sp.encode(VICUNA_SYSTEM)) <= 32
    for answer in ["Red", "Yellow", "Triangle", "Yes", "No", "Three"]:
        assert sp.encode(answer, out_type=str) == ["▁" + answer]  # one-word answers are one token
    for text in ["A red circle and a blue square.", "Émoji 🦙 and 中文 — ok\ttab  two spaces",
                 "12345 digits", "  leading spaces", VICUNA_SYSTEM]:
        ids = sp.encode(text)
        assert sp.decode(ids) == text
        assert 0 not in ids  # byte fallback: nothing becomes <unk>
    assert sp.encode("123", out_type=str) == ["▁", "1", "2", "3"]  # split_digits


def test_tokenizer_training_is_deterministic(tmp_path):
    a = train_tokenizer(world_texts(), tmp_path / "a", 384)
    b = train_tokenizer(world_texts(), tmp_path / "b", 384)
    assert a.read_bytes() == b.read_bytes()
    assert spm.SentencePieceProcessor(model_file=str(a)).vocab_size() == 384
    with pytest.raises(ValueError, match="too small"):
        train_tokenizer(world_texts(), tmp_path / "c", 260)
