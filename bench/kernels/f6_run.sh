#!/usr/bin/env bash
# Round 5 (branch f6-misa) device session: binaries built on the development
# machine (deploy/make_bundle.sh + the previous build's pd_indexer_bench in
# old/), tarred into .f6bundle/bundle.tar.xz beside this script's copy. Runs
# the GPU tests, the indexer benchmark (new build, then the previous build in
# the same session), Nsight Compute on one selection launch and
# compute-sanitizer on small cases; every step under a time limit, keeping
# going after a failure. Logs and JSON to $OUT. Usage (from the repo root):
#   [PHASE=1|2] bash .f6bundle/run.sh
set -u
OUT=${OUT:-$PWD/f6-out}
PHASE=${PHASE:-1}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/run.log") 2>&1
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
B=/tmp/f6b
rm -rf "$B" && mkdir -p "$B" && tar xJf "$HERE/bundle.tar.xz" -C "$B" || { echo "cannot unpack"; exit 1; }
export LD_LIBRARY_PATH="/usr/local/cuda/lib64${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
source "$B/env.sh"
export PATH=/usr/local/cuda/bin:$PATH
date
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm,driver_version --format=csv || true
T0=$(date +%s)
step() {  # step NAME TIMEOUT_S CMD...
  local name=$1 t=$2; shift 2
  echo "=== $name (at $(( $(date +%s) - T0 )) s)"
  local t1=$(date +%s)
  timeout -k 5 "$t" "$@" > "/tmp/$name.log" 2>&1
  local rc=$?
  echo "=== $name rc=$rc ($(( $(date +%s) - t1 )) s)"
}

# SASS of the main selection kernels (instruction counts; files for later).
mkdir -p /tmp/sass
if cuobjdump -sass "$B/bin/kernels_cuda_indexer_test" > /tmp/all.sass 2>/dev/null; then
  for f in SelectKernelV2ILi8ELi128ELb0ELi4096ELi3ELb0 SelectKernelV2ILi64ELi128ELb0ELi4096ELi3ELb0; do
    awk -v pat="$f" '$0 ~ "Function : .*"pat {p=1; print; next} p && /Function : /{p=0} p' /tmp/all.sass > /tmp/sass/$f.sass
    echo "$f: $(grep -cE '^\s+/\*[0-9a-f]+\*/' /tmp/sass/$f.sass) instructions, QGMMA $(grep -c QGMMA /tmp/sass/$f.sass), BAR $(grep -c 'BAR' /tmp/sass/$f.sass), LDL/STL $(grep -cE 'LDL|STL' /tmp/sass/$f.sass)"
  done
fi

# Tests.
step plan_test 60 "$B/bin/kernels_cuda_plan_test"; tail -2 /tmp/plan_test.log
step indexer_test 300 "$B/bin/kernels_cuda_indexer_test"
cp /tmp/indexer_test.log "$OUT/test_indexer.log"
grep -E "^\[  FAILED|^\[==|^\[  PASSED|Failure|swaps of" /tmp/indexer_test.log | head -60
step model_kernels_test 90 "$B/bin/kernels_cuda_model_test"; grep -E "^\[==|PASSED|FAILED" /tmp/model_kernels_test.log | tail -3
step model_gpu_test 150 "$B/bin/model_gpu_model_test"; grep -E "^\[==|PASSED|FAILED" /tmp/model_gpu_test.log | tail -3
if [ "$PHASE" = 2 ]; then
  step mla_test 150 "$B/bin/kernels_cuda_mla_test"; grep -E "^\[==|PASSED|FAILED" /tmp/mla_test.log | tail -3
fi
cat /tmp/model_kernels_test.log /tmp/model_gpu_test.log /tmp/mla_test.log > "$OUT/test_other.log" 2>/dev/null

# Benchmarks: the new build, then the previous build (same session).
BARGS="--experiments"
[ "$PHASE" = 1 ] && BARGS="--experiments --prefill-only"
step bench 300 "$B/bin/pd_indexer_bench" $BARGS --json "$OUT/indexer_bench.json"
cp /tmp/bench.log "$OUT/bench.log"; cat /tmp/bench.log
step old_bench 200 "$B/old/pd_indexer_bench" --prefill-only --json /tmp/old_bench.json
cat /tmp/old_bench.log; cat /tmp/old_bench.log >> "$OUT/bench.log"

# Nsight Compute: MISA 64K, per-SASS-line counters.
if command -v ncu > /dev/null; then
  mkdir -p /tmp/ncu
  for c in "misa 65536 8192"; do
    tag=$(echo $c | tr ' ' '_')
    step ncu_$tag 120 ncu --clock-control none --launch-skip 1 --launch-count 1 \
      -k regex:SelectKernelV2 --section SpeedOfLight --section WarpStateStats \
      --section SchedulerStats --section SourceCounters --section InstructionStats \
      -f -o /tmp/ncu/$tag "$B/bin/pd_indexer_bench" --case $c
    ncu -i /tmp/ncu/$tag.ncu-rep --page details > /tmp/ncu/$tag.txt 2>&1
    ncu -i /tmp/ncu/$tag.ncu-rep --page source --csv --print-source sass > /tmp/ncu/$tag.src.csv 2>&1
    grep -E "Duration|Issued Ipc|No Eligible|Warp Cycles Per Issued|Executed Instructions" /tmp/ncu/$tag.txt | head -12
    rm -f /tmp/ncu/$tag.ncu-rep
  done
  cp /tmp/sass/*.sass /tmp/ncu/ 2>/dev/null
  tar czf "$OUT/ncu.tgz" -C /tmp ncu && ls -la "$OUT/ncu.tgz"
fi

# compute-sanitizer on the new paths (small cases).
if command -v compute-sanitizer > /dev/null; then
  step memcheck_seeded 90 compute-sanitizer --tool memcheck "$B/bin/kernels_cuda_indexer_test" SeededSmallTopk
  grep -E "ERROR SUMMARY|Invalid|PASSED|FAILED" /tmp/memcheck_seeded.log | head -5
  step racecheck_seeded 90 compute-sanitizer --tool racecheck "$B/bin/kernels_cuda_indexer_test" SeededSmallTopk
  grep -E "RACECHECK SUMMARY|Hazard|ERROR SUMMARY|PASSED|FAILED" /tmp/racecheck_seeded.log | head -5
  step memcheck_barriers 90 compute-sanitizer --tool memcheck "$B/bin/kernels_cuda_indexer_test" BarrierSchedules
  grep -E "ERROR SUMMARY|Invalid|PASSED|FAILED" /tmp/memcheck_barriers.log | head -5
  step racecheck_barriers 90 compute-sanitizer --tool racecheck "$B/bin/kernels_cuda_indexer_test" BarrierSchedules
  grep -E "RACECHECK SUMMARY|Hazard|ERROR SUMMARY|PASSED|FAILED" /tmp/racecheck_barriers.log | head -5
fi
echo "total $(( $(date +%s) - T0 )) s"
date
