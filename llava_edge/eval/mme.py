"""MME as LLaVA-1.5 reads it: `MME_Benchmark_release_version/<task>/` in either layout (`images/` beside
`questions_answers_YN/`, or each image beside its .txt), two "question<TAB>Yes|No" lines per image; with LLaVA's
`llava_mme.jsonl` (question_id "task/…/image.ext", image, text) when present, else its prompts made the way
LLaVA made that file. Scored as MME's calculation.py: per task acc×100 + acc+×100 (acc+: every question about an
image right); perception sums its 10 tasks, cognition its 4."""

from __future__ import annotations

from pathlib import Path

from ..errors import UserError
from .items import SHORT_ANSWER, Question, field_of, image_file, need_dir, ratio, read_jsonl

RELEASE = "MME_Benchmark_release_version"
PROMPTS = "llava_mme.jsonl"
YES_OR_NO = "Please answer yes or no."
PERCEPTION = ("existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark", "artwork", "OCR")
COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")
IMAGE_SUFFIXES = (".jpg", ".png", ".jpeg", ".JPG", ".PNG", ".JPEG")


def release_dir(data: Path) -> Path:
    """DATA may be LLaVA's MME folder (holding the release and llava_mme.jsonl) or the release folder itself."""
    return data / RELEASE if (data / RELEASE).is_dir() else need_dir(data, f"MME: {RELEASE}/ or the folder holding it")


def bare(question: str) -> str:
    """A question without either suffix: how LLaVA's prompt and MME's txt line are matched."""
    return question.replace(SHORT_ANSWER, "").replace(YES_OR_NO, "").strip()


def ground_truth(release: Path) -> list[Question]:
    """Every (task, image, question) in the release, keyed task/stem/i, prompt made as LLaVA made it."""
    questions = []
    for task_dir in sorted(p for p in release.iterdir() if p.is_dir()):
        task = task_dir.name
        images, texts = ((task_dir / "images", task_dir / "questions_answers_YN") if (task_dir / "images").is_dir()
                         else (task_dir, task_dir))
        need_dir(texts, f"MME task {task}: its questions")
        for txt in sorted(texts.glob("*.txt")):
            image = next((images / (txt.stem + s) for s in IMAGE_SUFFIXES if (images / (txt.stem + s)).is_file()), None)
            if image is None:
                raise UserError(f"{txt}: no image {txt.stem}.jpg or .png in {images}")
            for i, line in enumerate(l for l in txt.read_text(encoding="utf-8").splitlines() if l.strip()):
                parts = line.strip().split("\t")
                if len(parts) != 2 or parts[1].strip().lower() not in ("yes", "no"):
                    raise UserError(f"{txt}: line {i + 1} is not 'question<TAB>Yes|No': {line!r}")
                meta = {"task": task, "image": f"{task}/{txt.stem}", "label": parts[1].strip().lower()}
                questions.append(Question(f"{task}/{txt.stem}/{i}", str(image), f"{bare(parts[0])}\n{SHORT_ANSWER}",
                                          meta))
    if not questions:
        raise UserError(f"{release}: no MME task folders with question files")
    return questions


def load(data: Path) -> list[Question]:
    release = release_dir(data)
    questions = ground_truth(release)
    prompts = next((p for p in (data / PROMPTS, release.parent / PROMPTS) if p.is_file()), None)
    if prompts is None:
        return questions
    by_question = {(q.meta["image"], bare(q.prompt)): q for q in questions}
    ordered = []
    for n, record in enumerate(read_jsonl(prompts), 1):
        where = f"line {n}"
        qid, text = field_of(record, "question_id", prompts, where), field_of(record, "text", prompts, where)
        image = image_file(release, field_of(record, "image", prompts, where), prompts, where)
        task, stem = qid.split("/")[0], Path(qid.split("/")[-1]).stem
        q = by_question.get((f"{task}/{stem}", bare(text)))
        if q is None:
            raise UserError(f"{prompts}: {where}: question_id {qid!r} asks {bare(text)!r}, which {RELEASE}/{task} "
                            "does not hold")
        q.image, q.prompt = image, text
        ordered.append(q)
    return ordered


def yes_no(answer: str) -> str:
    """MME's reading of an answer: yes/no when it is one, else by its first four characters, else 'other'."""
    text = answer.lower()
    if text in ("yes", "no"):
        return text
    return "yes" if "yes" in text[:4] else "no" if "no" in text[:4] else "other"


def score(questions: list[Question], answers: dict[str, str]) -> dict[str, float]:
    out: dict[str, float] = {}
    tasks = sorted({q.meta["task"] for q in questions},
                   key=lambda t: ((PERCEPTION + COGNITION).index(t) if t in PERCEPTION + COGNITION else 99, t))
    for task in tasks:
        chosen = [q for q in questions if q.meta["task"] == task]
        right = {q.key: yes_no(answers[q.key]) == q.meta["label"] for q in chosen}
        images = {}
        for q in chosen:
            images[q.meta["image"]] = images.get(q.meta["image"], True) and right[q.key]
        acc, acc_plus = ratio(sum(right.values()), len(chosen)), ratio(sum(images.values()), len(images))
        out.update({f"{task}/acc": acc, f"{task}/acc+": acc_plus, task: 100 * acc + 100 * acc_plus})
    for name, group in (("perception", PERCEPTION), ("cognition", COGNITION)):
        if any(t in group for t in tasks):
            out[name] = sum(out[t] for t in tasks if t in group)
    return out


HEADLINE = ("perception", "cognition")
