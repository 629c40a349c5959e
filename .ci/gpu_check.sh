#!/usr/bin/env bash
# The GPU check, for a bare machine that has a GPU, nvcc and a CUDA build of
# torch but no package registry (make gpu-check; see README "GPU check").
#   1. builds the extension with CUDA against that python's torch (any version)
#      into build/gpu, for this GPU's architecture only;
#   2. runs tests/test_cuda.py and tests/test_cuda_streams.py on the GPU;
#   3. runs .ci/gpu_smoke.py under compute-sanitizer memcheck, racecheck and
#      synccheck, when the tool is there;
#   4. runs benchmarks/bench_biggan.py --device cuda (optimizer, wrapper, EMA).
# Everything goes to $GPU_CHECK_OUT (default gpu_check_out/): gpu_check.log,
# biggan.json, biggan.png. Pure-Python needs (mmengine and friends) come from
# .whl/ if present (make gpu-wheels fills it on a machine with pip access).
# Sized for about 9.5 minutes on an H200 machine (8 before the streams and
# synccheck steps, estimated); each step has its own time limit and
# a failed step does not stop the later ones. Exit status: the number of
# failed steps.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${GPU_CHECK_OUT:-gpu_check_out}"
mkdir -p "$out"
log="$out/gpu_check.log"
: > "$log"
py="${PYTHON:-python3}"
failed=0
say() { echo "== $*" | tee -a "$log"; }
step() {  # step NAME SECONDS command...
  local name="$1" limit="$2"
  shift 2
  say "$name (limit ${limit}s)"
  local t0=$(date +%s)
  timeout "$limit" "$@" >> "$log" 2>&1
  local rc=$?
  say "$name: rc=$rc in $(( $(date +%s) - t0 ))s"
  [ $rc -eq 0 ] || failed=$((failed + 1))
  return $rc
}

export PYTHONUNBUFFERED=1
if ls .whl/*.whl > /dev/null 2>&1; then
  "$py" -m pip install -q --no-index --no-deps --no-compile --target /tmp/pygan-site .whl/*.whl \
    >> "$log" 2>&1 && export PYTHONPATH="/tmp/pygan-site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # the package from this tree

say "machine"
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
  nvcc --version | tail -2 || true
  "$py" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'NO GPU VISIBLE')"
  "$py" -c "import os, sysconfig; d = sysconfig.get_paths()['include']; \
print('Python.h', 'found' if os.path.exists(d + '/Python.h') else 'MISSING (the build needs it)', \
'in', d)"
} >> "$log" 2>&1

arch=$("$py" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability(0))" 2>/dev/null \
  || echo "9.0")
build=build/gpu
step build 300 env PYGAN_OPTIM_CUDA=1 TORCH_CUDA_ARCH_LIST="$arch" bash -c "
  cmake -S . -B $build -G Ninja -DCMAKE_BUILD_TYPE=Release -DPython_EXECUTABLE=\$(command -v $py) &&
  cmake --build $build -j \$(nproc)"
module=$(ls "$build"/_C*.so 2>/dev/null | head -1)
if [ -z "$module" ]; then
  say "no module built: stopping"
  exit 1
fi
export PYGAN_OPTIM_EXTENSION="$PWD/$module"

step test_cuda 150 "$py" -m pytest -q -p no:cacheprovider tests/test_cuda.py
step test_cuda_streams 90 "$py" -m pytest -q -p no:cacheprovider tests/test_cuda_streams.py
if command -v compute-sanitizer > /dev/null; then
  step memcheck 90 compute-sanitizer --tool memcheck --error-exitcode 1 "$py" .ci/gpu_smoke.py
  step racecheck 120 compute-sanitizer --tool racecheck --error-exitcode 1 "$py" .ci/gpu_smoke.py
  step synccheck 90 compute-sanitizer --tool synccheck --error-exitcode 1 "$py" .ci/gpu_smoke.py
else
  say "compute-sanitizer not found: memcheck and racecheck skipped"
  step smoke 60 "$py" .ci/gpu_smoke.py
fi
step bench 180 "$py" benchmarks/bench_biggan.py --device cuda --parts adam wrapper ema \
  --out "$out"
say "failed steps: $failed (log: $log)"
exit "$failed"
