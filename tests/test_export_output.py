"""`llava-edge export` as a user sees it (a real process): our own lines and progress bars only, third-party
warnings gone or summed up in one line, and a bundle dir whose mode follows the umask."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("gguf")

from tiny_checkpoints import make_liuhaotian_checkpoint  # noqa: E402
from tiny_text_gguf import write_tiny_llama_gguf  # noqa: E402

from llava_edge.quiet import FallbackTally  # noqa: E402

ROOT = Path(__file__).parents[1]
OURS = ("[export]", "quantized ", "quantize ")


def stderr_lines(text: str) -> list[str]:
    """Lines as the terminal leaves them: a progress bar's redraws (\\r) collapse to its last state; blank ones go."""
    return [line.rsplit("\r", 1)[-1].strip() for line in text.splitlines() if line.rsplit("\r", 1)[-1].strip()]


@pytest.mark.slow
def test_export_prints_only_its_own_lines_and_follows_the_umask(tmp_path):
    ckpt = make_liuhaotian_checkpoint(tmp_path / "ckpt", seed=3)
    out = tmp_path / "bundle"
    proc = subprocess.run(
        [sys.executable, "-m", "llava_edge.cli", "export", "--ckpt", str(ckpt), "--out", str(out), "--threads", "1"],
        capture_output=True, text=True, timeout=600, cwd=ROOT, preexec_fn=lambda: os.umask(0o022))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith("[export]") and f"wrote {out}" in proc.stdout
    for line in stderr_lines(proc.stderr):
        is_bar = "|" in line and ("tensor/s" in line or "B/s" in line or "it/s" in line)
        assert is_bar or line.startswith(OURS), f"third-party line in export's output: {line!r}"
    for noise in ("WARNING:root", "pre-processing", "n_ctx_train", "falling back"):
        assert noise not in proc.stderr, noise
    assert out.stat().st_mode & 0o777 == 0o755  # not mkdtemp's 0700


def test_quantizer_fallbacks_are_one_line(tmp_path):
    """A decoder whose FFN rows (688) are no multiple of the K-quant block (256): llama.cpp warns per tensor;
    the quantizer says it once."""
    src = write_tiny_llama_gguf(tmp_path / "tiny-F32.gguf", n_embd=256, n_ff=688)
    code = ("import sys; from llava_edge.quant.gguf import quantize_gguf; "
            "quantize_gguf(sys.argv[1], sys.argv[2], 'Q4_K_M', n_threads=1, progress=True)")
    proc = subprocess.run([sys.executable, "-c", code, str(src), str(tmp_path / "q.gguf")], capture_output=True,
                          text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    lines = [line for line in stderr_lines(proc.stderr) if "tensor/s" not in line]
    summary = [line for line in lines if line.startswith("quantize Q4_K_M:")]
    assert len(summary) == 1 and "blk.0.ffn_down.weight" in summary[0], lines
    assert "688 values do not split into blocks of 256" in summary[0]
    assert "warning" not in proc.stderr.lower()
    assert all(line.startswith(("quantize ", "quantized ")) for line in lines), lines


def test_fallback_tally_joins_the_pieces_llama_cpp_logs():
    tally = FallbackTally()
    for piece in (b"warning: blk.3.ffn_down.weight   - ncols    688 not divisible by 256 (required for type q6_K) ",
                  b"(WARNING: must use F16 due to unusual shape) ", b"-> falling back to     f16\n",
                  b"[   1/  39] output.weight - [256, 512, 1, 1], type = f16\n"):
        tally.note(piece)
    assert tally.tensors == [("blk.3.ffn_down.weight", 688, 256, "f16")]
    assert FallbackTally().line("Q4_K_M") is None
