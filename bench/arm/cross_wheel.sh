#!/usr/bin/env bash
# llama-cpp-python's sdist -> an aarch64 wheel: its vendored llama.cpp cross-built for armv8.2-a+dotprod
# (Cortex-A76 / Raspberry Pi 5, Cortex-A78AE / Jetson Orin) by scikit-build-core on this x86 host, then the
# wheel's platform tag set to linux_aarch64 (scikit-build-core names it after the host).
# usage: cross_wheel.sh SDIST OUT_DIR
set -euo pipefail
sdist=$1; out=$2
here=$(cd "$(dirname "$0")" && pwd)
mkdir -p "$out/build"
# LLAVA_BUILD=OFF: llava-edge's runtime never loads llama.cpp's mtmd (its vision runs in ONNX Runtime)
export CMAKE_ARGS="-DCMAKE_TOOLCHAIN_FILE=$here/aarch64-toolchain.cmake -DGGML_NATIVE=OFF \
-DGGML_CPU_ARM_ARCH=armv8.2-a+dotprod -DLLAVA_BUILD=OFF -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF \
-DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF"
export CMAKE_BUILD_PARALLEL_LEVEL=${JOBS:-2}
nice -n 19 python3 -m pip wheel --no-deps -w "$out/build" "$sdist"
python3 -m pip install -q wheel
for w in "$out"/build/llama_cpp_python-*.whl; do
  python3 -m wheel tags --remove --platform-tag linux_aarch64 "$w" >/dev/null
done
mv "$out"/build/llama_cpp_python-*linux_aarch64.whl "$out/"
wheel=$(ls "$out"/llama_cpp_python-*linux_aarch64.whl)
echo "$wheel: libggml-cpu.so is $(unzip -p "$wheel" llama_cpp/lib/libggml-cpu.so | file -b -)"
