#!/usr/bin/env bash
# One GPU-host session for the sparse MLA kernels (issue #3, kernels/cuda/mla*.cu),
# sized for about 150 s: the GPU tests against the CPU reference first (one
# group per process, each under its own time limit), then the benchmark of
# every kernel variant (decode and prefill, FP8 records and bf16 rows), the
# previous build's kernels ($BIN/old/pd_mla_bench, same session: the A/B), a
# top-k sweep of the pair kernel's decode (per-block vs per-CTA cost) and,
# with NCU=1 and ncu present, Nsight Compute on two decode launches.
# Binaries: $BIN (default .g1bundle: kernels_cuda_mla_test, pd_mla_bench built
# on the development machine; they need only libcudart). Every step keeps going
# after a failure; steps are skipped once $BUDGET_S (default 150) seconds have
# passed. Logs and JSON go to $OUT (default ./gpu-out): mla_run.log,
# mla_bench_{A,B,C}.json, mla_bench_old.json, mla_bench_topk*.json, ncu.tgz. Usage:
#   [BIN=dir] [OUT=dir] [NCU=1] bash bench/kernels/mla_gpu_run.sh
set -x
OUT=${OUT:-$PWD/gpu-out}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/mla_run.log") 2>&1
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
BIN=${BIN:-.g1bundle}
BUDGET_S=${BUDGET_S:-150}
T_MLA=$BIN/kernels_cuda_mla_test
B_MLA=$BIN/pd_mla_bench
date -u
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm,driver_version --format=csv || true
left() { [ "$SECONDS" -lt "$BUDGET_S" ] || { echo "SKIPPED (budget): $*"; return 1; }; }

# 1. Tests (the pair kernel's groups first: a hang there shortens the rest).
hung=0
for f in Rejects WgmmaPairHeadsAndEdges Bf16Rows SingleToken SparseAttentionMatchesCpu \
         WgmmaHeadsAndEdges WgmmaSchedules CacheWrite Upconvert; do
  left "test $f" || continue
  lim=${TEST_S:-40}
  [ $hung -eq 1 ] && lim=8
  timeout -k 2 $lim "$T_MLA" "$f"
  rc=$?
  echo "mla test $f rc=$rc at ${SECONDS}s"
  [ $rc -ge 124 ] && hung=1
done

# 2. Every variant, decode and prefill (FP8 records; prefill also bf16 rows), in
# three processes (each under its own limit, so a hang in one group leaves the
# others): A the default (kAuto = pair experiment 5) and the bf16 rows, B the
# st.async hand-over and the persistent kernel over it, C the CTA-scope buffer
# waits (11-13, not yet measured). Each group includes kWgmma (the agreement
# reference).
SB="stdbuf -oL"; command -v stdbuf > /dev/null || SB=
GA=${GA:-wgmma,auto,wgmma-pair-light,wgmma-pair-after,wgmma-pair-split,wgmma-pair-overlap,wgmma-pair-split-overlap}
GB=${GB:-wgmma,wgmma-pair-light-persist,wgmma-pair-after-persist,wgmma-pair-overlap-persist}
GC=${GC:-wgmma,pair-no-producer,pair-overlap-no-producer,pair-no-consumer,pair-light-no-consumer,pair-after-no-consumer,pair-split-no-consumer}
for g in A B C; do
  eval V=\$G$g
  left "bench $g" || continue
  timeout -k 3 ${BENCH_S:-30} $SB "$B_MLA" --json "$OUT/mla_bench_$g.json" --variants $V
  rc=$?
  echo "bench $g rc=$rc at ${SECONDS}s"
  [ $g = A ] && rcA=$rc
done

# 3. A/B: the previous build (the pair kernel as measured before), same session.
if [ -x "$BIN/old/pd_mla_bench" ] && left bench-old; then
  timeout -k 3 ${BENCH_OLD_S:-20} "$BIN/old/pd_mla_bench" --json "$OUT/mla_bench_old.json" \
    --variants wgmma,wgmma-pair
  echo "bench-old rc=$? at ${SECONDS}s"
fi

# 4. Decode top-k sweep of the pair kernel: per-block vs per-CTA (Q staging, output) cost.
for k in 512 128; do
  left "topk $k" || continue
  timeout -k 3 15 $SB "$B_MLA" --json "$OUT/mla_bench_topk$k.json" --cases decode --topk $k \
    --variants ${TOPK_V:-auto,wgmma-pair-after,wgmma-pair-overlap,wgmma-pair-split-overlap,wgmma-pair-light-persist}
  echo "topk $k rc=$? at ${SECONDS}s"
done

# 5. Nsight Compute on the default kernel's decode (kAuto), and its producer alone.
if [ "${NCU:-0}" = 1 ] && [ "${rcA:-1}" = 0 ] && command -v ncu > /dev/null; then
  mkdir -p /tmp/ncu
  for v in ${NCU_V:-wgmma-pair-overlap pair-after-no-consumer}; do
    left "ncu $v" || continue
    timeout -k 3 ${NCU_S:-45} ncu --clock-control none --launch-skip 2 --launch-count 1 \
      -k regex:SparseMlaWgmma --section SpeedOfLight --section WarpStateStats \
      --section SchedulerStats --section SourceCounters --section MemoryWorkloadAnalysis \
      --section ComputeWorkloadAnalysis -f -o /tmp/ncu/$v "$B_MLA" --cases decode --variants $v
    echo "ncu $v rc=$? at ${SECONDS}s"
    ncu -i /tmp/ncu/$v.ncu-rep --page details > /tmp/ncu/$v.txt 2>&1
    ncu -i /tmp/ncu/$v.ncu-rep --page source --csv --print-source sass > /tmp/ncu/$v.src.csv 2>&1
    grep -E "Duration|Issued Ipc|No Eligible|Warp Cycles Per Issued|Executed Instructions|Shared Memory|L2 Hit|DRAM Throughput|Tensor" /tmp/ncu/$v.txt | head -24
    rm -f /tmp/ncu/$v.ncu-rep
  done
  tar czf "$OUT/ncu.tgz" -C /tmp ncu && ls -la "$OUT/ncu.tgz"
fi
# 6. Where the persistent kernels spill (SASS local stores / loads per kernel), if cuobjdump is there.
CUOBJ=$(command -v cuobjdump || ls /usr/local/cuda/bin/cuobjdump 2>/dev/null)
if [ -n "$CUOBJ" ]; then
  mkdir -p /tmp/ncu
  "$CUOBJ" -sass "$B_MLA" 2>/dev/null | awk '/Function :/{f=$3} /STL|LDL/{n[f]++} END{for (k in n) print n[k], k}' \
    > /tmp/ncu/spills.txt
  "$CUOBJ" -sass "$B_MLA" 2>/dev/null | awk '/Function :/{f=$3; keep=(f ~ /Lb1ELb1ELb1ELb1EE/)} keep' \
    > /tmp/ncu/persist.sass
  cat /tmp/ncu/spills.txt
  tar czf "$OUT/ncu.tgz" -C /tmp ncu
fi
nvidia-smi --query-gpu=clocks.sm,temperature.gpu,power.draw --format=csv || true
date -u
