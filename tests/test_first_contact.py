"""What a new user meets first (issue 15), each through a real `llava-edge` process where it is about the CLI:
the README's demo questions answered as written, the demo's note, a runtime-only install, validation of
every number before work, bounded image reads, the manifest schema, --version, flags, build-demo's default."""

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hide_modules import cli_without

from llava_edge.errors import UserError
from llava_edge.image import max_file_bytes
from llava_edge.paths import DEMO_BUNDLE
from llava_edge.runtime.bundle import open_bundle

ROOT = Path(__file__).parents[1]
GREEN = ROOT / "examples" / "green_triangle.png"
LLAVA_EDGE = Path(sys.executable).parent / "llava-edge"
ERROR = "llava-edge: error:"


def run(*args, timeout=120, **kw):
    return subprocess.run([sys.executable, "-m", "llava_edge.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT, **kw)


def assert_one_line_error(proc, *words):
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(ERROR), proc.stderr
    assert "Traceback" not in proc.stderr and proc.stdout == ""
    for w in words:
        assert w in lines[0], lines[0]


# --------------------------------------------------------------------------- the README's demo questions


def readme_demo_commands() -> list[tuple[str, str]]:
    """(command, expected answer) for every `llava-edge chat examples/... --prompt ... # ANSWER` line."""
    found = []
    for line in (ROOT / "README.md").read_text().splitlines():
        m = re.match(r"^(llava-edge chat examples/\S+\.png --prompt .*?)\s+#\s+(.+)$", line)
        if m:
            found.append((m[1], m[2].strip()))
    return found


def test_readme_names_its_demo_questions():
    commands = readme_demo_commands()
    assert len(commands) >= 5
    assert {c.split()[2] for c, _ in commands} >= {"examples/green_triangle.png",
                                                   "examples/yellow_triangle_red_circle_blue_square.png"}
    for command, _ in commands:
        assert (ROOT / command.split()[2]).is_file(), command


@pytest.mark.slow
@pytest.mark.skipif(not LLAVA_EDGE.is_file(), reason="the llava-edge script is not installed in this environment")
@pytest.mark.parametrize("command, answer", readme_demo_commands())
def test_readme_demo_question_is_answered_as_written(command, answer):
    """Each line run by bash exactly as the README writes it (quoting included), with this venv's llava-edge."""
    env = dict(os.environ, PATH=f"{LLAVA_EDGE.parent}{os.pathsep}{os.environ.get('PATH', '')}")
    proc = subprocess.run(["bash", "-c", command], capture_output=True, text=True, timeout=120, cwd=ROOT, env=env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == answer, (command, proc.stdout)


# --------------------------------------------------------------------------- the demo says what it is


def test_the_demo_says_once_what_it_is():
    proc = run("chat", GREEN, "--prompt", "Describe the image.", "--threads", "1")
    assert proc.returncode == 0 and proc.stdout == "A green triangle.\n", proc.stderr
    notes = proc.stderr.strip().splitlines()
    assert len(notes) == 1 and "demo model" in notes[0] and "synthetic" in notes[0] and "--bundle" in notes[0]
    assert open_bundle(DEMO_BUNDLE).domain == "shapes-demo"  # read from the manifest, whose hashes still verify


def test_a_bundle_without_the_demo_domain_says_nothing(tmp_path):
    bundle = tmp_path / "bundle"
    shutil.copytree(DEMO_BUNDLE, bundle)
    manifest = json.loads((bundle / "manifest.json").read_text())
    del manifest["domain"]
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    proc = run("chat", GREEN, "--bundle", bundle, "--prompt", "Describe the image.", "--threads", "1")
    assert proc.returncode == 0 and proc.stderr == "" and proc.stdout == "A green triangle.\n", proc.stderr


def test_interactive_answers_are_greedy_by_default():
    """The same question three times in one chat (the conversation reset in between) gets the --prompt answer."""
    script = "Describe the image.\n/reset\nDescribe the image.\n/reset\nDescribe the image.\n/quit\n"
    proc = run("chat", ROOT / "examples" / "yellow_triangle_red_circle_blue_square.png", "--threads", "1", input=script)
    assert proc.returncode == 0, proc.stderr
    answers = [line.split("ASSISTANT: ", 1)[1] for line in proc.stdout.splitlines() if "ASSISTANT: " in line]
    assert answers == ["A yellow triangle, a red circle and a blue square."] * 3
    help_text = " ".join(run("chat", "--help").stdout.split())
    assert "--temperature <float> 0 = greedy and deterministic; > 0 samples [default: 0.0]" in help_text


# --------------------------------------------------------------------------- a runtime-only install

HIDE_TORCH = cli_without("torch", "transformers")


def run_without_torch(*args):
    """`llava-edge ARGS` in a process where the path finder does not see torch or transformers, as after
    `pip install .` without them."""
    return subprocess.run([sys.executable, "-c", HIDE_TORCH, *map(str, args)], capture_output=True, text=True,
                          timeout=120, cwd=ROOT)


@pytest.mark.parametrize("args, extra", [
    (["info", "llava-hf/llava-1.5-7b-hf"], "export"),
    (["export", "--ckpt", "x", "--out", "y"], "export"),
    (["eval", "shapes", "test.json", "--ckpt", "x"], "train"),
    (["train", "stage1", "--data", "d.json", "--output-dir", "o"], "train"),
    (["build-demo"], "train,export"),
    (["bench"], "bench"),
])
def test_heavy_commands_say_what_to_install(args, extra):
    proc = run_without_torch(*args)
    assert_one_line_error(proc, "torch", f"llava-edge[{extra}]", "--index-url https://download.pytorch.org/whl/cpu")


@pytest.mark.slow
def test_chat_runs_without_torch():
    proc = run_without_torch("chat", GREEN, "--prompt", "Describe the image.", "--threads", "1")
    assert proc.returncode == 0 and proc.stdout == "A green triangle.\n", proc.stderr


# --------------------------------------------------------------------------- validation before work


@pytest.mark.parametrize("args, words", [
    (["--seed", "-1"], ["seed", ">= 0"]),
    (["--temperature", "nan"], ["temperature", "finite"]),
    (["--temperature", "inf"], ["temperature", "finite"]),
    (["--temperature", "-0.5"], ["temperature", ">= 0"]),
    (["--top-p", "0"], ["top-p"]),
    (["--top-p", "1.5"], ["top-p"]),
    (["--top-p", "nan"], ["top-p"]),
    (["--threads", "0"], ["--threads", "at least 1"]),
    (["--threads", "-1"], ["--threads", "at least 1"]),
    (["--max-tokens", "0"], ["max tokens"]),
    (["--n-ctx", "10"], ["--n-ctx", "image alone takes 64"]),
    (["--n-ctx", "-5"], ["--n-ctx"]),
])
def test_bad_numbers_are_one_line_exit_2(args, words):
    assert_one_line_error(run("chat", GREEN, "--prompt", "Describe the image.", *args), *words)


def test_n_ctx_past_the_trained_context_is_cut_to_it_with_a_note():
    proc = run("chat", GREEN, "--prompt", "Describe the image.", "--n-ctx", "100000", "--threads", "1")
    assert proc.returncode == 0 and proc.stdout == "A green triangle.\n", proc.stderr
    assert "--n-ctx 100000 is more than the model was trained on; using 512" in proc.stderr


def test_export_threads_are_checked_before_work(tmp_path):
    assert_one_line_error(run("export", "--ckpt", tmp_path, "--out", tmp_path / "b", "--threads", "-1"), "--threads")
    assert not (tmp_path / "b").exists()


# --------------------------------------------------------------------------- bounded image reads


def test_dev_zero_is_refused_at_once():
    start = time.monotonic()
    assert_one_line_error(run("chat", "/dev/zero", "--prompt", "x", timeout=60), "/dev/zero", "character device")
    assert time.monotonic() - start < 60


def test_a_fifo_is_refused_without_blocking(tmp_path):
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    assert_one_line_error(run("chat", fifo, "--prompt", "x", timeout=60), "pipe.png", "named pipe")


def test_a_file_past_the_size_limit_is_refused_before_it_is_read(tmp_path):
    big = tmp_path / "big.png"
    with open(big, "wb") as f:
        f.write(GREEN.read_bytes())
        f.truncate(max_file_bytes() + 1)  # sparse: no disk used
    assert_one_line_error(run("chat", big, "--prompt", "x"), "big.png", "too large", str(max_file_bytes()))


def test_the_size_limit_follows_the_pixel_limit(monkeypatch):
    from PIL import Image

    from llava_edge.image import load_image

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10)
    assert max_file_bytes() == 80 + (16 << 20)
    with pytest.raises(UserError, match="too large"):
        load_image(b"\0" * (max_file_bytes() + 1), name="blob")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)
    assert max_file_bytes() is None


# --------------------------------------------------------------------------- the manifest schema


def write_manifest(tmp_path: Path, edit) -> Path:
    bundle = tmp_path / "bundle"
    shutil.copytree(DEMO_BUNDLE, bundle)
    manifest = json.loads((bundle / "manifest.json").read_text())
    edit(manifest)
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    return bundle


def _set(path: str, value):
    def edit(m):
        *parents, last = path.split(".")
        for p in parents:
            m = m[p]
        if value is KeyError:
            del m[last]
        else:
            m[last] = value
    return edit


MALFORMED = [
    ("files", None, "'files' must be an object (got null)"),
    ("files", [], "'files' must be an object"),
    ("files.vision", "vision.onnx", "'files.vision' must be an object (got string"),
    ("files.decoder", KeyError, "'files.decoder' is missing"),
    ("files.mmproj", 3, "'files.mmproj' must be an object"),
    ("files.vision.name", KeyError, "'files.vision.name' is missing"),
    ("files.vision.name", "../../etc/passwd", "'files.vision.name' must be a file name inside the bundle"),
    ("files.vision.sha256", "abc", "'files.vision.sha256' must be 64 lowercase hex digits"),
    ("files.vision.bytes", "12", "'files.vision.bytes' must be an integer (got string"),
    ("files.vision.bytes", -1, "'files.vision.bytes' must be >= 0"),
    ("vision", KeyError, "'vision' is missing"),
    ("vision.image_size", 0, "'vision.image_size' must be >= 1"),
    ("vision.image_size", 112.5, "'vision.image_size' must be an integer"),
    ("vision.n_image_tokens", None, "'vision.n_image_tokens' must be an integer (got null)"),
    ("vision.mean", [0.5, 0.5], "'vision.mean' must be a list of 3 finite numbers"),
    ("vision.std", [0.2, 0.0, 0.2], "'vision.std' must hold numbers > 0"),
    ("vision.aspect", "stretch", "'vision.aspect' must be one of pad, square"),
    ("decoder", "Q4", "'decoder' must be an object"),
    ("decoder.n_ctx_train", KeyError, "'decoder.n_ctx_train' is missing"),
    ("decoder.eos_id", True, "'decoder.eos_id' must be an integer (got boolean true)"),
    ("template", "chatml", "'template' must be one of"),
    ("domain", 7, "'domain' must be a non-empty string"),
]


@pytest.mark.parametrize("field, value, message", MALFORMED)
def test_malformed_manifest_names_the_field(field, value, message, tmp_path):
    bundle = write_manifest(tmp_path, _set(field, value))
    with pytest.raises(UserError, match=re.escape(message)):
        open_bundle(bundle)


@pytest.mark.parametrize("field, value, message", [MALFORMED[0], MALFORMED[2]])
def test_malformed_manifest_through_the_cli(field, value, message, tmp_path):
    bundle = write_manifest(tmp_path, _set(field, value))
    assert_one_line_error(run("chat", GREEN, "--bundle", bundle, "--prompt", "x"), message)


def test_manifest_that_is_not_an_object(tmp_path):
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    (bundle / "manifest.json").write_text("[1, 2]")
    with pytest.raises(UserError, match="must be a JSON object"):
        open_bundle(bundle)


# --------------------------------------------------------------------------- --version, flags, build-demo


def test_version():
    proc = run("--version")
    assert proc.returncode == 0 and re.fullmatch(r"llava-edge \d+\.\d+\.\S+\n", proc.stdout), proc.stdout


@pytest.mark.parametrize("command", ["chat", "export", "info", "eval", "build-demo", "bench", "serve"])
def test_help_shows_flags_as_flags(command):
    proc = run(command, "--help")
    assert proc.returncode == 0, proc.stderr
    assert "<bool>" not in proc.stdout, proc.stdout
    assert re.search(r"^\s+--help\s+Show this message", proc.stdout, re.M)


def test_json_is_a_flag_without_a_value():
    assert re.search(r"^\s+--json\s+with --prompt", run("chat", "--help").stdout, re.M)
    proc = run("chat", GREEN, "--prompt", "Describe the image.", "--json", "--threads", "1")
    assert proc.returncode == 0 and json.loads(proc.stdout)["answer"] == "A green triangle."


def test_build_demo_keeps_the_installed_demo_unless_asked():
    out = " ".join(run("build-demo", "--help").stdout.split())
    assert "--install / --no-install" in out and "[default: no-install]" in out and "installed demo" in out
