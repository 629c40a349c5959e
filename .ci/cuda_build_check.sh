#!/usr/bin/env bash
# Proves the CUDA variant on a machine without a GPU: builds pygan_optim with
# the CUDA kernels against torch==2.14.1 (CUDA 13.0) and checks that the module
# imports, says it was built with CUDA, and has every op registered for the
# CUDA dispatch key. Prints the ptxas register/spill counts of the Adam kernels.
#
#   CUDA_VENV   venv to create or reuse (default .venv-cuda)
#   CUDA_HOME   CUDA toolkit (default: /usr/local/cuda, else found from nvcc on PATH)
#   TORCH_CUDA_ARCH_LIST  passed through (cmake/cuda.cmake defaults to "8.0;9.0+PTX")
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$(pwd)
VENV=${CUDA_VENV:-.venv-cuda}
TORCH_PIN=2.14.1
LOG=$ROOT/build/cuda-build.log
mkdir -p "$ROOT/build"

# ---- venv -------------------------------------------------------------------
if [[ ! -x "$VENV/bin/python" ]]; then
  echo "== creating $VENV"
  python3 -m venv "$VENV"
  if ! "$VENV/bin/pip" install "torch==$TORCH_PIN" ninja scikit-build-core numpy pytest \
      >"$ROOT/build/cuda-venv.log" 2>&1; then
    tail -30 "$ROOT/build/cuda-venv.log"
    echo "installing into $VENV failed: see build/cuda-venv.log" >&2
    exit 1
  fi
else
  echo "== reusing $VENV"
fi
VENV=$(cd "$VENV" && pwd)  # absolute: the checks below run from other folders
PY=$VENV/bin/python
"$PY" - "$TORCH_PIN" <<'EOF'
import sys, torch
want = sys.argv[1]
have = torch.__version__.split("+")[0]
if have != want or not torch.version.cuda:
    sys.exit(f"venv has torch {torch.__version__} (CUDA {torch.version.cuda}); "
             f"need the CUDA build of torch=={want}: remove the venv or pick another CUDA_VENV")
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}")
EOF
"$PY" -c "import ninja, scikit_build_core" 2>/dev/null ||
  "$VENV/bin/pip" install --quiet ninja scikit-build-core numpy pytest >/dev/null

# ---- CUDA toolkit -------------------------------------------------------------
# The real toolkit root (bin/nvcc beside include/cuda_runtime.h), not a wrapper
# script on PATH.
is_toolkit() { [[ -n "$1" && -x "$1/bin/nvcc" && -f "$1/include/cuda_runtime.h" ]]; }
find_toolkit() {
  if [[ -n "${CUDA_HOME:-}" ]]; then
    is_toolkit "$CUDA_HOME" || { echo "CUDA_HOME=$CUDA_HOME is not a CUDA toolkit" >&2; return 1; }
    echo "$CUDA_HOME"; return 0
  fi
  if is_toolkit /usr/local/cuda; then echo /usr/local/cuda; return 0; fi
  local nvcc root target
  nvcc=$(command -v nvcc || true)
  [[ -n "$nvcc" ]] || { echo "no CUDA toolkit: set CUDA_HOME" >&2; return 1; }
  nvcc=$(readlink -f "$nvcc")
  root=$(dirname "$(dirname "$nvcc")")
  if is_toolkit "$root"; then echo "$root"; return 0; fi
  # A wrapper script: take the nvcc it runs.
  if grep -Iq . "$nvcc"; then
    for target in $(grep -oE '/[^"[:space:]]*/bin/nvcc' "$nvcc"); do
      root=$(dirname "$(dirname "$(readlink -f "$target")")")
      if is_toolkit "$root"; then echo "$root"; return 0; fi
    done
  fi
  echo "no CUDA toolkit found from $nvcc: set CUDA_HOME" >&2
  return 1
}
CUDA_HOME=$(find_toolkit)
export CUDA_HOME
export PATH="$CUDA_HOME/bin:$PATH"
echo "CUDA toolkit: $CUDA_HOME ($("$CUDA_HOME/bin/nvcc" --version | grep -o 'release [0-9.]*'))"

# ---- build ------------------------------------------------------------------
# Own build folder: the CPU build's (build/{wheel_tag}) belongs to another venv.
echo "== building (log: $LOG)"
# kernels.cu is always recompiled (about 10 s) so that the log has ptxas's report.
find build -path 'build/cuda-*' -name 'kernels.cu.o' -delete 2>/dev/null || true
start=$(date +%s)
if ! PYGAN_OPTIM_CUDA=1 MAX_JOBS=2 CMAKE_BUILD_PARALLEL_LEVEL=2 \
    "$VENV/bin/pip" install --no-build-isolation --no-deps -v \
    --config-settings=build-dir=build/cuda-{wheel_tag} . >"$LOG" 2>&1; then
  grep -E 'error|Error|FAILED' "$LOG" | head -60 || true
  echo "build failed: see $LOG" >&2
  exit 1
fi
echo "built in $(( $(date +%s) - start )) s"

# ---- ptxas report for the Adam kernels ----------------------------------------
# ptxas -v prints, per kernel and architecture: "Compiling entry function 'NAME'
# for 'sm_XX'", then "N bytes stack frame, N bytes spill stores, N bytes spill
# loads", then "Used N registers, ...".
ptxas_report() {
  awk '
    /Compiling entry function/ {
      match($0, /function .[^'"'"']*/); fn = substr($0, RSTART + 10, RLENGTH - 10)
      match($0, /sm_[0-9a-z]*/); arch = substr($0, RSTART, RLENGTH); spill = "" }
    /bytes spill stores/ { spill = $0; sub(/^[[:space:]]+/, "", spill) }
    /Used [0-9]+ registers/ && fn != "" {
      match($0, /Used [0-9]+ registers/)
      print arch "\t" substr($0, RSTART, RLENGTH) "\t" spill "\t" fn; fn = "" }
  ' "$1"
}
echo "== ptxas: Adam kernels"
report=$(ptxas_report "$LOG" | grep -E "adam_(kernel|prepare)" || true)
if [[ -z "$report" ]]; then
  echo "no ptxas lines for the Adam kernels in $LOG" >&2
  exit 1
fi
# Demangled, without namespaces and parameter lists: "adam_kernel<float, AMSGRAD, BETA1_ZERO>".
printf '%s\n' "$report" | c++filt |
  sed -E 's/(void )?pygan_optim::cuda::\(anonymous namespace\):://; s/\(pygan_optim::cuda::AdamTensor const\*.*$//' |
  sort -t "$(printf '\t')" -k1,1 -k4,4 | awk -F '\t' '{ printf "%-6s %-18s %-60s %s\n", $1, $2, $3, $4 }'
if printf '%s\n' "$report" | grep -qE '[1-9][0-9]* bytes spill (stores|loads)|STACK:[1-9]'; then
  echo "WARNING: an Adam kernel spills registers" >&2
fi

# ---- import without a GPU; ops registered for CUDA ------------------------------
echo "== import check"
cd "$ROOT/build"  # not the source tree: its pygan_optim/ has no _C
"$PY" - <<'EOF'
import glob
import importlib.util
import sysconfig

import torch

# Load the extension alone: the package's __init__ also imports mmengine.
so = glob.glob(sysconfig.get_paths()["platlib"] + "/pygan_optim/_C*.so")
assert len(so) == 1, so
spec = importlib.util.spec_from_file_location("pygan_optim._C", so[0])
_C = importlib.util.module_from_spec(spec)
spec.loader.exec_module(_C)

print(f"module: {so[0]}")
print(f"torch.cuda.is_available(): {torch.cuda.is_available()}")
assert _C.cuda_built(), "pygan_optim._C.cuda_built() is False"
print("cuda_built(): True")
ops = ("adam_step_", "scale_", "scale", "l2_norm", "ema_")
missing = []
for op in ops:
    for key in ("CPU", "CUDA"):
        ok = torch._C._dispatch_has_kernel_for_dispatch_key(f"pygan_optim::{op}", key)
        print(f"  pygan_optim::{op:<11} {key:<4} {'registered' if ok else 'MISSING'}")
        if not ok:
            missing.append(f"{op}/{key}")
assert not missing, f"kernels missing for: {missing}"
print(f"OK: {len(ops)} ops registered for CPU and CUDA")
EOF
