#!/usr/bin/env bash
# One GPU-host session for the Hopper kernels: binaries (prebuilt in $BIN when
# given and runnable there, else built with the kernels-only configure), the
# resource report and SASS check, the GPU tests, the benchmarks and their
# plots, compute-sanitizer on small cases. Every step keeps going after a
# failure; logs, JSON and PNGs go to $OUT (default ./gpu-out; at most 8 files
# come back from the device tool). Usage:
#   [BIN=dir] [OLD_BIN=dir] [NCU=1] [NCU_CASES="misa 65536 8192 2;..."] [SAN=1]
#   bench/kernels/gpu_run.sh [quick]
# OLD_BIN: a previous build's pd_indexer_bench, run after the new one in the
# same session (--prefill-only) for a same-machine before/after; its output is
# appended to bench.log.
set -x
OUT=${OUT:-$PWD/gpu-out}
mkdir -p "$OUT"
MODE=${1:-full}
BUILD=build-gpu
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
exec > >(tee -a "$OUT/run.log") 2>&1
date
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm,driver_version --format=csv || true
nproc

# 1. Binaries: prebuilt ones when they start here, else build.
T_PLAN=$BUILD/kernels/cuda/kernels_cuda_plan_test
T_IDX=$BUILD/kernels/cuda/kernels_cuda_indexer_test
T_MLA=$BUILD/kernels/cuda/kernels_cuda_mla_test
B_IDX=$BUILD/bench/kernels/pd_indexer_bench
B_MLA=$BUILD/bench/kernels/pd_mla_bench
if [ -n "${BIN:-}" ] && "$BIN/kernels_cuda_plan_test" > /tmp/prebuilt.log 2>&1; then
  echo "using prebuilt binaries from $BIN"
  T_PLAN=$BIN/kernels_cuda_plan_test; T_IDX=$BIN/kernels_cuda_indexer_test
  T_MLA=$BIN/kernels_cuda_mla_test; B_IDX=$BIN/pd_indexer_bench; B_MLA=$BIN/pd_mla_bench
else
  tail -5 /tmp/prebuilt.log 2>/dev/null
  SRC=.
  if ! cmake -S . -B $BUILD -G Ninja -DPD_KERNELS_ONLY=ON -DCMAKE_BUILD_TYPE=Release > /tmp/cmake.log 2>&1; then
    # Another component's CMake may be mid-edit: build this one from a copy without it.
    tail -20 /tmp/cmake.log
    rm -rf /tmp/src && mkdir -p /tmp/src && cp -r CMakeLists.txt cmake kernels bench /tmp/src/
    sed -i '/add_subdirectory(model)/d' /tmp/src/kernels/cuda/CMakeLists.txt
    SRC=/tmp/src
    cmake -S $SRC -B $BUILD -G Ninja -DPD_KERNELS_ONLY=ON -DCMAKE_BUILD_TYPE=Release > /tmp/cmake.log 2>&1 \
      || tail -30 /tmp/cmake.log
  fi
  time cmake --build $BUILD -j16 --target kernels_cuda_plan_test kernels_cuda_indexer_test \
    kernels_cuda_mla_test pd_indexer_bench pd_mla_bench > /tmp/build.log 2>&1 || tail -60 /tmp/build.log
  grep -E "error|warning" /tmp/build.log | head -20
fi

# 2. SASS: the version-2 selection kernels must show QGMMA and no serialisation.
cuobjdump -sass "$T_IDX" > /tmp/idx.sass 2>/dev/null && {
  echo "QGMMA: $(grep -c QGMMA /tmp/idx.sass)  WARPGROUP.ARRIVE: $(grep -c 'WARPGROUP.ARRIVE' /tmp/idx.sass)  WARPGROUP.DEPBAR: $(grep -c 'WARPGROUP.DEPBAR' /tmp/idx.sass)  LDL/STL: $(grep -cE 'LDL|STL' /tmp/idx.sass)"
  awk '/Function : .*SelectKernelV2ILi8ELi128ELb0ELi4096ELi3ELb0/{f=1} f&&/Function : /&&!/SelectKernelV2ILi8ELi128ELb0ELi4096ELi3ELb0/{f=0} f' /tmp/idx.sass > /tmp/v2g8.sass
  echo "v2 G=8 contiguous: $(grep -cE '^\s+/\*[0-9a-f]+\*/' /tmp/v2g8.sass) instructions, QGMMA $(grep -c QGMMA /tmp/v2g8.sass), DEPBAR $(grep -c 'WARPGROUP.DEPBAR' /tmp/v2g8.sass), BAR.SYNC $(grep -c 'BAR.SYNC' /tmp/v2g8.sass)"
}

# 3. Tests (CPU plan test + GPU tests against the CPU reference).
timeout -k 5 60 "$T_PLAN" > /tmp/test_plan.log 2>&1; echo "plan test rc=$?"
tail -1 /tmp/test_plan.log
timeout -k 5 ${TEST_S:-200} "$T_IDX" > "$OUT/test_gpu.log" 2>&1; echo "gpu test rc=$?"
timeout -k 5 ${TEST_S:-200} "$T_MLA" >> "$OUT/test_gpu.log" 2>&1; echo "mla test rc=$?"
# The model's GPU engine launches these selection kernels too (its own test).
if [ -n "${BIN:-}" ] && [ -x "$BIN/kernels_cuda_model_test" ]; then
  timeout -k 5 ${TEST_S:-200} "$BIN/kernels_cuda_model_test" >> "$OUT/test_gpu.log" 2>&1
  echo "model kernels test rc=$?"
fi
grep -E "^\[  FAILED|^\[==|Failure|error|swaps|differences|prep:" "$OUT/test_gpu.log" | head -80

# 4. Benchmarks and plots.
if [ "$MODE" = quick ]; then BARGS=--quick; else BARGS=; fi
timeout -k 5 ${BENCH_S:-300} "$B_IDX" $BARGS ${BENCH_ARGS:-} --json "$OUT/indexer_bench.json" \
  > "$OUT/bench.log" 2>&1; echo "bench rc=$?"
if [ -z "${SKIP_MLA:-}" ]; then
  timeout -k 5 ${BENCH_S:-300} "$B_MLA" --json "$OUT/mla_bench.json" >> "$OUT/bench.log" 2>&1
  echo "mla bench rc=$?"
fi
if [ -n "${OLD_BIN:-}" ] && [ -x "$OLD_BIN/pd_indexer_bench" ]; then
  echo "== previous build ($OLD_BIN), same session ==" >> "$OUT/bench.log"
  timeout -k 5 ${BENCH_S:-300} "$OLD_BIN/pd_indexer_bench" --prefill-only ${OLD_ARGS:-} \
    --json /tmp/old_bench.json >> "$OUT/bench.log" 2>&1
  echo "old bench rc=$?"
fi
cat "$OUT/bench.log"
python3 bench/kernels/plot_bench.py "$OUT/indexer_bench.json" "$OUT" 2>&1 | tail -5

# 4b. Nsight Compute on selection launches (stall reasons, per-SASS-line
# counters exported as CSV), and the SASS of the main kernels, into ncu.tgz.
if [ -n "${NCU:-}" ] && command -v ncu >/dev/null; then
  mkdir -p /tmp/ncu
  IFS=';' read -ra CASES <<< "${NCU_CASES:-misa 65536 8192 2;dense 32768 8192 2}"
  for c in "${CASES[@]}"; do
    tag=$(echo $c | tr ' ' '_')
    timeout -k 5 ${NCU_S:-120} ncu --clock-control none --launch-skip 1 --launch-count 1 \
      -k regex:SelectKernel --section SpeedOfLight --section WarpStateStats \
      --section SchedulerStats --section Occupancy --section LaunchStats --section SourceCounters \
      --section InstructionStats --section MemoryWorkloadAnalysis -f -o /tmp/ncu/$tag \
      "$B_IDX" --case $c > /tmp/ncu/$tag.log 2>&1
    echo "ncu $c rc=$?"
    ncu -i /tmp/ncu/$tag.ncu-rep --page details > /tmp/ncu/$tag.txt 2>&1
    ncu -i /tmp/ncu/$tag.ncu-rep --page source --csv --print-source sass > /tmp/ncu/$tag.src.csv 2>&1
    grep -E "Duration|Issued Ipc|No Eligible|Warp Cycles Per Issued|Executed Instructions|Stall" /tmp/ncu/$tag.txt | head -24
    rm -f /tmp/ncu/$tag.ncu-rep
  done
  cuobjdump -sass "$T_IDX" > /tmp/all.sass 2>/dev/null
  for f in SelectKernelV2ILi8ELi128ELb0ELi4096ELi3ELb0 SelectKernelV2ILi64ELi128ELb0ELi4096ELi3ELb0; do
    awk -v pat="$f" '$0 ~ "Function : .*"pat {p=1; print; next} p && /Function : /{p=0} p' /tmp/all.sass > /tmp/ncu/$f.sass
  done
  tar czf "$OUT/ncu.tgz" -C /tmp ncu && ls -la "$OUT/ncu.tgz"
fi

# 5. compute-sanitizer on small cases (bounds, shared-memory races).
if [ -n "${SAN:-}" ] && command -v compute-sanitizer >/dev/null; then
  timeout -k 5 ${SAN_S:-60} compute-sanitizer --tool memcheck "$T_IDX" Decode > /tmp/san1.log 2>&1
  echo "memcheck rc=$?"; grep -E "ERROR SUMMARY|Invalid" /tmp/san1.log | head -5
  timeout -k 5 ${SAN_S:-60} compute-sanitizer --tool racecheck "$T_IDX" MisaDecodeBatch > /tmp/san2.log 2>&1
  echo "racecheck rc=$?"; grep -E "RACECHECK SUMMARY|Hazard|ERROR SUMMARY" /tmp/san2.log | head -5
  timeout -k 5 ${SAN_S:-60} compute-sanitizer --tool memcheck "$T_IDX" HisaBlocksPrecomputed > /tmp/san3.log 2>&1
  echo "memcheck hisa rc=$?"; grep -E "ERROR SUMMARY|Invalid" /tmp/san3.log | head -5
  timeout -k 5 ${SAN_S:-60} compute-sanitizer --tool memcheck "$T_IDX" PerQueryKeyLists > /tmp/san4.log 2>&1
  echo "memcheck per-query lists rc=$?"; grep -E "ERROR SUMMARY|Invalid" /tmp/san4.log | head -5
  # Seeded thresholds: the sample pass, the seed, the exact rescan.
  timeout -k 5 ${SAN_S:-60} compute-sanitizer --tool memcheck "$T_IDX" SeededSmallTopk > /tmp/san5.log 2>&1
  echo "memcheck seeded rc=$?"; grep -E "ERROR SUMMARY|Invalid" /tmp/san5.log | head -5
  timeout -k 5 ${SAN_S:-60} compute-sanitizer --tool memcheck "$T_IDX" SlotLoopVariant > /tmp/san9.log 2>&1
  echo "memcheck slot loops rc=$?"; grep -E "ERROR SUMMARY|Invalid" /tmp/san9.log | head -5
  timeout -k 5 ${SAN_S:-60} compute-sanitizer --tool memcheck "$T_IDX" ManyQueriesPerCta > /tmp/san7.log 2>&1
  echo "memcheck router rc=$?"; grep -E "ERROR SUMMARY|Invalid" /tmp/san7.log | head -5
  timeout -k 5 ${SAN_S:-60} compute-sanitizer --tool racecheck "$T_IDX" ManyQueriesPerCta > /tmp/san8.log 2>&1
  echo "racecheck router rc=$?"; grep -E "RACECHECK SUMMARY|Hazard|ERROR SUMMARY" /tmp/san8.log | head -5
  timeout -k 5 ${SAN_S:-60} compute-sanitizer --tool racecheck "$T_IDX" SeededSmallTopk > /tmp/san6.log 2>&1
  echo "racecheck seeded rc=$?"; grep -E "RACECHECK SUMMARY|Hazard|ERROR SUMMARY" /tmp/san6.log | head -5
fi
date
