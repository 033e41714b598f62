#!/usr/bin/env bash
# The one prepared check for a lent GPU machine (issue #15): the gpu-marked tests, then
# benchmarks/gpu.py, every result in one folder. Made for the machine as it is: no network, its own
# Python 3.12 with torch 2.11 and triton 3.6 (nothing is installed; shortrt's C++ extension is not
# needed: the GPU engine and its kernels are torch + Triton), about 5 minutes in all.
#
#   bash benchmarks/gpu_check.sh [OUT_DIR]            # OUT_DIR defaults to $OUT, else results/gpu-check
#   bash benchmarks/gpu_check.sh --dry-run OUT_DIR    # the same steps on the CPU (tests skip, tiny benchmark)
#
# Files written (at most 8, for the device tool's limits): env.txt, pytest-gpu.txt, pytest-gpu.xml,
# gpu.json, gpu.md, gpu-bench.txt, summary.txt. PYTHON overrides the interpreter (default python3).
set -u
DRY=0
if [ "${1:-}" = "--dry-run" ]; then DRY=1; shift; fi
DEST="${1:-${OUT:-results/gpu-check}}"
mkdir -p "$DEST"
DEST="$(cd "$DEST" && pwd)"
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-python3}"
cd "$REPO"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export SHORTRT_CACHE="${SHORTRT_CACHE:-/tmp/shortrt-cache}" HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
T0=$(date +%s)
TEST_LIMIT=120   # seconds for the gpu-marked tests
BENCH_LIMIT=200  # seconds for the benchmark (gpu.py's own --deadline keeps it inside)
if [ "$DRY" = 1 ]; then TEST_LIMIT=300; BENCH_LIMIT=300; fi

{
  echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)  dry_run: $DRY"
  echo "commit: $(git rev-parse HEAD 2>/dev/null || echo '?')"
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,clocks.max.mem --format=csv 2>&1 || true
  "$PY" - <<'EOF' 2>&1
import platform, torch
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda,
      "available", torch.cuda.is_available())
try:
    import triton; print("triton", triton.__version__)
except Exception as exc: print("triton: not importable:", exc)
for name in ("transformers", "safetensors", "tokenizers", "numpy", "pytest"):
    try:
        print(name, __import__(name).__version__)
    except Exception as exc:
        print(name, "missing:", exc)
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("gpu", p.name, "sm", f"{p.major}{p.minor}", "memory GiB", round(p.total_memory / 2**30, 1),
          "SMs", p.multi_processor_count)
EOF
} > "$DEST/env.txt"
cat "$DEST/env.txt"

# 1. Tests marked gpu, compiled Triton (not the interpreter conftest sets by default). Only the files
#    that hold such tests are collected: the others may import what this machine lacks.
FILES=$(grep -l "pytest.mark.gpu\|mark\.gpu" tests/test_*.py 2>/dev/null | tr '\n' ' ')
TEST_RC=0
if [ -n "$FILES" ]; then
  TRITON_INTERPRET=0 timeout "$TEST_LIMIT" "$PY" -m pytest -q -m gpu -rA -p no:cacheprovider \
      --junitxml="$DEST/pytest-gpu.xml" $FILES > "$DEST/pytest-gpu.txt" 2>&1
  TEST_RC=$?
else
  echo "no test file holds a gpu-marked test" > "$DEST/pytest-gpu.txt"
fi
tail -n 25 "$DEST/pytest-gpu.txt"

# 2. The benchmark: every row recorded, failed ones with their reason.
ELAPSED=$(( $(date +%s) - T0 ))
if [ "$DRY" = 1 ]; then
  BENCH_ARGS=(--dry-run --dtypes bf16 --peers "")
else
  BENCH_ARGS=(--deadline $(( BENCH_LIMIT - 15 )))
fi
timeout "$BENCH_LIMIT" "$PY" benchmarks/gpu.py --out "$DEST" "${BENCH_ARGS[@]}" > "$DEST/gpu-bench.txt" 2>&1
BENCH_RC=$?
tail -n 40 "$DEST/gpu-bench.txt"

{
  echo "tests: exit $TEST_RC ($( (grep -E '[0-9]+ (passed|failed|skipped|error)' "$DEST/pytest-gpu.txt" || echo 'no summary') | tail -n 1))"
  echo "benchmark: exit $BENCH_RC"
  echo "seconds: tests+setup $ELAPSED, total $(( $(date +%s) - T0 ))"
} > "$DEST/summary.txt"
cat "$DEST/summary.txt"
[ "$TEST_RC" = 0 ] && [ "$BENCH_RC" = 0 ]
