#!/usr/bin/env bash
# One GPU-host session for the sparse MLA kernels (issue #3, kernels/cuda/mla*.cu),
# sized for about 90 s: the benchmark of the measured kernels first (default
# wgmma, the named-barrier schedules, the bf16-rows prefill, mma.sync, the
# timing-only variants, the cache write), then the GPU tests against the CPU
# reference (one group per process, each under its own time limit; the
# cluster-of-2 kernel, kWgmmaPair, is first exercised by WgmmaPairHeadsAndEdges:
# if that group hangs, the later groups get short limits), then the benchmark of
# the cluster-of-2 kernel (and its agreement with kWgmma), and, when
# $BIN/old/pd_mla_bench exists, the previous build's default kernel for an A/B.
# Binaries: $BIN (default .g1bundle: kernels_cuda_mla_test, pd_mla_bench built
# on the development machine, stripped; they need only libcudart). Every step
# keeps going after a failure; steps are skipped once $BUDGET_S (default 85)
# seconds have passed. Logs and JSON go to $OUT (default ./gpu-out):
# mla_run.log, mla_bench.json, mla_bench_pair.json, mla_bench_old.json. Usage:
#   [BIN=dir] [OUT=dir] bash bench/kernels/mla_gpu_run.sh
set -x
OUT=${OUT:-$PWD/gpu-out}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/mla_run.log") 2>&1
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
BIN=${BIN:-.g1bundle}
BUDGET_S=${BUDGET_S:-85}
T_MLA=$BIN/kernels_cuda_mla_test
B_MLA=$BIN/pd_mla_bench
date -u
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm,driver_version --format=csv || true
left() { [ "$SECONDS" -lt "$BUDGET_S" ] || { echo "SKIPPED (budget): $*"; return 1; }; }

# 1. The measured kernels and the paths never benchmarked (named schedules, bf16 rows).
left bench1 && timeout -k 3 ${BENCH1_S:-30} "$B_MLA" --json "$OUT/mla_bench.json" \
  --variants wgmma,wgmma-no-producer,wgmma-no-consumer,wgmma-named,wgmma-named-prefetch,wgmma-bf16-rows,mma.sync,cache-write
echo "bench1 rc=$? at ${SECONDS}s"

# 2. Tests.
pair_hung=0
for f in Rejects CacheWrite Upconvert WgmmaPairHeadsAndEdges SparseAttentionMatchesCpu \
         WgmmaHeadsAndEdges SingleToken Bf16Rows WgmmaSchedules; do
  left "test $f" || continue
  lim=${TEST_S:-15}
  [ $pair_hung -eq 1 ] && lim=6
  timeout -k 2 $lim "$T_MLA" "$f"
  rc=$?
  echo "mla test $f rc=$rc at ${SECONDS}s"
  if [ "$f" = WgmmaPairHeadsAndEdges ] && [ $rc -ge 124 ]; then pair_hung=1; fi
done

# 3. The cluster-of-2 kernel (skipped if its first test hung).
if [ $pair_hung -eq 0 ] && left bench2; then
  timeout -k 3 ${BENCH2_S:-20} "$B_MLA" --json "$OUT/mla_bench_pair.json" \
    --variants wgmma,wgmma-pair,pair-no-producer,pair-no-consumer
  echo "bench2 rc=$? at ${SECONDS}s"
fi

# 4. A/B: the previous build's default kernel.
if [ -x "$BIN/old/pd_mla_bench" ] && left bench-old; then
  timeout -k 3 ${BENCH3_S:-15} "$BIN/old/pd_mla_bench" --json "$OUT/mla_bench_old.json" --variants wgmma
  echo "bench-old rc=$? at ${SECONDS}s"
fi
nvidia-smi --query-gpu=clocks.sm,temperature.gpu,power.draw --format=csv || true
date -u
