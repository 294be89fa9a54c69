#!/usr/bin/env bash
# make gpu-bench: the whole GPU side of the paper profile, as ONE device call (the README's "Running
# the paper profile on a GPU"). Run it as the FIRST command of a device call, with carry [".whl",
# ".carry"] built by `make gpu-prepare` and timeout_s 600:
#   installs the carried wheels into $GPU_SITE, points recbench at the carried caches (the raw data
#   does not travel: RECBENCH_DATA_DIR is an empty folder), and runs benchmark.gpu.bench, which fits
#   the next missing paper rows until GPU_BENCH_SECONDS (default 540) minus GPU_TEST_SECONDS (default
#   90) after this script started and leaves results.tar.gz, summary.json and gpu-bench.log in $OUT.
#   `timeout` is the last safety net: it ends the bench 30 s after that deadline. The last
#   GPU_TEST_SECONDS of the window go to the CUDA tests (`pytest -m gpu`: the no-sync checks of
#   issue 13 among them), whose output is $OUT/gpu-tests.log; 0 skips them. All of it ends inside
#   the call's 600 s.
# Overridable (tests): PYTHON, GPU_SITE, GPU_WORK, GPU_WHEELS, GPU_CARRY, GPU_BENCH_SECONDS,
# GPU_TEST_SECONDS, GPU_BENCH_ARGS.
set -uo pipefail
cd "$(dirname "$0")/../.."
START=$(date +%s)
TEST_SECONDS=${GPU_TEST_SECONDS:-90}
DEADLINE=$((START + ${GPU_BENCH_SECONDS:-540} - TEST_SECONDS))
OUT=${OUT:?OUT must name the folder whose files come back}
PYTHON=${PYTHON:-python3}
SITE=${GPU_SITE:-/tmp/site}
WORK=${GPU_WORK:-/tmp/recbench-gpu}
WHEELS=${GPU_WHEELS:-.whl}
mkdir -p "$OUT" "$WORK/no-raw-data"
exec > >(tee -a "$OUT/gpu-bench.log") 2>&1
echo "gpu-bench: $(date -u +%FT%TZ), deadline in $((DEADLINE - START)) s"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
if compgen -G "$WHEELS/*.whl" >/dev/null; then
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "$WHEELS"/*.whl || exit 1
fi
"$PYTHON" -m benchmark.gpu.unpack "$WHEELS" "$SITE" || exit 1
export PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export RECBENCH_CACHE_DIR="$WORK/cache" RECBENCH_DATA_DIR="$WORK/no-raw-data"
# shellcheck disable=SC2086  # GPU_BENCH_ARGS is a list of options
LIMIT=$((DEADLINE - $(date +%s) + 30))
[ "$LIMIT" -ge 1 ] || LIMIT=1  # `timeout 0` would mean no limit at all
timeout --signal=TERM --kill-after=20 "$LIMIT" "$PYTHON" -m benchmark.gpu.bench \
  --carry "${GPU_CARRY:-.carry}" --out "$OUT" --deadline "$DEADLINE" --work-root "$WORK" ${GPU_BENCH_ARGS:-}
status=$?
if [ "$TEST_SECONDS" -gt 0 ]; then
  echo "gpu-bench: CUDA tests for ${TEST_SECONDS} s at most -> $OUT/gpu-tests.log"
  timeout --signal=TERM --kill-after=10 "$TEST_SECONDS" "$PYTHON" -m pytest -q -p no:cacheprovider -m gpu \
    tests/test_gpu.py tests/test_no_sync.py tests/test_tiger.py >"$OUT/gpu-tests.log" 2>&1
  echo "gpu-bench: CUDA tests exit $?: $(tail -n 1 "$OUT/gpu-tests.log")"
fi
echo "gpu-bench: exit $status after $(($(date +%s) - START)) s; files in $OUT: $(ls "$OUT" | tr '\n' ' ')"
exit $status
