#!/usr/bin/env bash
# One GPU-host session for the Hopper kernels: build (kernels-only configure),
# check the SASS for wgmma, run the GPU tests, run the benchmarks, run the
# memory/race checkers on small cases. Every step keeps going after a failure;
# logs and JSON go to $OUT (default ./gpu-out; at most 8 files come back). Usage: bench/kernels/gpu_run.sh [quick]
set -x
OUT=${OUT:-$PWD/gpu-out}
mkdir -p "$OUT"
MODE=${1:-full}
BUILD=build-gpu
exec > >(tee -a "$OUT/run.log") 2>&1
date
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm,driver_version --format=csv || true
nproc

# 1. Build.
cmake -S . -B $BUILD -G Ninja -DPD_KERNELS_ONLY=ON -DCMAKE_BUILD_TYPE=Release > /tmp/cmake.log 2>&1 \
  || tail -30 /tmp/cmake.log
time cmake --build $BUILD -j16 --target kernels_cuda_plan_test kernels_cuda_indexer_test \
  kernels_cuda_mla_test pd_indexer_bench pd_mla_bench > /tmp/build.log 2>&1 || tail -60 /tmp/build.log
grep -E "error|warning" /tmp/build.log | head -20

# 2. Resource report and SASS: the wgmma kernels must show QGMMA and no spills.
nvcc -std=c++17 -I. -gencode=arch=compute_90a,code=sm_90a --expt-relaxed-constexpr -O3 \
  -Xptxas -v -c kernels/cuda/select_g64.cu -o /tmp/g64.o 2>&1 | grep -E "Compiling|registers|spill" \
  | sed 's/_ZN2pd7kernels4cuda15select_internal12//' | tee "$OUT/ptxas.txt"
cuobjdump -sass /tmp/g64.o > /tmp/g64.sass 2>/dev/null && \
  echo "QGMMA instructions: $(grep -c QGMMA /tmp/g64.sass), HMMA: $(grep -c HMMA /tmp/g64.sass)" | tee -a "$OUT/ptxas.txt"

# 3. Tests (CPU plan test + GPU tests against the CPU reference).
timeout -k 5 60 $BUILD/kernels/cuda/kernels_cuda_plan_test > /tmp/test_plan.log 2>&1; echo "plan test rc=$?"
tail -3 /tmp/test_plan.log
timeout -k 5 ${TEST_S:-150} $BUILD/kernels/cuda/kernels_cuda_indexer_test > "$OUT/test_gpu.log" 2>&1; echo "gpu test rc=$?"
timeout -k 5 ${TEST_S:-150} $BUILD/kernels/cuda/kernels_cuda_mla_test >> "$OUT/test_gpu.log" 2>&1; echo "mla test rc=$?"
grep -E "^\[|Failure|error" "$OUT/test_gpu.log" | head -80

# 4. Benchmarks.
if [ "$MODE" = quick ]; then BARGS=--quick; else BARGS=; fi
timeout -k 5 ${BENCH_S:-240} $BUILD/bench/kernels/pd_indexer_bench $BARGS --json "$OUT/indexer_bench.json" \
  > "$OUT/bench.log" 2>&1; echo "bench rc=$?"
timeout -k 5 ${BENCH_S:-240} $BUILD/bench/kernels/pd_mla_bench --json "$OUT/mla_bench.json" \
  >> "$OUT/bench.log" 2>&1; echo "mla bench rc=$?"
cat "$OUT/bench.log"

# 4b. Nsight Compute on one dense and one MISA selection launch (stall reasons).
if [ -n "${NCU:-}" ] && command -v ncu >/dev/null; then
  for c in "dense 32768 8192" "misa 65536 8192"; do
    timeout -k 5 ${NCU_S:-90} ncu --clock-control none --launch-skip 1 --launch-count 1 \
      -k regex:SelectKernel --section SpeedOfLight --section WarpStateStats \
      --section SchedulerStats --section Occupancy --section LaunchStats \
      --section MemoryWorkloadAnalysis --section ComputeWorkloadAnalysis \
      $BUILD/bench/kernels/pd_indexer_bench --case $c >> "$OUT/ncu.txt" 2>&1
    echo "ncu $c rc=$?"
  done
  grep -E "Duration|Throughput|Issued Ipc|Stall|Warp Cycles|Achieved Occupancy|Registers|No Eligible|Active Warps" \
    "$OUT/ncu.txt" | head -60
fi

# 5. compute-sanitizer on small cases (bounds, shared-memory races).
if command -v compute-sanitizer >/dev/null; then
  timeout -k 5 ${SAN_S:-60} compute-sanitizer --tool memcheck $BUILD/kernels/cuda/kernels_cuda_indexer_test Decode \
    > "$OUT/sanitizer.log" 2>&1; echo "memcheck rc=$?"
  timeout -k 5 ${SAN_S:-60} compute-sanitizer --tool racecheck $BUILD/kernels/cuda/kernels_cuda_indexer_test MisaDecode \
    >> "$OUT/sanitizer.log" 2>&1; echo "racecheck rc=$?"
  timeout -k 5 ${SAN_S:-60} compute-sanitizer --tool memcheck $BUILD/kernels/cuda/kernels_cuda_mla_test \
    >> "$OUT/sanitizer.log" 2>&1; echo "mla memcheck rc=$?"
  grep -E "ERROR SUMMARY|RACECHECK SUMMARY|Invalid|Hazard" "$OUT/sanitizer.log" | head -20
fi
date
