"""The demo model's structured answers on the shapes world's held-out split: every image asked for its objects as
JSON (held to a schema) while the split's free questions run in the same batches (--parallel 4, mixed); then the
free questions again one at a time. Reports the share of structured answers that parse and validate, how often
their objects match the image's caption, and whether the free answers equal the serial ones.

    python experiments/structured_demo.py [--images 100] [--parallel 4] [--threads 2] [--work runs/structured_demo]
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import jsonschema

from llava_edge.bench.image_tokens_case import heldout_split
from llava_edge.paths import DEMO_BUNDLE
from llava_edge.runtime import Engine, EngineConfig, Message
from llava_edge.runtime.sampling import SamplingConfig
from llava_edge.scoring import answer_of, load_test_records, question_of

OBJECTS = {"type": "object", "properties": {"objects": {
    "type": "array", "minItems": 1, "maxItems": 3,
    "items": {"type": "object", "properties": {"color": {"enum": ["red", "green", "blue", "yellow"]},
                                               "shape": {"enum": ["circle", "square", "triangle"]}},
              "required": ["color", "shape"]}}}, "required": ["objects"]}
QUESTION = "Describe the image."


def caption_objects(caption: str) -> list[tuple[str, str]]:
    return re.findall(r"(red|green|blue|yellow) (circle|square|triangle)", caption.lower())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, default=100)
    ap.add_argument("--parallel", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--work", type=Path, default=Path("runs/structured_demo"))
    args = ap.parse_args()
    test = heldout_split(args.work)
    records = load_test_records(test)
    images = sorted({r["image"] for r in records})[: args.images]
    free = [r for r in records if r["image"] in images]
    captions = {r["image"]: answer_of(r) for r in free if question_of(r).startswith(QUESTION)}
    held_cfg = SamplingConfig(max_tokens=200, format=OBJECTS)
    free_cfg = SamplingConfig(max_tokens=24)
    engine = Engine.open(DEMO_BUNDLE, EngineConfig(parallel=args.parallel, queue=len(images) + len(free)),
                         threads=args.threads)
    engine.start()
    try:
        def ask(image, question, sampling):
            return engine.generate([Message("user", question, [(test.parent / image).read_bytes()])], sampling)

        held = {i: ask(i, QUESTION, held_cfg) for i in images[: len(images) // 2]}
        mixed = [ask(r["image"], question_of(r), free_cfg) for r in free]
        held |= {i: ask(i, QUESTION, held_cfg) for i in images[len(images) // 2:]}
        mixed_answers = [g.wait().text for g in mixed]
        held_answers = {i: g.wait() for i, g in held.items()}
        serial = [ask(r["image"], question_of(r), free_cfg).wait().text for r in free]
    finally:
        engine.close()
    valid, matching = 0, 0
    for image, answer in held_answers.items():
        try:
            value = json.loads(answer.text)
            jsonschema.validate(value, OBJECTS)
        except (json.JSONDecodeError, jsonschema.ValidationError):
            continue
        valid += 1
        got = sorted((o["color"], o["shape"]) for o in value["objects"])
        matching += got == sorted(caption_objects(captions.get(image, "")))
    report = {"images": len(images), "structured_valid": valid / len(images),
              "structured_objects_match_caption": matching / len(images),
              "free_questions": len(free), "free_equal_serial": sum(a == b for a, b in zip(mixed_answers, serial)) / len(free)}
    args.work.mkdir(parents=True, exist_ok=True)
    (args.work / "structured_demo.json").write_text(json.dumps(report, indent=1))
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
