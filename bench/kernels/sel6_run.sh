#!/usr/bin/env bash
# Round 6 (branch sel-r6) device session, as run in run 2 (the PD_SELECT_NO_TMA build
# option it refers to was removed afterwards: the cp.async stages are the default now).
# Binaries built on the development
# machine, tarred into bundle.tar.xz beside this script's copy: bin/ (the new
# build: kernels_cuda_{indexer,plan}_test, kernels_cuda_model_test,
# model_gpu_model_test, pd_indexer_bench), binB/ (the same kernels built with
# PD_SELECT_NO_TMA: cp.async stages only; indexer test and bench), old/ (the
# previous build's pd_indexer_bench). Steps: SASS of the two main selection
# kernels; the TMA test alone under a short limit (a stuck pipeline wait traps
# after 2 s; if the test fails, binB runs everything after it); the GPU tests;
# the benchmark of the new build, then of the previous build (same session);
# Nsight Compute on MISA 64K (default and half tiles) and dense 32K;
# compute-sanitizer. Every step under a time limit, keeping going after a
# failure. Logs to $OUT. Usage (repo root): bash .selbundle/run.sh
set -u
OUT=${OUT:-$PWD/sel-out}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/run.log") 2>&1
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
B=/tmp/selb
rm -rf "$B" && mkdir -p "$B" && tar xJf "$HERE/bundle.tar.xz" -C "$B" || { echo "cannot unpack"; exit 1; }
export LD_LIBRARY_PATH="/usr/local/cuda/lib64${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export PATH=/usr/local/cuda/bin:$PATH
date -u
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm,driver_version --format=csv || true
T0=$(date +%s)
mkdir -p "$OUT/logs" /tmp/sass /tmp/ncu
step() {  # step NAME TIMEOUT_S CMD...
  local name=$1 t=$2; shift 2
  echo "=== $name (at $(( $(date +%s) - T0 )) s)"
  local t1=$(date +%s)
  timeout -k 5 "$t" "$@" > "/tmp/$name.log" 2>&1
  local rc=$?
  echo "=== $name rc=$rc ($(( $(date +%s) - t1 )) s)"
  echo "$rc" > "/tmp/$name.rc"
  cp "/tmp/$name.log" "$OUT/logs/" 2>/dev/null
}

# SASS of the main selection kernels (files for the next round).
if cuobjdump -sass "$B/bin/pd_indexer_bench" > /tmp/all.sass 2>/dev/null; then
  for f in SelectKernelV2ILi8ELi128ELb0ELi4096ELi3ELb0 SelectKernelV2ILi64ELi128ELb0ELi4096ELi3ELb0; do
    awk -v pat="$f" '$0 ~ "Function : .*"pat {p=1; print; next} p && /Function : /{p=0} p' /tmp/all.sass > /tmp/ncu/$f.sass
    echo "$f: $(grep -cE '^\s+/\*[0-9a-f]+\*/' /tmp/ncu/$f.sass) instructions, QGMMA $(grep -c QGMMA /tmp/ncu/$f.sass), R2UR $(grep -c R2UR /tmp/ncu/$f.sass), UTMALDG $(grep -c UTMALDG /tmp/ncu/$f.sass), LDL/STL $(grep -cE 'LDL|STL' /tmp/ncu/$f.sass)"
  done
fi

# The TMA test alone first.
step tma_test 60 "$B/bin/kernels_cuda_indexer_test" TmaStagesMatchCpAsyncStages
grep -E "^\[  FAILED|^\[==|^\[  PASSED|Failure|Expected|TMA vs|rror" /tmp/tma_test.log | head -30
BIN=$B/bin
if [ "$(cat /tmp/tma_test.rc)" != 0 ]; then
  echo "TMA test failed: the cp.async build (binB) from here on"
  BIN=$B/binB
fi
echo "BIN=$BIN"
step plan_test 60 "$B/bin/kernels_cuda_plan_test"; tail -2 /tmp/plan_test.log
step indexer_test 150 "$BIN/kernels_cuda_indexer_test"
grep -E "^\[  FAILED|^\[==|^\[  PASSED|Failure" /tmp/indexer_test.log | head -40
if [ "$BIN" = "$B/bin" ]; then
  step model_kernels_test 90 "$B/bin/kernels_cuda_model_test"; grep -E "^\[==|PASSED|FAILED" /tmp/model_kernels_test.log | tail -3
  step model_gpu_test 150 "$B/bin/model_gpu_model_test"; grep -E "^\[==|PASSED|FAILED" /tmp/model_gpu_test.log | tail -3
fi

# Benchmarks: the new build, then the previous build (same session).
step bench 150 "$BIN/pd_indexer_bench" --experiments --json "$OUT/indexer_bench.json"
cat /tmp/bench.log
step old_bench 100 "$B/old/pd_indexer_bench" --prefill-only --experiments --json "$OUT/indexer_bench_old.json"
cat /tmp/old_bench.log

# Nsight Compute: per-SASS-line counters.
if command -v ncu > /dev/null; then
  for c in "misa 65536 8192 2 0" "misa 65536 8192 2 1024" "dense 32768 8192 2 0"; do
    tag=$(echo $c | tr ' ' '_')
    step ncu_$tag 100 ncu --clock-control none --launch-skip 1 --launch-count 1 \
      -k regex:SelectKernelV2 --section SpeedOfLight --section WarpStateStats \
      --section SchedulerStats --section SourceCounters --section InstructionStats \
      -f -o /tmp/ncu/$tag "$BIN/pd_indexer_bench" --case $c
    ncu -i /tmp/ncu/$tag.ncu-rep --page details > /tmp/ncu/$tag.txt 2>&1
    ncu -i /tmp/ncu/$tag.ncu-rep --page source --csv --print-source sass > /tmp/ncu/$tag.src.csv 2>&1
    echo "--- $tag"; grep -E "Duration|Issued Warp|No Eligible|Warp Cycles Per Issued|Executed Instructions  " /tmp/ncu/$tag.txt | head -8
    rm -f /tmp/ncu/$tag.ncu-rep
  done
fi
tar czf "$OUT/ncu.tgz" -C /tmp ncu && ls -la "$OUT/ncu.tgz"

# compute-sanitizer on the pipeline (small cases).
if command -v compute-sanitizer > /dev/null; then
  step memcheck_tma 45 compute-sanitizer --tool memcheck "$BIN/kernels_cuda_indexer_test" SeededSmallTopk
  grep -E "ERROR SUMMARY|Invalid|PASSED|FAILED" /tmp/memcheck_tma.log | head -5
  step synccheck_seeded 30 compute-sanitizer --tool synccheck "$BIN/kernels_cuda_indexer_test" SeededSmallTopk
  grep -E "ERROR SUMMARY|PASSED|FAILED" /tmp/synccheck_seeded.log | head -5
  step racecheck_seeded 40 compute-sanitizer --tool racecheck "$BIN/kernels_cuda_indexer_test" SeededSmallTopk
  grep -E "RACECHECK SUMMARY|Hazard|ERROR SUMMARY|PASSED|FAILED" /tmp/racecheck_seeded.log | head -5
fi
tar czf "$OUT/logs.tgz" -C "$OUT" logs && rm -rf "$OUT/logs"
echo "total $(( $(date +%s) - T0 )) s"
date -u
