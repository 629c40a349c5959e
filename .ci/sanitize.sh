#!/usr/bin/env bash
# The interpret-mode tests (tests/test_cuda_interpret.py and the interpret cases
# of tests/test_ema_in_step.py: the CUDA kernels run on the CPU, a block's
# threads as real threads) under a sanitizer:
#   address  out-of-bounds reads/writes in a kernel are errors (as memcheck)
#   thread   races between the threads of a block (as racecheck)
# Usage: bash .ci/sanitize.sh address|thread [pytest args]. Needs .venv (make build).
# The extension is built again with the sanitizer into build/sanitize-<kind>
# and loaded through PYGAN_OPTIM_EXTENSION; the sanitizer runtime is preloaded
# into python (torch itself is not instrumented). -s: a report printed before
# the abort must not stay in pytest's capture.
set -euo pipefail
cd "$(dirname "$0")/.."
kind="${1:?usage: sanitize.sh address|thread [pytest args]}"
shift
case "$kind" in
  # libstdc++ is preloaded after ASan's runtime so that it is loaded when ASan
  # starts: else its __cxa_throw interceptor finds no real function and the
  # first C++ exception (a refused op call in a test) aborts the process.
  address) runtime="libasan.so libstdc++.so"
           export ASAN_OPTIONS="detect_leaks=0:alloc_dealloc_mismatch=0:abort_on_error=1" ;;
  thread)  runtime=libtsan.so
           export TSAN_OPTIONS="halt_on_error=1:report_signal_unsafe=0"
           # at::parallel_for runs on OpenMP, which TSan cannot see into: one thread.
           export OMP_NUM_THREADS=1 ;;
  *) echo "unknown sanitizer '$kind' (address or thread)" >&2; exit 2 ;;
esac
py=.venv/bin/python
export PATH="$PWD/.venv/bin:$PATH"  # its ninja, if the system has none
mkdir -p build
build="build/sanitize-$kind"
flags="-fsanitize=$kind -fno-omit-frame-pointer -g"
PYGAN_OPTIM_CUDA=0 cmake -S . -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo \
  -DPython_EXECUTABLE="$PWD/$py" -DCMAKE_CXX_FLAGS="$flags" \
  -DCMAKE_SHARED_LINKER_FLAGS="-fsanitize=$kind" -DCMAKE_MODULE_LINKER_FLAGS="-fsanitize=$kind" \
  > "$build.configure.log"
cmake --build "$build" > "$build.build.log"
module=$(ls "$build"/_C*.so)
echo "== $kind sanitizer: $module"
preload=""
for lib in $runtime; do preload="$preload $(g++ -print-file-name=$lib)"; done
PYGAN_OPTIM_EXTENSION="$PWD/$module" LD_PRELOAD="${preload# }" \
  "$py" -m pytest -q -s -p no:cacheprovider tests/test_cuda_interpret.py \
  tests/test_ema_in_step.py -k interpret "$@"
