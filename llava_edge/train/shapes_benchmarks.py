"""LLaVA-1.5's benchmark files (POPE, MME, MMBench, SEED-Bench) made from the shapes world, with the exact file
names, keys and columns of the real ones, so that `llava-edge eval` can be tried, tested and measured where the
real benchmark images cannot be had. The questions are the world's, in each benchmark's wording."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import numpy as np

from .shapes import COLORS, COUNT_WORDS, SHAPES, Scene, render_scene, sample_scene

SHORT_ANSWER = "\nAnswer the question using a single word or phrase."
OPTION_LETTER = "\nAnswer with the option's letter from the given choices directly."
MMBENCH_COLUMNS = ("index", "question", "hint", "A", "B", "C", "D", "answer", "category", "image", "source",
                   "l2-category", "comment", "split")


def _scenes(n: int, seed: int) -> tuple[list[Scene], np.random.Generator]:
    rng = np.random.default_rng(seed)
    return [sample_scene(rng) for _ in range(n)], rng


def _pairs(scene: Scene) -> set[tuple[str, str]]:
    return {(o.color, o.shape) for o in scene.objects}


def _jpeg(scene: Scene, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    render_scene(scene).save(path, format="JPEG", quality=95)


def _pope_pair(scene: Scene, category: str, rng: np.random.Generator, counts: dict) -> tuple[str, str, str]:
    """(color, shape, label): half present; absent ones random, the set's most common (popular), or sharing a
    colour or shape with the scene (adversarial), as POPE samples its negatives."""
    present = sorted(_pairs(scene))
    if rng.random() < 0.5:
        color, shape = present[int(rng.integers(len(present)))]
        return color, shape, "yes"
    absent = [(c, s) for c in COLORS for s in SHAPES if (c, s) not in _pairs(scene)]
    if category == "popular":
        absent = sorted(absent, key=lambda p: -counts.get(p, 0))[:3]
    elif category == "adversarial":
        near = [(c, s) for c, s in absent if any(c == o.color or s == o.shape for o in scene.objects)]
        absent = near or absent
    color, shape = absent[int(rng.integers(len(absent)))]
    return color, shape, "no"


def build_pope(out: Path, n_images: int, seed: int = 0) -> Path:
    """out/llava_pope_test.jsonl, out/coco/coco_pope_{random,popular,adversarial}.json (labels in another order
    than the questions), out/val2014/COCO_val2014_*.jpg."""
    scenes, rng = _scenes(n_images, seed)
    counts: dict = {}
    for scene in scenes:
        for pair in _pairs(scene):
            counts[pair] = counts.get(pair, 0) + 1
    questions, labels = [], {c: [] for c in ("random", "popular", "adversarial")}
    for i, scene in enumerate(scenes):
        image = f"COCO_val2014_{i:012d}.jpg"
        _jpeg(scene, out / "val2014" / image)
        for category in labels:
            color, shape, label = _pope_pair(scene, category, rng, counts)
            text = f"Is there a {color} {shape} in the image?"
            qid = len(questions)
            questions.append({"question_id": qid, "image": image, "text": text + SHORT_ANSWER, "category": category})
            labels[category].append({"question_id": qid, "image": image, "text": text, "label": label})
    _write_lines(out / "llava_pope_test.jsonl", questions)
    for category, lines in labels.items():
        _write_lines(out / "coco" / f"coco_pope_{category}.json", lines[::-1])
    return out


def _mme_questions(scene: Scene, task: str, rng: np.random.Generator) -> list[tuple[str, str]]:
    """Two (question, Yes|No) about one image, one of each answer, as MME pairs them."""
    present = sorted(_pairs(scene))
    absent = [(c, s) for c in COLORS for s in SHAPES if (c, s) not in _pairs(scene)]
    if task == "existence":
        (c1, s1), (c2, s2) = present[int(rng.integers(len(present)))], absent[int(rng.integers(len(absent)))]
        return [(f"Is there a {c1} {s1} in this image?", "Yes"), (f"Is there a {c2} {s2} in this image?", "No")]
    if task == "count":
        n = len(scene.objects)
        wrong = [k for k in COUNT_WORDS if k != n][int(rng.integers(len(COUNT_WORDS) - 1))]
        return [(f"Are there {COUNT_WORDS[n].lower()} shapes in this image?", "Yes"),
                (f"Are there {COUNT_WORDS[wrong].lower()} shapes in this image?", "No")]
    obj = scene.objects[int(rng.integers(len(scene.objects)))]
    other = [c for c in COLORS if c != obj.color][int(rng.integers(len(COLORS) - 1))]
    return [(f"Is the {obj.shape} {obj.color}?", "Yes"), (f"Is the {obj.shape} {other}?", "No")]


def build_mme(out: Path, n_images: int, seed: int = 0) -> Path:
    """out/MME_Benchmark_release_version/{existence,count}/ with image + txt side by side, .../color/ with images/
    and questions_answers_YN/, and LLaVA's out/llava_mme.jsonl."""
    scenes, rng = _scenes(n_images, seed)
    release = out / "MME_Benchmark_release_version"
    prompts = []
    for i, scene in enumerate(scenes):
        task = ("existence", "count", "color")[i % 3]
        images, texts = ((release / task / "images", release / task / "questions_answers_YN") if task == "color"
                         else (release / task, release / task))
        name = f"{i:05d}"
        _jpeg(scene, images / f"{name}.jpg")
        qas = _mme_questions(scene, task, rng)
        texts.mkdir(parents=True, exist_ok=True)
        (texts / f"{name}.txt").write_text("".join(f"{q} Please answer yes or no.\t{a}\n" for q, a in qas))
        image = str((images / f"{name}.jpg").relative_to(release))
        prompts += [{"question_id": f"{task}/{name}.jpg", "image": image, "text": q + SHORT_ANSWER, "category": task}
                    for q, _ in qas]
    _write_lines(out / "llava_mme.jsonl", prompts)
    return out


def _choice_question(scene: Scene, rng: np.random.Generator) -> tuple[str, list[str], str, str]:
    """(question, options, right option, category) about one scene: its shapes count, a shape's colour, or a
    colour's shape."""
    kind = int(rng.integers(3))
    obj = scene.objects[int(rng.integers(len(scene.objects)))]
    unique_shape = [o.shape for o in scene.objects].count(obj.shape) == 1
    unique_color = [o.color for o in scene.objects].count(obj.color) == 1
    if kind == 1 and unique_shape:
        return f"What color is the {obj.shape}?", [c.capitalize() for c in COLORS], obj.color.capitalize(), \
            "Instance Attributes"
    if kind == 2 and unique_color:
        return f"What shape is the {obj.color} object?", [s.capitalize() for s in SHAPES], obj.shape.capitalize(), \
            "Instance Identity"
    return "How many shapes are there?", ["One", "Two", "Three"], COUNT_WORDS[len(scene.objects)], \
        "Instances Counting"


def _shuffled(options: list[str], rng: np.random.Generator) -> list[str]:
    return [options[i] for i in rng.permutation(len(options))]


def build_mmbench(out: Path, n_images: int, seed: int = 0) -> Path:
    """out/mmbench_dev_20230712.tsv: MMBench's dev columns, base64 PNG images, 'nan' for a missing option D."""
    scenes, rng = _scenes(n_images, seed)
    rows = ["\t".join(MMBENCH_COLUMNS)]
    for i, scene in enumerate(scenes):
        question, options, right, category = _choice_question(scene, rng)
        options = _shuffled(options, rng)
        letters = "ABCD"
        cells = options + ["nan"] * (4 - len(options))
        buffer = io.BytesIO()
        render_scene(scene).save(buffer, format="PNG")
        hint = "The image shows coloured shapes." if i % 4 == 0 else "nan"
        row = [str(1000 + i), question, hint, *cells, letters[options.index(right)], category.lower().replace(" ", "_"),
               base64.b64encode(buffer.getvalue()).decode(), "shapes", "perception", "nan", "dev"]
        rows.append("\t".join(row))
    out.mkdir(parents=True, exist_ok=True)
    (out / "mmbench_dev_20230712.tsv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    return out


def build_seed(out: Path, n_images: int, seed: int = 0) -> Path:
    """out/SEED-Bench.json, out/llava-seed-bench.jsonl and out/SEED-Bench-image/*.jpg; four options each."""
    scenes, rng = _scenes(n_images, seed)
    types = {"Instance Attributes": 2, "Instance Identity": 3, "Instances Counting": 5}
    annotations, prompts = [], []
    for i, scene in enumerate(scenes):
        question, options, right, category = _choice_question(scene, rng)
        options = _shuffled((options + ["Four"])[:4] if len(options) < 4 else options, rng)
        data_id = f"{i:07d}_shapes"
        _jpeg(scene, out / "SEED-Bench-image" / f"{data_id}.jpg")
        qid = str(200000 + i)
        answer = "ABCD"[options.index(right)]
        annotations.append({"answer": answer, **{f"choice_{l}": o for l, o in zip("abcd", options)},
                            "data_id": f"{data_id}.jpg", "data_type": "image", "question": question,
                            "question_id": qid, "question_type_id": types[category]})
        text = question + "".join(f"\n{l}. {o}" for l, o in zip("ABCD", options)) + OPTION_LETTER
        prompts.append({"image": f"SEED-Bench-image/{data_id}.jpg", "text": text, "category": category,
                        "question_id": qid})
    out.mkdir(parents=True, exist_ok=True)
    (out / "SEED-Bench.json").write_text(json.dumps({"question_type": types, "questions": annotations}))
    _write_lines(out / "llava-seed-bench.jsonl", prompts)
    return out


def build_all(out: Path, n_images: int, seed: int = 0) -> dict[str, Path]:
    """Every benchmark under out/ in LLaVA's playground layout (pope/, MME/, mmbench/, seed_bench/)."""
    return {"pope": build_pope(out / "pope", n_images, seed), "mme": build_mme(out / "MME", n_images, seed + 1),
            "mmbench": build_mmbench(out / "mmbench", n_images, seed + 2),
            "seed": build_seed(out / "seed_bench", n_images, seed + 3)}


def _write_lines(path: Path, records: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
