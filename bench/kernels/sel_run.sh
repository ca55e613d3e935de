#!/usr/bin/env bash
# A selection-kernel round's device session (rounds 7 and 9; bench/kernels/
# round*_notes.md). Binaries are built on the development machine and shipped
# in a bundle (BUNDLE, default .bundle/bundle.tar.xz, carried to the device):
# bin/ (the round's build: kernels_cuda_indexer_test, pd_indexer_bench), old/
# (main before the round: pd_indexer_bench) and optionally more earlier builds
# in old*/ directories (each benchmarked like old/). Steps: the indexer GPU
# tests (all); the prefill sweep + kernel variants of bin/, then of each old
# build; every build's sweep again (same session, for the noise);
# compute-sanitizer runs (SEL_SAN: "tool:test-filter ..."); Nsight Compute
# source counters of bin/ (SEL_NCU: "name:mode:keys ...", Q = 8192, kernel
# version 2). Every step under a time limit, keeping going after a failure.
# Logs to $OUT: run.log, logs.tgz, ncu.tgz, indexer_bench{,_2,_old,_old_2,...}.json.
# Usage (repo root): [SEL_SAN=...] [SEL_NCU=...] bash bench/kernels/sel_run.sh
set -u
OUT=${OUT:-$PWD/sel-out}; mkdir -p "$OUT"
exec > >(tee -a "$OUT/run.log") 2>&1
BUNDLE=${BUNDLE:-$PWD/.bundle/bundle.tar.xz}
SEL_SAN=${SEL_SAN:-memcheck:SeededSmallTopk racecheck:SeededSmallTopk}
SEL_NCU=${SEL_NCU:-misa64k:misa:65536}
B=/tmp/selb
rm -rf "$B" && mkdir -p "$B" && tar xJf "$BUNDLE" -C "$B" || { echo "cannot unpack $BUNDLE"; exit 1; }
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
# Builds: bin/ (JSON suffix "", log "new"), then old/ and any other old*/.
builds=("bin:") ; for d in "$B"/old*/; do n=$(basename "$d"); builds+=("$n:_$n"); done
for b in "${builds[@]}"; do
  dir=${b%%:*} suf=${b#*:}; name=${suf#_}; name=${name:-new}
  step "bench_$name" 50 "$B/$dir/pd_indexer_bench" --prefill-only --experiments \
    --json "$OUT/indexer_bench$suf.json"
  grep -vE "^\s*$" "$OUT/logs/bench_$name.log" | head -60
done
for b in "${builds[@]}"; do
  dir=${b%%:*} suf=${b#*:}; name=${suf#_}; name=${name:-new}
  step "bench_${name}_2" 30 "$B/$dir/pd_indexer_bench" --prefill-only --json "$OUT/indexer_bench${suf}_2.json"
  grep -E "prefill|total" "$OUT/logs/bench_${name}_2.log" | head -30
done
if command -v compute-sanitizer > /dev/null; then
  for s in $SEL_SAN; do
    tool=${s%%:*} filter=${s#*:}
    step "${tool}_$filter" 60 compute-sanitizer --tool "$tool" "$B/bin/kernels_cuda_indexer_test" "$filter"
    grep -E "RACECHECK SUMMARY|Hazard|ERROR SUMMARY|^\[==" "$OUT/logs/${tool}_$filter.log" | head -5
  done
fi
if command -v ncu > /dev/null; then
  mkdir -p /tmp/ncu
  for c in $SEL_NCU; do
    IFS=: read -r name mode keys <<< "$c"
    step "ncu_$name" 60 ncu --clock-control none --launch-skip 1 --launch-count 1 -k regex:SelectKernelV2 \
      --section SpeedOfLight --section WarpStateStats --section SchedulerStats --section SourceCounters \
      -f -o "/tmp/ncu/$name" "$B/bin/pd_indexer_bench" --case "$mode" "$keys" 8192 2 0
    ncu -i "/tmp/ncu/$name.ncu-rep" --page details > "/tmp/ncu/$name.txt" 2>&1
    ncu -i "/tmp/ncu/$name.ncu-rep" --page source --csv --print-source sass > "/tmp/ncu/$name.src.csv" 2>&1
    grep -E "Duration|Issued Warp|No Eligible|Warp Cycles Per Issued" "/tmp/ncu/$name.txt" | head -6
  done
  rm -f /tmp/ncu/*.ncu-rep; tar czf "$OUT/ncu.tgz" -C /tmp ncu
fi
tar czf "$OUT/logs.tgz" -C "$OUT" logs && rm -rf "$OUT/logs"
echo "total $(( $(date +%s) - T0 )) s"; date -u
