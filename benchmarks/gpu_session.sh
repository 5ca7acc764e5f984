#!/usr/bin/env bash
# One device call: install the carried wheels and Triton cache, run the GPU tests, then the
# benchmark (and whatever else is named), logs and JSON under $OUT. Usage:
#   bash benchmarks/gpu_session.sh "tests bench" [bench args...]
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl 2>&1 | tail -1
mkdir -p /tmp/tc
for t in .whl/*triton_cache*.tgz; do [ -f "$t" ] && tar xzf "$t" -C /tmp/tc; done
export TRITON_CACHE_DIR=/tmp/tc
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,power.limit --format=csv | tee "$OUT/nvidia_smi.txt"
what=$1; shift
git rev-parse HEAD 2>/dev/null | tee "$OUT/commit.txt"
if [[ $what == *tests* ]]; then
  timeout 240 python3 -m pytest tests/test_gpu_ops.py -q -s -p no:cacheprovider > "$OUT/gpu_tests.log" 2>&1
  echo "gpu tests rc=$?"; grep -E "passed|failed|error" "$OUT/gpu_tests.log" | tail -3
  grep -E "^(short|long)" "$OUT/gpu_tests.log" | sort -k5 -g | tail -4
fi
if [[ $what == *bench* ]]; then
  timeout ${BENCH_TIMEOUT:-400} python3 benchmarks/bench_train.py --out "$OUT/bench_train.json" "$@" 2>&1 | tee "$OUT/bench.log" | grep -v "^ *warm-up" | tail -60
fi
tar czf "$OUT/triton_cache.tgz" -C /tmp/tc . && ls -la "$OUT"
