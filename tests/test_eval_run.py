"""`llava-edge eval` as a user runs it (real processes, torch blocked on the bundle side): the demo bundle on
benchmark files built from the shapes world, side by side with its reference, a sweep of K with its report, and
a 4-slot run killed with SIGKILL then resumed: every question answered once, the same metrics as a run never
killed."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from llava_edge.train.shapes_benchmarks import build_mmbench, build_pope

ROOT = Path(__file__).parents[1]
DEMO = ROOT / "llava_edge" / "assets" / "demo"
NO_TORCH = ("import sys; sys.modules['torch'] = None; sys.modules['transformers'] = None; "
            "from llava_edge.cli import main; main()")

pytestmark = pytest.mark.slow


def eval_cmd(*args, torch=False):
    head = [sys.executable, "-m", "llava_edge.cli"] if torch else [sys.executable, "-c", NO_TORCH]
    return [*head, "eval", *map(str, args), "--threads", "1"]


def run_eval(*args, torch=False, timeout=600):
    return subprocess.run(eval_cmd(*args, torch=torch), capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def lines_of(path: Path) -> list[dict]:
    return [json.loads(l) for l in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def pope_dir(tmp_path_factory):
    return build_pope(tmp_path_factory.mktemp("pope"), 16, seed=5)  # 48 questions


@pytest.fixture(scope="module")
def whole_run(pope_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("whole") / "p.jsonl"
    proc = run_eval("pope", pope_dir, "--bundle", DEMO / "bundle", "--parallel", "4", "--predictions", out, "--json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout), out


def test_demo_bundle_on_shapes_pope(whole_run):
    result, out = whole_run
    metrics = result["sides"][0]["metrics"]
    assert result["questions"] == 48 and len(lines_of(out)) == 48
    assert set(metrics) >= {"random/f1", "popular/f1", "adversarial/f1", "mean/f1", "mean/yes_ratio"}
    assert metrics["mean/accuracy"] > 0.8  # the demo answers the world's yes/no questions (94.7 % on its test set)


def test_sigkill_mid_run_then_resume_answers_each_once_with_equal_metrics(pope_dir, whole_run, tmp_path):
    out = tmp_path / "killed.jsonl"
    proc = subprocess.Popen(eval_cmd("pope", pope_dir, "--bundle", DEMO / "bundle", "--parallel", "4",
                                     "--predictions", out, "--json"),
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while proc.poll() is None and not (out.exists() and out.read_bytes().count(b"\n") >= 6):
            time.sleep(0.005)  # wait on the file: the kill lands once some answers are written
    finally:
        proc.send_signal(signal.SIGKILL)
    assert proc.wait(60) == -signal.SIGKILL
    before = lines_of(out)
    assert 6 <= len(before) < 48, "the kill did not land mid-run"
    again = run_eval("pope", pope_dir, "--bundle", DEMO / "bundle", "--parallel", "4", "--predictions", out, "--json")
    assert again.returncode == 0, again.stderr[-3000:]
    ids = [r["question_id"] for r in lines_of(out)]
    assert len(ids) == len(set(ids)) == 48
    assert lines_of(out)[: len(before)] == before
    assert json.loads(again.stdout)["sides"][0]["metrics"] == whole_run[0]["sides"][0]["metrics"]


def test_side_by_side_with_the_reference_and_a_sweep_report(tmp_path):
    data = build_mmbench(tmp_path / "mmbench", 6, seed=2)
    report = tmp_path / "report"
    pred = tmp_path / "p.jsonl"
    proc = run_eval("mmbench", data, "--bundle", DEMO / "bundle", "--ckpt", DEMO / "checkpoint",
                    "--image-tokens", "all,32", "--predictions", pred, "--report", report, "--json", torch=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout)
    sides = {(s["side"], s["image_tokens"]) for s in result["sides"]}
    assert sides == {("reference", None), ("bundle", None), ("bundle", 32)}
    row = next(r for r in result["rows"] if r["metric"] == "single" and r["image_tokens"] is None)
    assert row["delta"] == pytest.approx(row["bundle"] - row["reference"]) and 0 <= row["identical"] <= 1
    assert (report / "mmbench.md").is_file() and (report / "mmbench-image-tokens.png").stat().st_size > 1000
    # the same answers again, from the file: --compare sets the bundle beside them without the reference model
    again = run_eval("mmbench", data, "--bundle", DEMO / "bundle", "--compare", pred, "--predictions", pred,
                     "--json")
    assert again.returncode == 0, again.stderr[-3000:]
    assert json.loads(again.stdout)["rows"] == [r for r in result["rows"] if r["image_tokens"] is None]


def test_a_missing_image_is_one_line_and_exit_2(tmp_path):
    data = build_pope(tmp_path / "pope", 2, seed=1)
    (data / "val2014" / "COCO_val2014_000000000001.jpg").unlink()
    proc = run_eval("pope", data, "--bundle", DEMO / "bundle")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "llava_pope_test.jsonl" in proc.stderr and "COCO_val2014_000000000001.jpg" in proc.stderr


def test_ctrl_c_stops_with_130_and_the_rerun_finishes(pope_dir, whole_run, tmp_path):
    out = tmp_path / "interrupted.jsonl"
    proc = subprocess.Popen(eval_cmd("pope", pope_dir, "--bundle", DEMO / "bundle", "--parallel", "4",
                                     "--predictions", out),
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    while proc.poll() is None and not (out.exists() and out.read_bytes().count(b"\n") >= 4):
        time.sleep(0.005)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "interrupted" in err and "Traceback" not in err, err[-2000:]
    again = run_eval("pope", pope_dir, "--bundle", DEMO / "bundle", "--predictions", out, "--json")
    assert again.returncode == 0, again.stderr[-3000:]
    assert sorted(r["question_id"] for r in lines_of(out)) == sorted(r["question_id"] for r in lines_of(whole_run[1]))


def test_another_kv_type_answers_again_into_the_same_predictions(pope_dir, whole_run, tmp_path):
    """A q8_0 KV is its own model in the predictions: a rerun with it answers every question again (it never takes
    the f16 answers as its own), and a bad type is one line, exit 2."""
    out = tmp_path / "p.jsonl"
    out.write_bytes(whole_run[1].read_bytes())
    proc = run_eval("pope", pope_dir, "--bundle", DEMO / "bundle", "--parallel", "4", "--predictions", out,
                    "--kv-type", "q8_0", "--json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = lines_of(out)
    assert len(lines) == 96 and len({line["model"] for line in lines}) == 2
    bad = run_eval("pope", pope_dir, "--bundle", DEMO / "bundle", "--kv-type", "q5_1")
    assert bad.returncode == 2 and "kv-type must be one of" in bad.stderr and "Traceback" not in bad.stderr
