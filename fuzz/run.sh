#!/usr/bin/env bash
# Coverage-guided fuzzing of the C++ safetensors parser with libFuzzer, under
# AddressSanitizer and UndefinedBehaviorSanitizer.
#
#   fuzz/run.sh [seconds]        default 60; `make fuzz FUZZ_SECONDS=3600` for a long run
#
# Builds build/fuzz/fuzz_safetensors with clang++ (FUZZ_CXX overrides), reruns
# every saved crash in fuzz/regressions/, then fuzzes for the given time from
# the committed seed corpus tests/data/safetensors_corpus/ with a fixed seed.
# New interesting inputs accumulate in build/fuzz-corpus/ (not committed); a
# crash is written to fuzz/regressions/ and the script fails: commit that file
# with the fix, and tests/test_safetensors.py checks it against the library too.
set -euo pipefail
cd "$(dirname "$0")/.."
seconds=${1:-60}
cxx=${FUZZ_CXX:-clang++}
build=build/fuzz
if ! command -v "$cxx" >/dev/null; then
  echo "fuzz/run.sh: $cxx not found; install clang (apt-get install clang)" >&2
  exit 2
fi
mkdir -p "$build" build/fuzz-corpus fuzz/regressions
cmake -S . -B "$build" -DCMAKE_CXX_COMPILER="$cxx" -DSHORTRT_FUZZ=ON >"$build/configure.log" ||
  { cat "$build/configure.log" >&2; exit 1; }
cmake --build "$build" --target fuzz_safetensors -j "${CMAKE_BUILD_PARALLEL_LEVEL:-2}" >"$build/build.log" ||
  { cat "$build/build.log" >&2; exit 1; }
fuzzer="$build/fuzz_safetensors"
export ASAN_OPTIONS=${ASAN_OPTIONS:-detect_leaks=1:abort_on_error=1}
export UBSAN_OPTIONS=${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1}

regressions=(fuzz/regressions/*)
if [ -e "${regressions[0]}" ]; then
  echo "fuzz/run.sh: rerunning ${#regressions[@]} saved crash(es)"
  "$fuzzer" "${regressions[@]}"
fi

echo "fuzz/run.sh: fuzzing for ${seconds}s"
"$fuzzer" -seed=1 -max_total_time="$seconds" -max_len=4096 -timeout=10 -rss_limit_mb=2048 \
  -dict=fuzz/safetensors.dict -artifact_prefix=fuzz/regressions/ -print_final_stats=1 \
  build/fuzz-corpus tests/data/safetensors_corpus
