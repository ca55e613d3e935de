#!/usr/bin/env bash
# GPU transport benchmarks on a two-GPU host, from a bundle built elsewhere
# (the GPU host lacks UCX headers, Cap'n Proto, abseil and GoogleTest):
#
#   # on the build machine:
#   cmake --build BUILD --target kv_gpu_bench transport_nccl_test transport_cuda_test
#   deploy/make_bundle.sh BUILD BUNDLE BUILD/bench/transport/kv_gpu_bench \
#       BUILD/transport/transport_nccl_test BUILD/transport/transport_cuda_test
#   # copy BUNDLE and this script to the GPU host, then:
#   OUT=/some/dir bench/transport/run_gpu.sh BUNDLE [--dry-run] [--no-tests] [-- kv_gpu_bench flags]
#
# Runs, with NCCL_NVLS_ENABLE=0:
#   1. the GPU tests in the bundle, if present (transport_cuda_test: one GPU;
#      transport_nccl_test: two GPUs), unless --no-tests;
#   2. kv_gpu_bench: one process, one thread per GPU (GPU 0 sends, GPU 1
#      receives), DeepSeek-V3.2-shaped KV (61 layers x 788 B/token + summaries)
#      at 32K and 128K tokens: the NCCL backend, a plain ncclSend/ncclRecv loop
#      of the same total bytes in 4 MiB / 64 MiB / whole-KV messages, their
#      ratio (goal >= 0.90), and UCX with pinned-host staging GPU to GPU.
# Writes logs and results.jsonl (one JSON object per RESULT/RATIO line) to
# $OUT (default ./gpu_bench_out) and prints a table. --dry-run checks the
# bundle and prints the commands without running anything.
set -euo pipefail

usage() { echo "usage: $0 BUNDLE_DIR [--dry-run] [--no-tests] [-- kv_gpu_bench flags]" >&2; exit 2; }
[[ $# -ge 1 ]] || usage
BUNDLE=$(cd "$1" 2>/dev/null && pwd) || { echo "run_gpu: bundle dir '$1' not found" >&2; exit 2; }
shift
DRY=0
TESTS=1
EXTRA=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    --no-tests) TESTS=0 ;;
    --) shift; EXTRA=("$@"); break ;;
    *) usage ;;
  esac
  shift
done

[[ -f "$BUNDLE/env.sh" ]] || { echo "run_gpu: $BUNDLE/env.sh missing (build the bundle with deploy/make_bundle.sh)" >&2; exit 2; }
# shellcheck disable=SC1091
source "$BUNDLE/env.sh"
export NCCL_NVLS_ENABLE=0
BENCH="$BUNDLE/bin/kv_gpu_bench"
[[ -x "$BENCH" ]] || { echo "run_gpu: $BENCH missing from the bundle" >&2; exit 2; }
OUT=${OUT:-$PWD/gpu_bench_out}
mkdir -p "$OUT"

# The bundle leaves the CUDA runtime and NCCL to the host; find them if the
# loader does not.
missing() { ldd "$1" 2>/dev/null | awk '/not found/{print $1}'; }
if [[ -n "$(missing "$BENCH")" ]]; then
  for d in /usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib /usr/lib/x86_64-linux-gnu; do
    [[ -d "$d" ]] && export LD_LIBRARY_PATH="$LD_LIBRARY_PATH:$d"
  done
fi
if [[ -n "$(missing "$BENCH")" ]]; then
  echo "run_gpu: libraries not found for kv_gpu_bench: $(missing "$BENCH" | tr '\n' ' ')" >&2
  [[ $DRY -eq 1 ]] || exit 2
fi

run() {  # run NAME CMD... : logs to $OUT/NAME.log
  local name=$1
  shift
  echo "+ $*" | tee -a "$OUT/commands.txt"
  [[ $DRY -eq 1 ]] && return 0
  "$@" 2>&1 | tee "$OUT/$name.log"
  return "${PIPESTATUS[0]}"
}

if [[ $DRY -eq 0 ]]; then
  if command -v nvidia-smi >/dev/null; then
    gpus=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
  else
    gpus=0
  fi
  if [[ "$gpus" -lt 2 ]]; then
    echo "run_gpu: needs a host with two GPUs; nvidia-smi lists $gpus" >&2
    exit 3
  fi
fi

status=0
if [[ $TESTS -eq 1 ]]; then
  for t in transport_cuda_test transport_nccl_test; do
    if [[ -x "$BUNDLE/bin/$t" ]]; then
      run "$t" "$BUNDLE/bin/$t" || { echo "run_gpu: $t FAILED" >&2; status=1; }
    else
      echo "run_gpu: $t not in the bundle; skipped"
    fi
  done
fi

run kv_gpu_bench "$BENCH" --tokens=32768,131072 --iters=5 --chunk_mb=64 --checksum_every=64 \
    --plain_chunks=4,64,0 "${EXTRA[@]}" || { echo "run_gpu: kv_gpu_bench FAILED" >&2; exit 1; }
[[ $DRY -eq 1 ]] && { echo "run_gpu: dry run, nothing executed; logs would go to $OUT"; exit 0; }

# RESULT/RATIO key=value lines -> JSON lines, and a table.
awk '/^(RESULT|RATIO) /{
       printf "{\"kind\":\"%s\"", tolower($1);
       for (i = 2; i <= NF; ++i) { split($i, kv, "="); v = kv[2];
         if (v ~ /^[0-9.]+$/) printf ",\"%s\":%s", kv[1], v; else printf ",\"%s\":\"%s\"", kv[1], v; }
       print "}" }' "$OUT/kv_gpu_bench.log" > "$OUT/results.jsonl"
echo
printf "%-12s %8s %14s %12s %10s\n" "mode" "tokens" "bytes" "chunk" "best GB/s"
awk '/^RESULT /{ for (i = 2; i <= NF; ++i) { split($i, kv, "="); a[kv[1]] = kv[2] }
       printf "%-12s %8s %14s %12s %10s\n", a["mode"], a["tokens"], a["bytes"], a["chunk_bytes"], a["best_gbps"] }
     /^RATIO /{ print }' "$OUT/kv_gpu_bench.log"
echo "results: $OUT/results.jsonl, logs: $OUT/*.log"
exit $status
