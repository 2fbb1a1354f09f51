#!/usr/bin/env bash
# Here (x86 host with network to PyPI): everything bench/gpu/run.sh needs on a GPU machine that has no network,
# small enough to travel with the checkout (the device tool carries at most 64 MiB of ignored paths):
#   bench/gpu/carry/llama_cpp_python-<version>-trimmed.tar.gz   llama-cpp-python's sdist, the vendored llama.cpp cut
#                                                               to what a CUDA build of the library and mtmd compiles
#   bench/gpu/carry/wheels/                                     the pure-Python wheels that machine lacks
#     bench/gpu/prepare.sh [PYTHON]     (PYTHON: the one llava-edge runs with here; default python3)
# Then, with the device tool: run bench/gpu/run.sh there, carrying bench/gpu/carry.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
py=${1:-python3}
carry=$here/carry
version=$("$py" -c "import llama_cpp; print(llama_cpp.__version__)")
mkdir -p "$carry/wheels"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

"$py" -m pip download -q "llama-cpp-python==$version" --no-deps --no-binary :all: -d "$work"
tar -xzf "$work"/llama_cpp_python-"$version".tar.gz -C "$work"
src=$work/llama_cpp_python-$version
lc=$src/vendor/llama.cpp
# Not compiled by llama-cpp-python's build (llama.cpp is a subproject there: no tests, tools, examples; mtmd is
# added on its own), or other GPU backends than CUDA.
rm -rf "$src/.git" "$lc"/{models,docs,examples,tests,benches,media,pocs,scripts,gguf-py,conversion,grammars,app,skills} \
  "$lc"/{.github,.devops,ci,requirements}
find "$lc/tools" -mindepth 1 -maxdepth 1 ! -name mtmd -exec rm -rf {} +
for b in "$lc"/ggml/src/ggml-*/; do
  case $(basename "$b") in ggml-cpu|ggml-cuda|ggml-blas) ;; *) rm -rf "$b" ;; esac
done
out=$carry/llama_cpp_python-$version-trimmed.tar.gz
tar -czf "$out" -C "$work" "llama_cpp_python-$version"
echo "trimmed source: $out ($(du -h "$out" | cut -f1))"

# The GPU machine's image has torch, numpy, onnx, onnxruntime (CPU), scikit-build-core, cmake, typer, tqdm, httpx,
# pillow, safetensors, sentencepiece, jinja2 (KINDS.md in the device tool's library); these it lacks:
"$py" -m pip download -q --only-binary=:all: --no-deps -d "$carry/wheels" "diskcache>=5.6.1" "gguf>=0.10" \
  "prompt_toolkit>=3.0" wcwidth "llguidance>=1.0" --platform manylinux_2_28_x86_64 --python-version 3.12 \
  --implementation cp
du -sh "$carry"
