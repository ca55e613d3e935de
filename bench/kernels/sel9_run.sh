#!/usr/bin/env bash
# Round 9 (branch sel-r9) device session. Binaries built on the development
# machine, tarred into bundle.tar.xz beside this script's copy: bin/ (the new
# build: kernels_cuda_indexer_test, pd_indexer_bench), old/ (main before round 9:
# pd_indexer_bench), optionally old9/ (run 2: run 1's build of round 9).
# Steps: the indexer GPU tests (all); the prefill sweep + kernel variants of
# the new build, then of the old build(s), then the sweeps again (same
# session, for the noise); compute-sanitizer memcheck + racecheck; Nsight
# Compute on MISA 64K and dense 32K (new build). Every step under a time
# limit, keeping going after a failure. Logs to $OUT.
# Usage (repo root): cp bench/kernels/sel9_run.sh .bundle/run.sh; bash .bundle/run.sh
set -u
OUT=${OUT:-$PWD/sel-out}; mkdir -p "$OUT"
exec > >(tee -a "$OUT/run.log") 2>&1
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd); B=/tmp/selb
rm -rf "$B" && mkdir -p "$B" && tar xJf "$HERE/bundle.tar.xz" -C "$B" || { echo "cannot unpack"; exit 1; }
export LD_LIBRARY_PATH="/usr/local/cuda/lib64${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export PATH=/usr/local/cuda/bin:$PATH
date -u
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,driver_version --format=csv,noheader || true
T0=$(date +%s); mkdir -p "$OUT/logs"
step() {  # step NAME TIMEOUT_S CMD...
  local name=$1 t=$2; shift 2
  echo "=== $name (at $(( $(date +%s) - T0 )) s)"
  local t1=$(date +%s)
  timeout -k 5 "$t" "$@" > "$OUT/logs/$name.log" 2>&1
  echo "=== $name rc=$? ($(( $(date +%s) - t1 )) s)"
}
step indexer_test 80 "$B/bin/kernels_cuda_indexer_test"
grep -E "^\[  FAILED|^\[==|Failure" "$OUT/logs/indexer_test.log" | head -30
step bench_new 50 "$B/bin/pd_indexer_bench" --prefill-only --experiments --json "$OUT/indexer_bench.json"
grep -vE "^\s*$" "$OUT/logs/bench_new.log" | head -60
step bench_old 50 "$B/old/pd_indexer_bench" --prefill-only --experiments --json "$OUT/indexer_bench_old.json"
grep -vE "^\s*$" "$OUT/logs/bench_old.log" | head -60
if [ -x "$B/old9/pd_indexer_bench" ]; then  # run 2: the run-1 build (atomic slots, old schedule)
  step bench_old9 50 "$B/old9/pd_indexer_bench" --prefill-only --experiments --json "$OUT/indexer_bench_old9.json"
  grep -E "experiment (dense|misa) .* v2  |prefill|causal|visible" "$OUT/logs/bench_old9.log" | head -30
fi
step bench_new2 30 "$B/bin/pd_indexer_bench" --prefill-only --json "$OUT/indexer_bench_2.json"
step bench_old2 30 "$B/old/pd_indexer_bench" --prefill-only --json "$OUT/indexer_bench_old_2.json"
grep -E "prefill|total" "$OUT/logs/bench_new2.log" | head -30
grep -E "prefill|total" "$OUT/logs/bench_old2.log" | head -30
if [ -x "$B/old9/pd_indexer_bench" ]; then
  step bench_old9_2 30 "$B/old9/pd_indexer_bench" --prefill-only --json "$OUT/indexer_bench_old9_2.json"
fi
if command -v compute-sanitizer > /dev/null; then
  step memcheck_seeded 40 compute-sanitizer --tool memcheck "$B/bin/kernels_cuda_indexer_test" SeededSmallTopk
  grep -E "ERROR SUMMARY|PASSED|FAILED|^\[==" "$OUT/logs/memcheck_seeded.log" | head -5
  step racecheck_seeded 50 compute-sanitizer --tool racecheck "$B/bin/kernels_cuda_indexer_test" SeededSmallTopk
  grep -E "RACECHECK SUMMARY|Hazard|ERROR SUMMARY|^\[==" "$OUT/logs/racecheck_seeded.log" | head -5
  step memcheck_claims 40 compute-sanitizer --tool memcheck "$B/bin/kernels_cuda_indexer_test" SlotClaims
  grep -E "ERROR SUMMARY|^\[==" "$OUT/logs/memcheck_claims.log" | head -5
  step racecheck_claims 60 compute-sanitizer --tool racecheck "$B/bin/kernels_cuda_indexer_test" SlotClaims
  grep -E "RACECHECK SUMMARY|Hazard|ERROR SUMMARY|^\[==" "$OUT/logs/racecheck_claims.log" | head -5
fi
if command -v ncu > /dev/null; then
  mkdir -p /tmp/ncu
  for c in "misa64k misa 65536" "dense32k dense 32768"; do
    set -- $c
    step ncu_$1 60 ncu --clock-control none --launch-skip 1 --launch-count 1 -k regex:SelectKernelV2 \
      --section SpeedOfLight --section WarpStateStats --section SchedulerStats --section SourceCounters \
      -f -o /tmp/ncu/$1 "$B/bin/pd_indexer_bench" --case $2 $3 8192 2 0
    ncu -i /tmp/ncu/$1.ncu-rep --page details > /tmp/ncu/$1.txt 2>&1
    ncu -i /tmp/ncu/$1.ncu-rep --page source --csv --print-source sass > /tmp/ncu/$1.src.csv 2>&1
    grep -E "Duration|Issued Warp|No Eligible|Warp Cycles Per Issued" /tmp/ncu/$1.txt | head -6
  done
  rm -f /tmp/ncu/*.ncu-rep; tar czf "$OUT/ncu.tgz" -C /tmp ncu
fi
tar czf "$OUT/logs.tgz" -C "$OUT" logs && rm -rf "$OUT/logs"
echo "total $(( $(date +%s) - T0 )) s"; date -u
