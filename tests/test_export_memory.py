"""Export memory: anonymous and file-backed peaks measured apart (children included), stored in the manifest,
printed by the CLI; the decoder parity's reference never converts the whole decoder to fp32."""

import mmap
import gc
import subprocess
import sys

import numpy as np
import pytest
import torch

from llava_edge.export import pipeline
from llava_edge.peak_memory import PeakMemory, read_status
from tiny_checkpoints import make_llava, save_full_clip, save_liuhaotian_layout

MB = 2**20


def test_anonymous_and_file_backed_peaks_are_apart(tmp_path):
    data = tmp_path / "weights.bin"
    data.write_bytes(b"\1" * (192 * MB))
    with PeakMemory(interval_s=0.01) as mem:
        base = mem.result()
        block = np.ones(160 * MB, dtype=np.uint8)  # anonymous, touched
        mem.result()  # answered after a sample taken while the block is held
        del block
        with open(data, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
            assert sum(m[i] for i in range(0, len(m), 4096)) == len(m) // 4096  # every page read
            mem.result()
    got = mem.result()
    assert got["peak_rss_anon_mb"] - base["peak_rss_anon_mb"] >= 150
    assert got["peak_rss_file_mb"] - base["peak_rss_file_mb"] >= 180
    assert got["peak_rss_anon_mb"] - base["peak_rss_anon_mb"] < 180  # the mapped file is not counted as anonymous


# A child that holds 200 MiB until its stdin closes, and says when it holds them.
HOLDING_CHILD = ("import numpy, sys; a = numpy.ones(200 * 2**20, dtype=numpy.uint8); print('holding', flush=True); "
                 "sys.stdin.read()")


def test_children_count_and_steps_keep_their_own_peaks():
    gc.collect()
    own_before = read_status()["RssAnon"] / 1024
    with PeakMemory(interval_s=0.01) as mem:
        mem.step("quiet")
        # step() returns once the watcher has switched: the child started next (whose fork briefly counts this
        # process's memory twice) is never sampled under "quiet"
        mem.step("child")
        child = subprocess.Popen([sys.executable, "-c", HOLDING_CHILD], stdin=subprocess.PIPE,
                                 stdout=subprocess.PIPE, text=True)
        assert child.stdout.readline() == "holding\n"
        mem.result()  # answered after a sample taken while the child holds its memory
        child.stdin.close()
        assert child.wait() == 0
    got = mem.result()
    # this process's own memory may shrink meanwhile (earlier tests' garbage returned to the OS)
    own = max(own_before, read_status()["RssAnon"] / 1024)
    steps = got["peak_rss_anon_mb_by_step"]
    assert got["peak_rss_anon_mb"] >= steps["child"] >= steps["quiet"] + 150
    assert steps["quiet"] < own + 100


@pytest.fixture(scope="module")
def fp16_ckpt(tmp_path_factory):
    """A tiny liuhaotian checkpoint stored in fp16 (as LLaVA-1.5-7B is), with a SentencePiece tokenizer."""
    from spm_fixture import train_tiny_spm

    root = tmp_path_factory.mktemp("fp16")
    tok = train_tiny_spm(root, 400)
    model = make_llava(400, 32000, None, seed=9).half()
    path = save_liuhaotian_layout(model, root / "llava-fp16", "clip", fmt="bin")
    save_full_clip(model, path / "clip")
    (path / "tokenizer.model").write_bytes(tok.read_bytes())
    return path


@pytest.mark.slow
def test_export_measures_parity_without_an_fp32_decoder_and_records_memory(fp16_ckpt, tmp_path, monkeypatch):
    seen = {}
    load = pipeline.load_checkpoint

    def spy(*args, **kwargs):
        seen["loaded"] = load(*args, **kwargs)
        return seen["loaded"]

    monkeypatch.setattr(pipeline, "load_checkpoint", spy)
    manifest = pipeline.export_bundle(pipeline.ExportOptions(
        str(fp16_ckpt), str(tmp_path / "b"), quant="Q8_0", vision_precision="fp32", threads=1, progress=False))
    decoder = manifest["parity"]["decoder"]
    assert decoder["n_positions"] >= 64 + 16 and decoder["top1_agreement"] >= 0.9 and decoder["mean_kl"] < 0.1
    # the reference read the stored fp16 weights layer by layer: the decoder was never converted whole
    assert all(p.dtype == torch.float16 for p in seen["loaded"].model.language.parameters())
    assert all(p.is_meta for p in seen["loaded"].model.vision.parameters())  # dropped after the vision steps
    mem = manifest["export"]
    assert 0 < mem["peak_rss_anon_mb"] <= mem["vm_hwm_mb"] + 1 and mem["peak_rss_file_mb"] > 0
    assert {"load", "vision_onnx", "vision_precision", "decoder_gguf", "quantize", "parity"} <= set(
        mem["peak_rss_anon_mb_by_step"])


@pytest.mark.slow
def test_cli_export_prints_the_peaks(fp16_ckpt, tmp_path):
    out = tmp_path / "b"
    result = subprocess.run(
        [sys.executable, "-m", "llava_edge.cli", "export", "--ckpt", str(fp16_ckpt), "--out", str(out),
         "--quant", "F16", "--vision-precision", "fp32", "--threads", "1"],
        capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    last = result.stdout.strip().splitlines()[-1]
    assert last.startswith("peak memory: ") and "MiB anonymous" in last and "MiB file-backed" in last
