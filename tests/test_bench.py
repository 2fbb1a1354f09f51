"""bench/: the harness end to end on the demo case (tiny numbers, real paths), and its arithmetic."""

import json
import subprocess
import sys

import pytest

from llava_edge.bench import device, roofline
from llava_edge.bench.harness import BenchConfig, ratios, round_order, run_bench
from llava_edge.bench.measured_paths import summarize


@pytest.mark.slow
def test_demo_bench_writes_the_contract_report(tmp_path):
    cfg = BenchConfig(out_dir=str(tmp_path / "reports"), work_dir=str(tmp_path / "work"), threads=1, runs=2,
                      n_decode=4, quick=True, cases=("demo",))
    report = run_bench(cfg)
    stem = tmp_path / "reports" / report["device"]["id"]
    on_disk = json.loads(stem.with_suffix(".json").read_text())
    assert set(on_disk["ratios"]) == {"vision_vs_llamacpp", "second_turn_ttft_vs_handler", "decode_vs_llamacpp",
                                      "peak_rss_vs_llamacpp", "kv_cache_ttft_vs_cold"}
    assert all(isinstance(v, float) and v > 0 for v in on_disk["ratios"].values())
    paths = on_disk["cases"]["demo"]["paths"]
    assert not [p for p, r in paths.items() if "error" in r], paths
    assert paths["edge"]["second_turn_prefilled"]["median"] < paths["edge"]["n_prompt_tokens"]["median"] - 64  # image KV reused
    assert paths["edge"]["n_prefilled"]["median"] == paths["edge"]["n_prompt_tokens"]["median"]  # every run starts cold
    assert paths["edge_kv"]["kv_restored"] and paths["edge_kv"]["processes"] == 2  # a new process per run
    assert paths["edge_kv"]["n_prefilled"]["median"] < paths["edge"]["n_prompt_tokens"]["median"] - 64
    assert not paths["edge_kv_fill"]["kv_restored"]
    assert all(r["interleaved_runs"] == 2 for p, r in paths.items() if p not in ("edge_kv", "edge_kv_fill"))
    assert {p: r["n_ctx"] for p, r in paths.items() if "n_ctx" in r} == dict.fromkeys(("edge", "edge_kv", "handler", "plain", "edge_kv_fill"), 512)  # the demo's trained context
    assert 0 < paths["edge"]["peak_rss_anon_mb"] < paths["edge"]["peak_rss_mb"]
    assert on_disk["fidelity"]["edge"] > 0.999
    assert 0 < on_disk["fidelity"]["llamacpp_mtmd_f16"] < 1
    assert stem.with_suffix(".png").stat().st_size > 10_000
    md = stem.with_suffix(".md").read_text()
    assert "Llava15ChatHandler" in md and "second_turn_ttft_vs_handler" in md


def test_ratios_are_edge_over_baseline():
    paths = {"edge": {"vision_ms": {"median": 1.0}, "second_turn_ttft_ms": {"median": 2.0},
                      "decode_tokens_per_s": {"median": 90.0}, "peak_rss_mb": 500.0},
             "mtmd_vision": {"vision_ms": {"median": 10.0}}, "handler": {"second_turn_ttft_ms": {"median": 100.0}, "peak_rss_mb": 1000.0},
             "plain": {"decode_tokens_per_s": {"median": 100.0}}}
    paths["edge"]["ttft_ms"] = {"median": 400.0}
    paths["edge_kv"] = {"ttft_ms": {"median": 20.0}}
    assert ratios(paths) == pytest.approx({"vision_vs_llamacpp": 0.1, "second_turn_ttft_vs_handler": 0.02,
                                           "decode_vs_llamacpp": 0.9, "peak_rss_vs_llamacpp": 0.5,
                                           "kv_cache_ttft_vs_cold": 0.05})
    assert ratios({"edge": paths["edge"]})["vision_vs_llamacpp"] is None  # a failed baseline gives no ratio


def test_rounds_rotate_the_order_of_the_paths():
    names = ["edge", "handler", "plain"]
    orders = [round_order(names, r) for r in range(4)]
    assert orders == [names, ["handler", "plain", "edge"], ["plain", "edge", "handler"], names]
    assert round_order([], 3) == []


def test_summarize_takes_medians_of_numbers_only():
    runs = [{"ttft_ms": 3.0, "kv_restored": True, "n": 5}, {"ttft_ms": 1.0, "kv_restored": True, "n": 5},
            {"ttft_ms": 2.0, "kv_restored": True, "n": 5}]
    s = summarize(runs)
    assert s["ttft_ms"] == {"median": 2.0, "p90": 3.0, "n": 3} and s["kv_restored"] is True


def test_child_peak_rss_is_its_own():
    """A child started by a process that once held 400 MB must not report those 400 MB (ru_maxrss would)."""
    code = ("import subprocess, sys; big = bytearray(400 * 2**20); big[::4096] = b'x' * len(big[::4096]); del big; "
            "print(subprocess.run([sys.executable, '-c', 'from llava_edge.bench.measured_paths import peak_rss_mb; "
            "print(peak_rss_mb())'], capture_output=True, text=True).stdout)")
    child_mb = float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout)
    assert 5 < child_mb < 300


def test_roofline_numbers_are_sane():
    assert roofline.memory_bandwidth_gbs(1, mib=64, runs=1) > 0.1
    assert roofline.matmul_gflops(1, m=64, k=256, n=256, runs=1) > 0.1
    # ViT-L/14-336 up to layer -2 plus LLaVA's projector: about 0.35 TFLOP per image
    flops = roofline.vit_flops(336, 14, 1024, 4096, 23, 1024, 4096, 4096, 576)
    assert 0.3e12 < flops < 0.4e12


def test_device_id_is_a_file_name():
    info = {"cpu": "Intel(R) Xeon(R) Platinum 8480+ CPU @ 2.0GHz", "cores": 16, "threads_used": 8, "gpus": ["NVIDIA H100"]}
    assert device.device_id(info) == "intel-xeon-platinum-8480-16c-8t-nvidia-h100"
    # a Xeon of the same name without AMX gets its own reports
    assert device.device_id({**info, "gpus": [], "no_amx": True}) == "intel-xeon-platinum-8480-16c-8t-no-amx"


def test_kv_memory_case_runs_each_type_in_its_own_process():
    """The case's child (the demo bundle at its own context): the answer has the tokens asked for past EOS, the
    peaks are the child's, and a q4_0 run holds less anonymous memory than f16 at the same context, or as much."""
    from pathlib import Path

    from llava_edge.bench.kv_memory_case import markdown, run_child, summarize as kv_summarize

    image = str(Path(__file__).parents[1] / "examples" / "green_triangle.png")
    runs = {k: run_child(["", image, k, "1", "512", "8"]) for k in ("f16", "q4_0")}
    for r in runs.values():
        assert r["n_generated"] == 8 and r["peak_rss_anon_mb"] > 0 and r["peak_rss_file_mb"] > 0
    assert runs["q4_0"]["peak_rss_anon_mb"] <= runs["f16"]["peak_rss_anon_mb"] + 8  # sampling jitter
    results = {k: kv_summarize([r]) | {"ttft_vs_f16": 1.0, "decode_vs_f16": 1.0} for k, r in runs.items()}
    text = markdown({"shape": "demo", "description": "demo", "device": device.describe(1), "n_ctx": 512,
                     "n_answer": 8, "rounds": 1, "threads": 1, "results": results,
                     "demo_answers": {}, "demo_equal": True})
    assert "| q4_0 |" in text and "| f16 |" in text
