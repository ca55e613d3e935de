#!/usr/bin/env bash
# One GPU-host session for the sparse MLA kernels (issue #3, kernels/cuda/mla*.cu):
# the GPU tests against the CPU reference (by group, each with a time limit), a
# SASS summary of the attention kernels, the benchmark (decode and prefill,
# every variant; the schedule variants in a second call) and, when a test
# fails or SAN=1, compute-sanitizer on a small case. Binaries: prebuilt ones
# from $BIN (default .f5a-bin: kernels_cuda_mla_test, pd_mla_bench, built on
# the development machine and carried) when they start here, else these two
# targets built with the kernels-only configure. Every step keeps going after
# a failure; logs and JSON go to $OUT (default ./gpu-out). Usage:
#   [BIN=dir] [SAN=1] bash bench/kernels/mla_gpu_run.sh
set -x
OUT=${OUT:-$PWD/gpu-out}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/mla_run.log") 2>&1
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
BIN=${BIN:-.f5a-bin}
date
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm,driver_version --format=csv || true

# 1. Binaries.
T_MLA=$BIN/kernels_cuda_mla_test
B_MLA=$BIN/pd_mla_bench
if [ -x "$T_MLA" ] && [ -x "$B_MLA" ] && timeout 60 "$T_MLA" Rejects > /tmp/prebuilt.log 2>&1; then
  echo "using prebuilt binaries from $BIN"
else
  cat /tmp/prebuilt.log 2>/dev/null | tail -5
  BUILD=build-gpu
  cmake -S . -B $BUILD -G Ninja -DPD_KERNELS_ONLY=ON -DCMAKE_BUILD_TYPE=Release > /tmp/cmake.log 2>&1 \
    || tail -30 /tmp/cmake.log
  time cmake --build $BUILD -j16 --target kernels_cuda_mla_test pd_mla_bench > /tmp/build.log 2>&1 \
    || tail -60 /tmp/build.log
  T_MLA=$BUILD/kernels/cuda/kernels_cuda_mla_test
  B_MLA=$BUILD/bench/kernels/pd_mla_bench
fi

# 2. SASS of the attention kernels: tensor-core instructions, local memory, barriers.
if cuobjdump -sass "$T_MLA" > /tmp/mla.sass 2>/dev/null; then
  awk '/Function : /{name=$3} name!="" {print name "\t" $0}' /tmp/mla.sass > /tmp/mla.tagged
  for k in SparseMlaWgmmaKernelILi0ELb0ELb0ELb0ELb0 SparseMlaWgmmaKernelILi0ELb0ELb0ELb0ELb1 SparseMlaWgmmaKernelILi0ELb0ELb1ELb1ELb0 SparseMlaKernel; do
    grep "$k" /tmp/mla.tagged > /tmp/k.sass
    echo "$k: $(grep -cE '^\S+\s+/\*[0-9a-f]+\*/' /tmp/k.sass) instructions, HGMMA $(grep -c HGMMA /tmp/k.sass)," \
      "HMMA $(grep -c 'HMMA' /tmp/k.sass), LDL/STL $(grep -cE 'LDL|STL' /tmp/k.sass)," \
      "WARPGROUP.DEPBAR $(grep -c 'WARPGROUP.DEPBAR' /tmp/k.sass), SYNCS $(grep -c 'SYNCS' /tmp/k.sass)," \
      "BAR $(grep -cE ' BAR\.' /tmp/k.sass), USETMAXREG $(grep -c USETMAXREG /tmp/k.sass)"
  done
  grep SparseMlaWgmmaKernelILi0ELb0ELb0ELb0ELb0 /tmp/mla.tagged | grep -E "HGMMA" | head -3
fi

# 3. Tests, one group at a time with its own time limit (a hang in one group
# costs only its limit and names itself; the summary says which).
trc=0
: > "$OUT/mla_test.log"
for f in CacheWrite SparseAttentionMatchesCpu WgmmaHeadsAndEdges SingleToken Upconvert \
         Bf16Rows WgmmaSchedules Rejects; do
  timeout -k 5 ${TEST_S:-60} "$T_MLA" "$f" >> "$OUT/mla_test.log" 2>&1
  rc=$?
  echo "mla test $f rc=$rc"
  [ $rc -ne 0 ] && trc=$rc
done
grep -E "^\[  FAILED|^\[       OK|Failure|relative L2|single-token|mismatch|expected" "$OUT/mla_test.log" | head -80
if [ $trc -ne 0 ] || [ -n "${SAN:-}" ]; then
  if command -v compute-sanitizer > /dev/null; then
    timeout -k 5 ${SAN_S:-45} compute-sanitizer --tool memcheck "$T_MLA" SingleToken > /tmp/san1.log 2>&1
    echo "memcheck rc=$?"; grep -E "ERROR SUMMARY|Invalid|Error" /tmp/san1.log | head -8
    timeout -k 5 ${SAN_S:-45} compute-sanitizer --tool synccheck "$T_MLA" SingleToken > /tmp/san2.log 2>&1
    echo "synccheck rc=$?"; grep -E "ERROR SUMMARY|Barrier|Error" /tmp/san2.log | head -8
  fi
fi

# 4. Benchmark: the default kernel, the first kernel and the bf16-rows prefill
# first; then the schedule variants (a hanging variant loses only that call).
timeout -k 5 ${BENCH_S:-120} "$B_MLA" --json "$OUT/mla_bench.json" \
  --variants wgmma,mma.sync,wgmma-bf16-rows,wgmma-no-producer,wgmma-no-consumer,cache-write \
  > "$OUT/mla_bench.log" 2>&1
echo "mla bench rc=$?"
timeout -k 5 ${BENCH_S:-120} "$B_MLA" --json "$OUT/mla_bench_schedules.json" \
  --variants wgmma-plain,wgmma-late,wgmma-prefetch,wgmma-named,wgmma-named-prefetch,wgmma-named-pf-late,named-pf-no-producer,named-pf-no-consumer \
  >> "$OUT/mla_bench.log" 2>&1
echo "mla bench (schedules) rc=$?"
cat "$OUT/mla_bench.log"
date
