#!/usr/bin/env bash
# Round 6 (branch sel-r6) device session: binaries built on the development
# machine (kernels-only build: kernels_cuda_{indexer,plan}_test,
# kernels_cuda_model_test, pd_indexer_bench; the previous build's
# pd_indexer_bench in old/), tarred into bundle.tar.xz beside this script's
# copy. SASS of the two main selection kernels, the GPU tests (the new TMA
# test first, under a short limit: a hang there shortens the rest), the
# benchmark of the new build and then of the previous build (same session),
# Nsight Compute on MISA 64K (default and half tiles) and dense 32K,
# compute-sanitizer on the TMA test. Every step under a time limit, keeping
# going after a failure. Logs to $OUT. Usage (repo root): bash .selbundle/run.sh
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
step() {  # step NAME TIMEOUT_S CMD...
  local name=$1 t=$2; shift 2
  echo "=== $name (at $(( $(date +%s) - T0 )) s)"
  local t1=$(date +%s)
  timeout -k 5 "$t" "$@" > "/tmp/$name.log" 2>&1
  local rc=$?
  echo "=== $name rc=$rc ($(( $(date +%s) - t1 )) s)"
  cp "/tmp/$name.log" "$OUT/logs/" 2>/dev/null
}
mkdir -p "$OUT/logs" /tmp/sass

# SASS of the main selection kernels (files for the next round).
if cuobjdump -sass "$B/bin/pd_indexer_bench" > /tmp/all.sass 2>/dev/null; then
  for f in SelectKernelV2ILi8ELi128ELb0ELi4096ELi3ELb0 SelectKernelV2ILi64ELi128ELb0ELi4096ELi3ELb0; do
    awk -v pat="$f" '$0 ~ "Function : .*"pat {p=1; print; next} p && /Function : /{p=0} p' /tmp/all.sass > /tmp/sass/$f.sass
    echo "$f: $(grep -cE '^\s+/\*[0-9a-f]+\*/' /tmp/sass/$f.sass) instructions, QGMMA $(grep -c QGMMA /tmp/sass/$f.sass), R2UR $(grep -c R2UR /tmp/sass/$f.sass), UTMALDG $(grep -c UTMALDG /tmp/sass/$f.sass), LDL/STL $(grep -cE 'LDL|STL' /tmp/sass/$f.sass)"
  done
fi

# Tests: the TMA test alone first (short limit), then everything.
step tma_test 60 "$B/bin/kernels_cuda_indexer_test" TmaStagesMatchCpAsyncStages
rc_tma=$(grep -oE "tma_test rc=[0-9]+" "$OUT/run.log" | tail -1 | cut -d= -f2)
grep -E "^\[  FAILED|^\[==|^\[  PASSED|Failure|Expected|TMA vs|swaps of" /tmp/tma_test.log | head -30
if [ "${rc_tma:-0}" -ge 124 ]; then
  echo "TMA test hung: only the cp.async variant and the old build"
  step bench_cpasync 60 "$B/bin/pd_indexer_bench" --case misa 65536 8192 2 512
  step old_bench 100 "$B/old/pd_indexer_bench" --prefill-only --json "$OUT/indexer_bench_old.json"
  cat /tmp/old_bench.log
  tar czf "$OUT/logs.tgz" -C "$OUT" logs
  exit 0
fi
step plan_test 60 "$B/bin/kernels_cuda_plan_test"; tail -2 /tmp/plan_test.log
step indexer_test 150 "$B/bin/kernels_cuda_indexer_test"
grep -E "^\[  FAILED|^\[==|^\[  PASSED|Failure|swaps of" /tmp/indexer_test.log | grep -v "swaps of" | head -40
step model_kernels_test 90 "$B/bin/kernels_cuda_model_test"; grep -E "^\[==|PASSED|FAILED" /tmp/model_kernels_test.log | tail -3

# Benchmarks: the new build, then the previous build (same session).
step bench 150 "$B/bin/pd_indexer_bench" --experiments --json "$OUT/indexer_bench.json"
cat /tmp/bench.log
step old_bench 100 "$B/old/pd_indexer_bench" --prefill-only --experiments --json "$OUT/indexer_bench_old.json"
cat /tmp/old_bench.log

# Nsight Compute: per-SASS-line counters.
if command -v ncu > /dev/null; then
  mkdir -p /tmp/ncu
  for c in "misa 65536 8192 2 0" "misa 65536 8192 2 1024" "dense 32768 8192 2 0"; do
    tag=$(echo $c | tr ' ' '_')
    step ncu_$tag 100 ncu --clock-control none --launch-skip 1 --launch-count 1 \
      -k regex:SelectKernelV2 --section SpeedOfLight --section WarpStateStats \
      --section SchedulerStats --section SourceCounters --section InstructionStats \
      -f -o /tmp/ncu/$tag "$B/bin/pd_indexer_bench" --case $c
    ncu -i /tmp/ncu/$tag.ncu-rep --page details > /tmp/ncu/$tag.txt 2>&1
    ncu -i /tmp/ncu/$tag.ncu-rep --page source --csv --print-source sass > /tmp/ncu/$tag.src.csv 2>&1
    echo "--- $tag"; grep -E "Duration|Issued Warp|No Eligible|Warp Cycles Per Issued|Executed Instructions  " /tmp/ncu/$tag.txt | head -8
    rm -f /tmp/ncu/$tag.ncu-rep
  done
  cp /tmp/sass/*.sass /tmp/ncu/ 2>/dev/null
  tar czf "$OUT/ncu.tgz" -C /tmp ncu && ls -la "$OUT/ncu.tgz"
fi

# compute-sanitizer on the TMA pipeline (small cases).
if command -v compute-sanitizer > /dev/null; then
  step memcheck_tma 60 compute-sanitizer --tool memcheck "$B/bin/kernels_cuda_indexer_test" TmaStagesMatchCpAsyncStages
  grep -E "ERROR SUMMARY|Invalid|PASSED|FAILED" /tmp/memcheck_tma.log | head -5
  step synccheck_tma 40 compute-sanitizer --tool synccheck "$B/bin/kernels_cuda_indexer_test" SeededSmallTopk
  grep -E "ERROR SUMMARY|PASSED|FAILED" /tmp/synccheck_tma.log | head -5
fi
tar czf "$OUT/logs.tgz" -C "$OUT" logs && rm -rf "$OUT/logs"
echo "total $(( $(date +%s) - T0 )) s"
date -u
