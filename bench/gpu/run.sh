#!/usr/bin/env bash
# On a machine with an NVIDIA GPU and no network (the device tool's): llama.cpp built with CUDA for one GPU
# architecture from the trimmed source bench/gpu/prepare.sh made, llava-edge installed over it, the 7B-shaped
# random bundle built, and the first-answer and KV-type cases run, the decoder on the GPU. Writes the reports to
# $OUT (default bench/reports), named after the GPU.
#   bench/gpu/run.sh            env: ARCH (CUDA architecture, default 90: H100/H200), JOBS, WORK, OUT
# Vision runs on ONNX Runtime's CPU provider there: onnxruntime-gpu is too large to carry (about 300 MB).
set -euo pipefail
repo=$(cd "$(dirname "$0")/../.." && pwd)
carry=$repo/bench/gpu/carry
arch=${ARCH:-90}
work=${WORK:-/tmp/llava-edge-gpu}
out=${OUT:-$repo/bench/reports}
jobs=${JOBS:-$(nproc)}
say() { echo "[gpu $(date -u +%H:%M:%S)] $*" >&2; }
mkdir -p "$work" "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader >&2 || say "no nvidia-smi"

say "1/4 llama-cpp-python with CUDA for sm_$arch"
if ! python3 -c "import llama_cpp, sys; sys.exit(0 if llama_cpp.llama_supports_gpu_offload() else 1)" 2>/dev/null; then
  rm -rf "$work/src" && mkdir -p "$work/src" "$work/wheel"
  tar -xzf "$carry"/llama_cpp_python-*-trimmed.tar.gz -C "$work/src"
  CMAKE_ARGS="-DGGML_CUDA=on -DCMAKE_CUDA_ARCHITECTURES=$arch -DGGML_NATIVE=on" CMAKE_BUILD_PARALLEL_LEVEL=$jobs \
    python3 -m pip wheel -q --no-build-isolation --no-deps -w "$work/wheel" "$work"/src/llama_cpp_python-*
  python3 -m pip install -q --no-deps --force-reinstall "$work"/wheel/llama_cpp_python-*.whl
fi
python3 -m pip install -q --no-deps "$carry"/wheels/*.whl
python3 -m pip install -q --no-deps --no-build-isolation -e "$repo"
python3 -c "import llama_cpp; assert llama_cpp.llama_supports_gpu_offload(), 'llama.cpp has no GPU offload'"

say "2/4 the 7B-shaped random bundle (Q4_K_M, all 32 blocks)"
cd "$repo"
python3 -c "
from pathlib import Path
from llava_edge.bench.cases import llava7b_case
print(llava7b_case(Path('$work'), 32, $jobs, all_precisions=False).bundle)"
bundle=$work/llava7b-L32/bundle

say "3/4 first answer: llava-edge (decoder on the GPU) and llama-cpp-python's Llava15ChatHandler"
python3 -m llava_edge.bench.first_answer_case --bundle "$bundle" --rounds 3 --threads "$jobs" --out "$out"

say "4/4 KV type: peak memory, first answer, decode"
python3 -m llava_edge.bench.kv_memory_case --shape 7b --rounds 2 --threads "$jobs" --work "$work" --out "$out"
say "reports in $out"
