"""`llava-edge chat` as a user runs it (a real process each time): answers, JSON, the REPL, and every kind of
bad input ending in exit 2 with one line on stderr, never a traceback or a native abort."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from llava_edge.paths import DEMO_BUNDLE

ROOT = Path(__file__).parents[1]
DATA = Path(__file__).parent / "data"
GREEN = ROOT / "examples" / "green_triangle.png"
COLOR_Q = "What color is the triangle?\nAnswer the question using a single word or phrase."


def chat(*args, stdin=None, timeout=120):
    return subprocess.run(
        [sys.executable, "-m", "llava_edge.cli", "chat", *map(str, args), "--threads", "1"],
        capture_output=True, text=True, input=stdin, timeout=timeout, cwd=ROOT,
    )


def assert_user_error(proc, *words):
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("llava-edge: error:"), proc.stderr
    assert "Traceback" not in proc.stderr and proc.stdout == ""
    for w in words:
        assert w in lines[0], lines[0]


def test_one_shot_answer_without_torch():
    """The runtime path never imports torch or transformers (they are blocked in this process)."""
    code = ("import sys; sys.modules['torch'] = None; sys.modules['transformers'] = None; "
            "from llava_edge.cli import main; main()")
    proc = subprocess.run([sys.executable, "-c", code, "chat", str(GREEN), "--prompt", COLOR_Q, "--threads", "1"],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "Green\n"


def test_json_output_has_the_contract_fields():
    proc = chat(GREEN, "--prompt", "Describe the image.", "--json")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["answer"] == "A green triangle."
    assert out["n_prompt_tokens"] > 64  # the image's 64 positions plus the text
    assert set(out["timings"]) >= {"vision_ms", "prefill_ms", "ttft_ms", "decode_tokens_per_s"}
    t = out["timings"]
    assert t["vision_ms"] > 0 and t["ttft_ms"] >= t["vision_ms"] + t["prefill_ms"]


def test_kv_cache_dir_lets_a_new_process_skip_the_image_prefill(tmp_path):
    runs = [chat(GREEN, "--prompt", "Describe the image.", "--json", "--kv-cache-dir", tmp_path) for _ in range(2)]
    assert all(p.returncode == 0 for p in runs), runs[-1].stderr
    cold, warm = (json.loads(p.stdout) for p in runs)
    assert cold["answer"] == warm["answer"] == "A green triangle."
    assert not cold["timings"]["kv_restored"] and warm["timings"]["kv_restored"]
    assert cold["timings"]["n_prefilled"] == cold["n_prompt_tokens"]
    assert warm["timings"]["n_prefilled"] < cold["n_prompt_tokens"] - 64  # the image's 64 positions came from disk
    assert cold["timings"]["vision_ms"] > 0 and warm["timings"]["vision_ms"] == 0  # and the image was not encoded


def test_interactive_chat_with_commands():
    two = ROOT / "examples" / "red_triangle_yellow_square_yellow_triangle.png"
    script = f"Describe the image.\n/reset\n/image {two}\nDescribe the image.\n/image {tmp_missing()}\n/quit\n"
    proc = chat(GREEN, "--temperature", "0", stdin=script)
    assert proc.returncode == 0, proc.stderr
    answers = [line.split("ASSISTANT: ", 1)[1] for line in proc.stdout.splitlines() if "ASSISTANT: " in line]
    assert len(answers) == 2 and answers[0] == "A green triangle." and answers[1] != answers[0]
    assert "new conversation about" in proc.stderr
    assert "image file not found" in proc.stderr  # a bad /image is reported and the chat goes on to /quit


def tmp_missing() -> Path:
    return ROOT / "no-such-image.png"


def test_repl_ctrl_c_stops_the_answer_not_the_chat(monkeypatch, capsys, fake_session):
    from llava_edge import chat as chat_module

    lines = iter(["first", "second", "/quit"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    session = fake_session(answer="partial", stop_answer={1})
    chat_module.repl(session, GREEN, None)
    out = capsys.readouterr().out
    assert session.asked == ["first", "second"] and "[stopped]" in out


def write_truncated(src: Path, dst: Path) -> Path:
    data = src.read_bytes()
    dst.write_bytes(data[: len(data) // 2])
    return dst


def make_bad_image(kind: str, tmp: Path) -> Path:
    if kind == "missing":
        return tmp / "nope.png"
    if kind == "directory":
        (tmp / "dir.png").mkdir()
        return tmp / "dir.png"
    if kind == "zero bytes":
        (tmp / "empty.png").write_bytes(b"")
        return tmp / "empty.png"
    if kind == "truncated png":
        return write_truncated(DATA / "astronaut_wide.png", tmp / "cut.png")
    if kind == "truncated jpeg":
        return write_truncated(DATA / "coffee.jpg", tmp / "cut.jpg")
    if kind == "text named png":
        (tmp / "notes.png").write_text("this is not an image\n")
        return tmp / "notes.png"
    if kind == "20000x20000 png":
        Image.new("1", (20000, 20000)).save(tmp / "huge.png")
        return tmp / "huge.png"
    raise ValueError(kind)


@pytest.mark.parametrize("kind, words", [
    ("missing", ["not found"]),
    ("directory", ["directory"]),
    ("zero bytes", ["empty"]),
    ("truncated png", ["truncated or corrupt"]),
    ("truncated jpeg", ["truncated or corrupt"]),
    ("text named png", ["not an image"]),
    ("20000x20000 png", ["too large"]),
])
def test_bad_image_is_one_line_exit_2(kind, words, tmp_path):
    path = make_bad_image(kind, tmp_path)
    assert_user_error(chat(path, "--prompt", COLOR_Q), str(path.name), *words)


def make_odd_image(kind: str, tmp: Path) -> Path:
    green = Image.open(GREEN).convert("RGB")
    if kind == "animated gif":
        frames = [green, Image.new("RGB", green.size, (0, 0, 255))]
        frames[0].save(tmp / "anim.gif", save_all=True, append_images=frames[1:], duration=100, loop=0)
        return tmp / "anim.gif"
    if kind == "16-bit grayscale png":
        return DATA / "camera_16bit.png"
    if kind == "cmyk jpeg":
        green.convert("CMYK").save(tmp / "cmyk.jpg", quality=95)
        return tmp / "cmyk.jpg"
    if kind == "exif-rotated jpeg":
        exif = Image.Exif()
        exif[0x0112] = 8
        green.transpose(Image.Transpose.ROTATE_90).save(tmp / "rot.jpg", exif=exif, quality=95)
        return tmp / "rot.jpg"
    if kind == "rgba png":
        rgba = green.convert("RGBA")
        rgba.putalpha(200)
        rgba.save(tmp / "rgba.png")
        return tmp / "rgba.png"
    raise ValueError(kind)


@pytest.mark.parametrize("kind", ["animated gif", "16-bit grayscale png", "cmyk jpeg", "exif-rotated jpeg", "rgba png"])
def test_unusual_images_are_answered(kind, tmp_path):
    proc = chat(make_odd_image(kind, tmp_path), "--prompt", COLOR_Q)
    assert proc.returncode == 0 and proc.stderr.count("\n") == 1 and "demo model" in proc.stderr, proc.stderr
    if kind != "16-bit grayscale png":  # the others are the green triangle in another container
        assert proc.stdout == "Green\n"


def copy_bundle(tmp: Path) -> Path:
    dst = tmp / "bundle"
    shutil.copytree(DEMO_BUNDLE, dst)
    return dst


def test_bundle_with_a_missing_file(tmp_path):
    bundle = copy_bundle(tmp_path)
    (bundle / "vision.onnx").unlink()
    assert_user_error(chat(GREEN, "--bundle", bundle, "--prompt", COLOR_Q), "vision.onnx", "missing")


def test_bundle_with_a_wrong_sha256(tmp_path):
    bundle = copy_bundle(tmp_path)
    gguf = next(bundle.glob("decoder-*.gguf"))
    data = bytearray(gguf.read_bytes())
    data[-100] ^= 0xFF
    gguf.write_bytes(bytes(data))
    assert_user_error(chat(GREEN, "--bundle", bundle, "--prompt", COLOR_Q), "sha256")


def test_not_a_bundle(tmp_path):
    assert_user_error(chat(GREEN, "--bundle", tmp_path, "--prompt", COLOR_Q), "no manifest.json")
    assert_user_error(chat(GREEN, "--bundle", ROOT / "README.md", "--prompt", COLOR_Q), "README.md: not a directory")
    assert_user_error(chat(GREEN, "--bundle", tmp_path / "nowhere", "--prompt", COLOR_Q), "not found")


def test_every_image_token_asked_for_by_number_is_the_default():
    """K = the image's token count (the demo's 64) is every token: the answer the default gives."""
    every, default = chat(GREEN, "--prompt", COLOR_Q, "--image-tokens", "64"), chat(GREEN, "--prompt", COLOR_Q)
    assert every.returncode == default.returncode == 0, every.stderr
    assert every.stdout == default.stdout == "Green\n"


def test_a_context_past_the_trained_one_is_cut_with_a_note():
    proc = chat(GREEN, "--prompt", COLOR_Q, "--n-ctx", "100000")
    assert proc.returncode == 0 and proc.stdout == "Green\n", proc.stderr
    assert "--n-ctx 100000 is more than the model was trained on; using 512" in proc.stderr
    too_long = chat(GREEN, "--prompt", "square " * 1000, "--n-ctx", "1024")
    assert too_long.returncode == 2 and "the context holds 512 per conversation (--n-ctx 1024 was cut" in too_long.stderr


def test_vision_n_embd_differs_from_the_decoders(tmp_path):
    from tiny_text_gguf import write_tiny_llama_gguf

    from llava_edge.runtime.bundle import sha256_of

    bundle = copy_bundle(tmp_path)
    manifest = json.loads((bundle / "manifest.json").read_text())
    gguf = write_tiny_llama_gguf(bundle / manifest["files"]["decoder"]["name"], n_embd=64)
    manifest["files"]["decoder"].update(sha256=sha256_of(gguf), bytes=gguf.stat().st_size)
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    assert_user_error(chat(GREEN, "--bundle", bundle, "--prompt", COLOR_Q), "n_embd")


def test_prompt_longer_than_the_context():
    assert_user_error(chat(GREEN, "--prompt", "square " * 1000), "context holds")


def test_bad_options():
    assert_user_error(chat(GREEN, "--prompt", COLOR_Q, "--device", "npu"), "unknown device")
    assert_user_error(chat(GREEN, "--prompt", COLOR_Q, "--max-tokens", "0"), "max tokens")
    assert_user_error(chat(GREEN, "--prompt", COLOR_Q, "--image-tokens", "0"), "whole number from")
    assert_user_error(chat(GREEN, "--prompt", COLOR_Q, "--image-tokens", "65"), "an image is 64 tokens")
