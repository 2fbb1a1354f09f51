"""`llava-edge caption` as a user runs it (real processes): one correct line per image, errors recorded (the
exit code says so) and tried again by the next run, copies encoded once, answers equal to `llava-edge chat`'s whatever the batching, and a run killed at
any point (SIGKILL, Ctrl-C, a torn last line) resumed without a lost, torn or repeated line."""

import hashlib
import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from caption_run import PROMPT, assert_each_once, caption, caption_cmd, read_lines

from llava_edge.bench.caption_case import make_images
from llava_edge.caption.feeder import END, Feeder
from llava_edge.caption.inputs import find_images
from llava_edge.caption.results import ResultFile, done_key
from llava_edge.errors import ImageError, UserError

ROOT = Path(__file__).parents[1]
EXAMPLES = sorted((ROOT / "examples").glob("*.png"))


def chat_answer(image: Path) -> str:
    proc = subprocess.run([sys.executable, "-m", "llava_edge.cli", "chat", str(image), "--prompt", PROMPT,
                           "--threads", "1"], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout.strip()


@pytest.fixture(scope="module")
def parallel_run(caption_folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("p4") / "captions.jsonl"
    proc = caption(caption_folder, "--out", out, "--parallel", "4")
    assert proc.returncode == 1, proc.stderr[-3000:]  # the broken file has no answer
    assert "1 errors (a rerun tries them again)" in proc.stderr
    return out, proc


def test_every_image_gets_one_correct_line(caption_folder, parallel_run):
    out, proc = parallel_run
    lines = read_lines(out)
    files = sorted(caption_folder.iterdir())
    assert sorted(Path(r["path"]) for r in lines) == files
    by_name = {Path(r["path"]).name: r for r in lines}
    for f in files:
        r = by_name[f.name]
        assert r["sha256"] == hashlib.sha256(f.read_bytes()).hexdigest() and r["prompt"] == PROMPT
    broken = by_name["broken.png"]
    assert set(broken) == {"path", "sha256", "prompt", "error"} and str(caption_folder / "broken.png") in broken["error"]
    assert "corrupt" in broken["error"] or "truncated" in broken["error"]
    good = [r for r in lines if "error" not in r]
    assert len(good) == len(files) - 1
    for r in good:
        assert r["answer"] and r["finish_reason"] == "stop"
        assert {"vision_ms", "prefill_ms", "ttft_ms", "decode_tokens_per_s", "n_prompt_tokens"} <= set(r["timings"])
    assert "Traceback" not in proc.stderr


def test_a_copy_is_encoded_once(caption_folder, parallel_run):
    out, proc = parallel_run
    twins = [r for r in read_lines(out) if r["sha256"] == hashlib.sha256(EXAMPLES[0].read_bytes()).hexdigest()]
    assert len(twins) == 2 and twins[0]["answer"] == twins[1]["answer"]
    assert sorted(r["timings"]["image_cached"] for r in twins) == [False, True]
    assert [r["timings"]["vision_ms"] for r in twins if r["timings"]["image_cached"]] == [0.0]
    distinct = len(list(caption_folder.iterdir())) - 2  # the copy and the broken file are not encoded
    assert f"{distinct} images encoded" in proc.stderr


@pytest.mark.slow
def test_answers_equal_chat_and_do_not_depend_on_parallel(caption_folder, parallel_run, tmp_path):
    out4, _ = parallel_run
    out1 = tmp_path / "p1.jsonl"
    proc = caption(caption_folder, "--out", out1, "--parallel", "1")
    assert proc.returncode == 1, proc.stderr[-3000:]
    p4 = {r["path"]: r.get("answer") for r in read_lines(out4)}
    p1 = {r["path"]: r.get("answer") for r in read_lines(out1)}
    assert p4 == p1
    for path, answer in p4.items():
        if answer is not None and Path(path).name != "zz_copy.png":
            assert answer == chat_answer(Path(path)), path


@pytest.fixture(scope="module")
def many(tmp_path_factory):
    d = tmp_path_factory.mktemp("many")
    make_images(d, 40, seed=11)
    return d


def kill_when(proc: subprocess.Popen, out: Path, n_lines: int, sig: int) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if out.exists() and out.read_bytes().count(b"\n") >= n_lines:
            proc.send_signal(sig)
            return
        time.sleep(0.005)
    raise AssertionError(f"the run ended (or hung) before {n_lines} lines: {proc.poll()}")


def test_sigkill_mid_run_then_resume(many, tmp_path):
    out = tmp_path / "killed.jsonl"
    proc = subprocess.Popen(caption_cmd(many, "--out", out, "--parallel", "2"), cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    kill_when(proc, out, 3, signal.SIGKILL)
    assert proc.wait(30) == -signal.SIGKILL
    before = read_lines(out)
    assert 3 <= len(before) < 40, "the kill did not land mid-run"
    again = caption(many, "--out", out, "--parallel", "2")
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"{len(before)} already there" in again.stderr
    assert_each_once(out, many)
    assert read_lines(out)[: len(before)] == before  # what was done stays as it was


@pytest.mark.slow
def test_sigkill_mid_run_with_a_format_then_resume(many, tmp_path):
    """caption --format: killed mid-run, then resumed; every image once, every answer valid JSON of the schema."""
    import jsonschema

    schema = {"type": "object", "properties": {"shape": {"enum": ["circle", "square", "triangle"]},
                                               "count": {"type": "integer", "minimum": 1, "maximum": 3}},
              "required": ["shape", "count"], "additionalProperties": False}
    (tmp_path / "schema.json").write_text(json.dumps(schema))
    out = tmp_path / "killed.jsonl"
    args = ("--out", out, "--parallel", "2", "--format", tmp_path / "schema.json")
    proc = subprocess.Popen(caption_cmd(many, *args), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    kill_when(proc, out, 3, signal.SIGKILL)
    assert proc.wait(30) == -signal.SIGKILL
    before = read_lines(out)
    assert 3 <= len(before) < 40, "the kill did not land mid-run"
    again = caption(many, *args)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"{len(before)} already there" in again.stderr
    for line in assert_each_once(out, many):
        assert line["parsed"] == json.loads(line["answer"])
        jsonschema.validate(line["parsed"], schema)
    assert read_lines(out)[: len(before)] == before


def test_ctrl_c_finishes_cleanly_with_130_then_resume(many, tmp_path):
    out = tmp_path / "interrupted.jsonl"
    proc = subprocess.Popen(caption_cmd(many, "--out", out, "--parallel", "2"), cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    kill_when(proc, out, 2, signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err[-2000:]
    assert "interrupted" in err and "Traceback" not in err
    assert 2 <= len(read_lines(out)) < 40
    assert caption(many, "--out", out).returncode == 0
    assert_each_once(out, many)


def test_a_torn_last_line_is_cut_and_its_image_redone(caption_folder, parallel_run, tmp_path):
    out = tmp_path / "torn.jsonl"
    whole = parallel_run[0].read_bytes().splitlines(keepends=True)
    out.write_bytes(b"".join(whole[:3]) + whole[3][: len(whole[3]) // 2])  # killed inside its 4th write
    proc = caption(caption_folder, "--out", out)
    assert proc.returncode == 1 and "torn last line" in proc.stderr, proc.stderr[-2000:]  # broken.png again
    lines = read_lines(out)
    assert lines[:3] == [json.loads(line) for line in whole[:3]]
    last = {r["path"]: r for r in lines}  # the last line of a path holds
    assert sorted(last) == sorted(json.loads(line)["path"] for line in whole)
    retried = [r["path"] for r in lines[3:] if r["path"] in {x["path"] for x in lines[:3]}]
    assert all("error" in last[p] for p in retried)  # only an error line's file was asked again


def test_a_missing_input_fails_the_run_and_the_next_run_answers_it(tmp_path):
    later = tmp_path / "later.png"  # not there yet
    out = tmp_path / "out.jsonl"
    first = caption(EXAMPLES[0], later, "--out", out)
    assert first.returncode == 1, first.stderr[-2000:]
    before = read_lines(out)
    by_path = {r["path"]: r for r in before}
    assert len(before) == 2 and "answer" in by_path[str(EXAMPLES[0])] and str(later) in by_path[str(later)]["error"]

    shutil.copy(EXAMPLES[0], later)
    again = caption(EXAMPLES[0], later, "--out", out)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "1 lines written" in again.stderr and "1 already there" in again.stderr
    lines = read_lines(out)
    assert lines[:2] == before and len(lines) == 3  # the error line stays; the new line supersedes it
    assert lines[2]["path"] == str(later) and lines[2]["answer"] == by_path[str(EXAMPLES[0])]["answer"]  # a copy


def test_an_error_line_is_not_done_and_the_last_line_of_a_key_holds(tmp_path):
    out = tmp_path / "out.jsonl"
    records = [{"path": "a.png", "prompt": PROMPT, "answer": "A."}, {"path": "b.png", "prompt": PROMPT, "error": "x"},
               {"path": "c.png", "prompt": PROMPT, "error": "x"}, {"path": "c.png", "prompt": PROMPT, "answer": "C."},
               {"path": "d.png", "prompt": PROMPT, "answer": "D."}, {"path": "d.png", "prompt": PROMPT, "error": "x"},
               {"path": "a.png", "prompt": "Another question.", "error": "x"}]
    out.write_text("".join(json.dumps(r) + "\n" for r in records))
    results = ResultFile(out)
    assert results.open() == {done_key("a.png", PROMPT), done_key("c.png", PROMPT)}
    results.close()


def test_the_exit_code_says_whether_every_input_has_an_answer():
    from llava_edge.caption.local_run import CaptionSummary

    assert CaptionSummary(written=3).exit_code == 0
    assert CaptionSummary(written=3, errors=1).exit_code == 1
    assert CaptionSummary(written=2, failed=1).exit_code == 1
    assert CaptionSummary(written=2, errors=1, interrupted=True).exit_code == 130


def test_inputs_files_folders_globs_recursive(tmp_path, monkeypatch):
    (tmp_path / "sub").mkdir()
    for name in ("a.png", "b.JPG", "notes.txt", "sub/c.webp"):
        (tmp_path / name).write_bytes(b"x")
    monkeypatch.chdir(tmp_path)
    assert find_images(["."]) == ["a.png", "b.JPG"]
    assert find_images([".", "a.png", "*.png"], recursive=True) == ["a.png", "b.JPG", "sub/c.webp"]
    assert find_images(["**/*.webp", "missing.png"]) == ["sub/c.webp", "missing.png"]


class CountingVision:
    """Stands in for the VisionEncoder: the feeder's batching is what is under test here."""

    def __init__(self):
        self.batches = []

    def pixels(self, data, name):
        if data.startswith(b"bad"):
            raise ImageError(f"{name}: not an image file")
        return np.full((3, 2, 2), data[0], np.float32)

    def encode_pixels(self, pixels, image_tokens=None):
        self.batches.append(pixels.shape[0])
        return pixels.reshape(len(pixels), 3, 4)


def test_feeder_batches_distinct_images_and_encodes_copies_once(tmp_path):
    names = {"a": b"a1", "b": b"b22", "a_copy": b"a1", "c": b"c1", "bad": b"bad", "d": b"d1", "b_copy": b"b22"}
    for name, data in names.items():
        (tmp_path / name).write_bytes(data)
    vision = CountingVision()
    feeder = Feeder(vision, [str(tmp_path / n) for n in names], batch=2, depth=100)
    feeder.run()
    items = []
    while (item := feeder.items.get_nowait()) is not END:
        items.append(item)
    by_name = {Path(i.path).name: i for i in items}
    assert sorted(by_name) == sorted(names) and feeder.failure is None
    assert vision.batches == [2, 2] and feeder.encoded == 4  # a, b, c, d: the copies and the bad file never run
    assert by_name["bad"].error == f"{tmp_path / 'bad'}: not an image file"
    for copy, first in (("a_copy", "a"), ("b_copy", "b")):
        assert by_name[copy].image.cached and not by_name[first].image.cached
        assert by_name[copy].image.embeds is by_name[first].image.embeds
        assert by_name[copy].sha256 == hashlib.sha256(names[first]).hexdigest()
    assert [Path(i.path).name for i in items if i.image is not None] == ["a", "a_copy", "b", "b_copy", "c", "d"]


@pytest.mark.parametrize("args, words", [
    (["--out", "{tmp}"], ["is a directory"]),
    (["--out", "{tmp}/x.jsonl", "--prompt", " "], ["--prompt is empty"]),
    (["--out", "{tmp}/x.jsonl", "--parallel", "0"], ["--parallel"]),
])
def test_bad_options_are_one_line(tmp_path, args, words):
    proc = caption(EXAMPLES[0], *[a.replace("{tmp}", str(tmp_path)) for a in args])
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("llava-edge: error:") and all(w in lines[0] for w in words)


def test_one_writer_per_out_file(tmp_path):
    first = ResultFile(tmp_path / "out.jsonl")
    assert first.open() == set()
    with pytest.raises(UserError, match="another run is writing it"):
        ResultFile(tmp_path / "out.jsonl").open()
    first.close()
    second = ResultFile(tmp_path / "out.jsonl")
    assert second.open() == set()
    second.close()


def test_no_images_is_one_line(tmp_path):
    proc = caption(tmp_path, "--out", tmp_path / "x.jsonl")
    assert proc.returncode == 2 and "no image files" in proc.stderr


def test_the_driver_uses_the_token_ray_left(tmp_path):
    """After `ray start --head` found ~/.ray/auth_token, the cluster wants it; `--ray HOST:PORT` then sends it."""
    from llava_edge.caption.ray_cluster import use_the_token_ray_left

    env = {"HOME": str(tmp_path)}
    assert not use_the_token_ray_left("head:6379", env) and "RAY_AUTH_MODE" not in env  # no token: Ray's default
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text("a" * 32)
    for address in ("head:6379", "ray://head:10001", "auto"):
        env = {"HOME": str(tmp_path)}
        assert use_the_token_ray_left(address, env) and env["RAY_AUTH_MODE"] == "token"
    env = {"HOME": str(tmp_path), "RAY_AUTH_MODE": "disabled"}  # the user's word holds
    assert not use_the_token_ray_left("head:6379", env) and env["RAY_AUTH_MODE"] == "disabled"
    env = {"HOME": str(tmp_path)}
    assert not use_the_token_ray_left("local", env) and "RAY_AUTH_MODE" not in env  # a new cluster: Ray decides
    env = {"HOME": str(tmp_path / "elsewhere"), "RAY_AUTH_TOKEN": "b" * 32}
    assert use_the_token_ray_left("head:6379", env) and env["RAY_AUTH_MODE"] == "token"
