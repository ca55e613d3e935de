#!/usr/bin/env bash
# Round 7 (branch sel-r7) device session. Binaries built on the development
# machine, tarred into bundle.tar.xz beside this script's copy: bin/ (the new
# build: kernels_cuda_indexer_test, pd_indexer_bench), old/ (main before round 7:
# pd_indexer_bench). Steps: the indexer GPU tests (all); the prefill sweep +
# kernel variants of the new build, then of the old build, then both sweeps
# again (same session, for the noise); compute-sanitizer memcheck + racecheck;
# Nsight Compute on MISA 64K (new build). Every step under a time limit, keeping
# going after a failure. Logs to $OUT. Usage (repo root): bash .selbundle/run.sh
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
step bench_new2 30 "$B/bin/pd_indexer_bench" --prefill-only --json "$OUT/indexer_bench_2.json"
step bench_old2 30 "$B/old/pd_indexer_bench" --prefill-only --json "$OUT/indexer_bench_old_2.json"
grep -E "prefill|total" "$OUT/logs/bench_new2.log" | head -30
grep -E "prefill|total" "$OUT/logs/bench_old2.log" | head -30
if command -v compute-sanitizer > /dev/null; then
  step memcheck_seeded 40 compute-sanitizer --tool memcheck "$B/bin/kernels_cuda_indexer_test" SeededSmallTopk
  grep -E "ERROR SUMMARY|PASSED|FAILED|^\[==" "$OUT/logs/memcheck_seeded.log" | head -5
  step racecheck_seeded 50 compute-sanitizer --tool racecheck "$B/bin/kernels_cuda_indexer_test" SeededSmallTopk
  grep -E "RACECHECK SUMMARY|Hazard|ERROR SUMMARY|^\[==" "$OUT/logs/racecheck_seeded.log" | head -5
  step memcheck_final 40 compute-sanitizer --tool memcheck "$B/bin/kernels_cuda_indexer_test" FinalSelectionPerWarp
  grep -E "ERROR SUMMARY|^\[==" "$OUT/logs/memcheck_final.log" | head -5
fi
if command -v ncu > /dev/null; then
  mkdir -p /tmp/ncu
  step ncu_misa64k 40 ncu --clock-control none --launch-skip 1 --launch-count 1 -k regex:SelectKernelV2 \
    --section SpeedOfLight --section WarpStateStats --section SchedulerStats --section SourceCounters \
    -f -o /tmp/ncu/misa64k "$B/bin/pd_indexer_bench" --case misa 65536 8192 2 0
  ncu -i /tmp/ncu/misa64k.ncu-rep --page details > /tmp/ncu/misa64k.txt 2>&1
  ncu -i /tmp/ncu/misa64k.ncu-rep --page source --csv --print-source sass > /tmp/ncu/misa64k.src.csv 2>&1
  grep -E "Duration|Issued Warp|No Eligible|Warp Cycles Per Issued" /tmp/ncu/misa64k.txt | head -6
  rm -f /tmp/ncu/*.ncu-rep; tar czf "$OUT/ncu.tgz" -C /tmp ncu
fi
tar czf "$OUT/logs.tgz" -C "$OUT" logs && rm -rf "$OUT/logs"
echo "total $(( $(date +%s) - T0 )) s"; date -u
