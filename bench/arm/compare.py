"""x86 vs aarch64 (emulated) -> bench/reports/aarch64-qemu.md. Correctness only: emulation says nothing of speed.

usage: python compare.py INPUTS_DIR X86_DIR ARM_DIR STEPS_MD OUT_MD
(INPUTS_DIR: prepare_inputs.py's; X86_DIR, ARM_DIR: probe.py's; STEPS_MD: how the run went)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from llava_edge.eval import shapes_questions


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.reshape(-1, a.shape[-1]).astype(np.float64), b.reshape(-1, b.shape[-1]).astype(np.float64)
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def vision_rows(x86: dict, arm: dict) -> list[str]:
    rows = ["| graph | tokens compared | cosine min | cosine mean | max abs diff |", "|---|---:|---:|---:|---:|"]
    for name in ("vision_fp32", "vision_int8"):
        c = cosines(arm[name], x86[name])
        rows.append(f"| {name[7:]} (aarch64 vs x86) | {len(c)} | {c.min():.6f} | {c.mean():.6f} | "
                    f"{np.abs(arm[name] - x86[name]).max():.3g} |")
    for label, side in (("x86", x86), ("aarch64", arm)):
        c = cosines(side["vision_int8"], side["vision_fp32"])
        rows.append(f"| for scale: int8 vs fp32 on {label} | {len(c)} | {c.min():.6f} | {c.mean():.6f} | "
                    f"{np.abs(side['vision_int8'] - side['vision_fp32']).max():.3g} |")
    d = np.abs(arm["vision_int8"] - x86["vision_int8"])
    rows += ["", f"int8, aarch64 vs x86: {(d > 1e-4).mean():.1%} of the output values differ by more than 1e-4; the "
             f"median difference is {np.median(d):.2g}, the 99th percentile {np.percentile(d, 99):.2g}, against a mean "
             f"magnitude of {np.abs(x86['vision_int8']).mean():.2g}. The fp32 graph agrees to float rounding, so the "
             "difference is in ONNX Runtime's int8 kernels, which on ARM are another implementation "
             "(NEON/dotprod); both machines are much closer to each other than either int8 output is to fp32."]
    return rows


def decoder_rows(x86: np.ndarray, arm: np.ndarray) -> list[str]:
    top_x86, top_arm = x86.argmax(-1), arm.argmax(-1)
    srt = np.sort(x86, -1)
    clear = (srt[:, -1] - srt[:, -2]) > 0.5  # positions where x86's top two logits are not near a tie
    p = np.exp(x86 - x86.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    q = np.exp(arm - arm.max(-1, keepdims=True))
    q /= q.sum(-1, keepdims=True)
    kl = (p * (np.log(p + 1e-30) - np.log(q + 1e-30))).sum(-1)
    differ = np.flatnonzero(top_x86 != top_arm).tolist()
    return [
        "| positions | top-1 agreement | top-1 agreement (x86 margin > 0.5) | max abs logit diff | mean KL(x86‖arm) |",
        "|---:|---:|---:|---:|---:|",
        f"| {len(top_x86)} | {(top_x86 == top_arm).mean():.4f} | {(top_x86 == top_arm)[clear].mean():.4f} "
        f"({clear.sum()} positions) | {np.abs(x86 - arm).max():.3g} | {kl.mean():.3g} |",
        "", f"Positions whose top-1 differs: {differ or 'none'}"
        + ("".join(f"; {i}: x86's top two logits {srt[i, -1]:.4f} and {srt[i, -2]:.4f} (a near tie that "
                   f"rounding flips)" for i in differ)),
    ]


def _which(n: int, total: int) -> str:
    return f"all {total} questions" if n == total else f"the first {n} of its {total} questions"


def answer_rows(x86: dict, arm: dict, test_json: Path) -> list[str]:
    """The arm side may have answered the first N questions of the split only (emulation is slow): both sides
    are compared and scored on the questions the arm side answered."""
    ex = [k for k in x86["examples"] if x86["examples"][k] != arm["examples"].get(k)]
    ids, ta = arm["test"]["ids"], arm["test"]["answers"]
    by_id = dict(zip(x86["test"]["ids"], x86["test"]["answers"]))
    tx = [by_id[i] for i in ids]
    questions = shapes_questions.load(test_json)[:len(ids)]
    assert [q.key for q in questions] == ids
    acc = {k: shapes_questions.score(questions, dict(zip(ids, a)))["accuracy"] for k, a in (("x86", tx), ("arm", ta))}
    differ = [(i, a, b) for i, a, b in zip(ids, tx, ta) if a != b]
    rows = [f"- examples/: {len(x86['examples']) - len(ex)} of {len(x86['examples'])} answers equal "
            "(4 images x 4 questions, greedy).",
            f"- shapes test split (seed 0, {_which(len(ids), len(x86['test']['ids']))}): "
            f"{len(ids) - len(differ)} of {len(ids)} answers equal; accuracy on them x86 {acc['x86']:.4f}, "
            f"aarch64 {acc['arm']:.4f} (x86 on the whole split: {x86['test']['accuracy']:.4f})."]
    for k in ex:
        rows.append(f"  - examples `{k}`: x86 {x86['examples'][k]!r}, aarch64 {arm['examples'].get(k)!r}")
    for i, a, b in differ:
        rows.append(f"  - test `{i}`: x86 {a!r}, aarch64 {b!r}")
    return rows


def main(inputs: Path, x86_dir: Path, arm_dir: Path, steps: Path, out: Path) -> None:
    x86, arm = (json.loads((d / "result.json").read_text()) for d in (x86_dir, arm_dir))
    xa, aa = (dict(np.load(d / "arrays.npz")) for d in (x86_dir, arm_dir))
    lines = [
        "# llava-edge on aarch64 under QEMU (emulated: correctness only, no timings)", "",
        "Produced by `bench/arm/run.sh`: a Debian bookworm arm64 root (mmdebstrap + "
        "qemu-user-static), llama.cpp cross-built for armv8.2-a+dotprod, ONNX Runtime / numpy / Pillow from their "
        "aarch64 wheels, llava-edge installed with pip as a user would, then the same probe (`bench/arm/probe.py`) "
        "on x86 and in the arm64 root, the emulated core a Cortex-A76 (a Raspberry Pi 5's). QEMU runs ARM's own "
        "code paths (llama.cpp's NEON/dotprod kernels and the extra CPU buffer types the runtime's probe enabled, "
        "ORT's ARM int8 kernels) instruction by instruction, so the numbers below say whether ARM computes the "
        "same thing; they say nothing of speed.", "",
        "| | x86 | aarch64 (emulated) |", "|---|---|---|",
        *(f"| {k} | {x86[k]} | {arm[k]} |" for k in ("machine", "python", "llama_cpp_python", "onnxruntime", "numpy")),
        "", "## The demo's answers", "", *answer_rows(x86, arm, inputs / "shapes" / "test.json"), "",
        "## Vision graph (same ONNX files, the export's calibration images)", "", *vision_rows(xa, aa), "",
        "## Q4_K_M decoder on the export's parity sequence (f32 KV, same image embeddings)", "",
        *decoder_rows(xa["logits"], aa["logits"]), "", steps.read_text().strip(), "",
    ]
    out.write_text("\n".join(lines))


if __name__ == "__main__":
    main(*map(Path, sys.argv[1:6]))
