#!/usr/bin/env bash
# The GPU acceptance check as one command for a machine with a CUDA GPU and no internet:
#
#   bash bench/gpu_check.sh [OUT_DIR]        # OUT_DIR default: $OUT, else reports/gpu_check
#
# It uses the machine's own python3 and torch. Pure-Python packages the check needs and the machine
# lacks (pyyaml) are installed offline from wheels in .whl/ when that folder exists (pip download, see
# bench/README.md). Writes nvidia-smi.txt, gpu_check.json (the figures), gpu_check.log and pytest_cuda.log
# to OUT_DIR; exits non-zero when any check or cuda test fails. Takes about 5 minutes on an H200.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-${OUT:-reports/gpu_check}}
mkdir -p "$out"
py=${PYTHON:-python3}

if [ -d .whl ] && compgen -G ".whl/*.whl" >/dev/null; then
  $py -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/gpu_check_site .whl/*.whl \
    || { echo "gpu_check.sh: installing the carried wheels in .whl/ failed" >&2; exit 2; }
  export PYTHONPATH=/tmp/gpu_check_site${PYTHONPATH:+:$PYTHONPATH}
fi
missing=$($py -c 'import importlib.util as u; print(" ".join(m for m in ("yaml", "numpy", "torch", "torchvision", "PIL", "numba", "pytest") if u.find_spec(m) is None))')
if [ -n "$missing" ]; then
  echo "gpu_check.sh: python modules missing here: $missing (carry their wheels in .whl/, see bench/README.md)" >&2
  exit 2
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1

nvidia-smi >"$out/nvidia-smi.txt" 2>&1 || echo "gpu_check.sh: nvidia-smi failed (see $out/nvidia-smi.txt)" >&2
timeout 420 $py bench/gpu_check.py --device cuda --out "$out/gpu_check.json" 2>&1 | tee "$out/gpu_check.log" >/dev/null
check=${PIPESTATUS[0]}
grep '^gpu_check:' "$out/gpu_check.log"
# the cuda-marked tests at small sizes; the compiled step is left to the check above (its compile is the cost)
timeout 150 $py -m pytest -q -p no:cacheprovider -m cuda -k "not train_compiled" tests/test_gpu_check.py \
  2>&1 | tee "$out/pytest_cuda.log" | tail -n 5
tests=${PIPESTATUS[0]}
echo "gpu_check.sh: gpu_check.py exit $check, pytest -m cuda exit $tests; figures in $out/gpu_check.json"
[ "$check" -eq 0 ] && [ "$tests" -eq 0 ]
