#!/usr/bin/env bash
# llava-edge on aarch64, proven under emulation (correctness only, no timings): writes bench/reports/aarch64-qemu.md.
# Needs root on a Debian/Ubuntu x86-64 host with network access to Debian and PyPI, and an x86 Python with
# llava-edge[dev] installed (torch included: the x86 side exports the fp32 vision graph the comparison uses).
#   sudo bench/arm/run.sh [--clean]
# env: LLAVA_ARM_WORK (default /var/tmp/llava-edge-arm), X86_PYTHON, JOBS (compile jobs), ARM_TEST_LIMIT (answer only
# the first N questions of the shapes test split in the arm64 root: emulation runs the demo ~10-30x slower)
# Each step is skipped when its output exists, so an interrupted run continues; --clean starts from nothing.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(git -C "$here" rev-parse --show-toplevel)
work=${LLAVA_ARM_WORK:-/var/tmp/llava-edge-arm}
x86_py=${X86_PYTHON:-python3}
root=$work/root
if [ "${1:-}" = --clean ]; then
  umount "$root/proc/cpuinfo" "$root/sys" "$root/proc" 2>/dev/null || true
  rm -rf "$work"
fi
mkdir -p "$work"
say() { echo "[arm $(date -u +%H:%M:%S)] $*" >&2; }

say "1/9 host packages"
need=(qemu-aarch64-static mmdebstrap aarch64-linux-gnu-gcc aarch64-linux-gnu-g++ cmake update-binfmts)
for c in "${need[@]}"; do
  command -v "$c" >/dev/null || { apt-get update -q && apt-get install -y -q qemu-user-static binfmt-support \
    mmdebstrap gcc-aarch64-linux-gnu g++-aarch64-linux-gnu cmake; break; }
done

say "2/9 binfmt_misc: aarch64 binaries run through qemu-aarch64-static"
[ -e /proc/sys/fs/binfmt_misc/register ] || mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc
update-binfmts --enable qemu-aarch64

say "3/9 Debian bookworm arm64 root"
if [ ! -x "$root/usr/bin/python3" ]; then
  rm -rf "$root"
  nice -n 19 mmdebstrap --arch=arm64 --variant=apt \
    --include=python3,python3-venv,python3-pip,ca-certificates,libgomp1 bookworm "$root"
fi

say "4/9 llama-cpp-python's source, the version the x86 side runs"
version=$("$x86_py" -c "import llama_cpp; print(llama_cpp.__version__)")
sdist=$work/dl/llama_cpp_python-$version.tar.gz
[ -f "$sdist" ] || "$x86_py" -m pip download "llama-cpp-python==$version" --no-deps --no-binary :all: -d "$work/dl"

say "5/9 llama.cpp cross-built for armv8.2-a+dotprod (an aarch64 wheel)"
if ! ls "$work"/wheels/llama_cpp_python-*linux_aarch64.whl >/dev/null 2>&1; then
  [ -x "$work/hostvenv/bin/python3" ] || python3 -m venv "$work/hostvenv"
  PATH=$work/hostvenv/bin:$PATH "$here/cross_wheel.sh" "$sdist" "$work/wheels"
fi

say "6/9 the other dependencies as aarch64 wheels from PyPI"
deps=$("$x86_py" -c "import tomllib; d = tomllib.load(open('$repo/pyproject.toml', 'rb'))['project']['dependencies']; \
print(' '.join(x for x in d if not x.startswith('llama-cpp-python')))")
py=$(chroot "$root" python3 -c "import sys; print(f'{sys.version_info[0]}{sys.version_info[1]}')")
# llama-cpp-python's own dependencies too (its wheel is not on PyPI), and pip's build backend for llava-edge
"$x86_py" -m pip download -q --only-binary=:all: --python-version "$py" --implementation cp \
  --platform manylinux2014_aarch64 --platform manylinux_2_28_aarch64 --platform linux_aarch64 -d "$work/wheels" \
  $deps "typing-extensions>=4.5" "diskcache>=5.6.1" "jinja2>=2.11.3" "setuptools>=68" wheel

say "7/9 llava-edge installed in the arm64 root with pip, as a user would"
rm -rf "$root/opt/llava-edge-src" "$root/opt/wheels" && mkdir -p "$root/opt/llava-edge-src"
git -C "$repo" archive HEAD | tar -x -C "$root/opt/llava-edge-src"
cp -r "$work/wheels" "$root/opt/wheels"
# The root sees the host's /proc and /sys; the host's x86 /proc/cpuinfo crashed ONNX Runtime's cpuinfo
# (SIGSEGV at import), so the root gets a Cortex-A76's (Raspberry Pi 5), and QEMU emulates that core (no SVE,
# no i8mm: the kernels a Pi 5 runs). QEMU_CPU=max would offer every extension QEMU knows.
export QEMU_CPU=${QEMU_CPU:-cortex-a76}
"$x86_py" "$here/fake_cpuinfo.py" > "$work/cpuinfo"
mountpoint -q "$root/proc" || mount -t proc proc "$root/proc"
mountpoint -q "$root/sys" || mount -t sysfs sysfs "$root/sys"
mount --bind "$work/cpuinfo" "$root/proc/cpuinfo"
trap 'umount "$root/proc/cpuinfo" "$root/sys" "$root/proc" 2>/dev/null || true' EXIT
[ -x "$root/opt/venv/bin/python" ] || chroot "$root" python3 -m venv /opt/venv
chroot "$root" /opt/venv/bin/pip install -q --no-cache-dir --no-index --find-links /opt/wheels /opt/llava-edge-src
chroot "$root" /opt/venv/bin/llava-edge --version

say "8/9 the same probe on x86 and in the arm64 root"
[ -f "$work/inputs/inputs.npz" ] || PYTHONPATH=$repo "$x86_py" "$here/prepare_inputs.py" "$work/inputs"
[ -f "$work/x86/result.json" ] || PYTHONPATH=$repo "$x86_py" "$here/probe.py" "$work/inputs" "$repo/examples" "$work/x86"
rm -rf "$root/opt/inputs" && cp -r "$work/inputs" "$root/opt/inputs"
(cd "$root" && chroot "$root" /opt/venv/bin/llava-edge chat /opt/llava-edge-src/examples/green_triangle.png \
  --prompt "Describe the image.")
[ -f "$root/opt/out/result.json" ] || (cd / && chroot "$root" /opt/venv/bin/python \
  /opt/llava-edge-src/bench/arm/probe.py /opt/inputs /opt/llava-edge-src/examples /opt/out ${ARM_TEST_LIMIT:+--limit $ARM_TEST_LIMIT})

say "9/9 report"
PYTHONPATH=$repo "$x86_py" "$here/compare.py" "$work/inputs" "$work/x86" "$root/opt/out" "$here/steps.md" "$repo/bench/reports/aarch64-qemu.md"
say "wrote $repo/bench/reports/aarch64-qemu.md"
