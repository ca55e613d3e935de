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
#      at 32K and 128K tokens: the NCCL backend (variants: 8 / 3 / 32 chunks
#      per NCCL group, XXH3 on every 64th chunk or none), a plain
#      ncclSend/ncclRecv loop of the same total bytes in 4 MiB / 64 MiB /
#      whole-KV messages, plain NCCL over the stream's own messages (single,
#      grouped per layer, packed), their ratios (goal >= 0.90), and UCX with
#      host staging GPU to GPU (checksums on and off);
#   3. unless --no-experiments, each its own process (a failure loses only
#      its own lines): the NCCL stream with packing (NcclOptions::pack_bytes
#      64 MiB on both ends; tag=packed), NCCL's channel setup (NCCL_DEBUG=INFO,
#      INIT), and the NCCL measurements again with NCCL_MIN_P2P_NCHANNELS=64
#      (more channels per send/recv; tag=p2p64).
# Writes logs and results.jsonl (one JSON object per RESULT/RATIO line) to
# $OUT (default ./gpu_bench_out) and prints a table. --dry-run checks the
# bundle and prints the commands without running anything.
set -euo pipefail

usage() { echo "usage: $0 BUNDLE_DIR [--dry-run] [--no-tests] [--no-experiments] [-- kv_gpu_bench flags]" >&2; exit 2; }
[[ $# -ge 1 ]] || usage
BUNDLE=$(cd "$1" 2>/dev/null && pwd) || { echo "run_gpu: bundle dir '$1' not found" >&2; exit 2; }
shift
DRY=0
TESTS=1
EXPERIMENTS=1
EXTRA=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    --no-tests) TESTS=0 ;;
    --no-experiments) EXPERIMENTS=0 ;;
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

run kv_gpu_bench "$BENCH" --tokens=32768,131072 --iters=5 --chunk_mb=64 --checksum_every=64,0 \
    --batch_chunks=8,3,32 --plain_chunks=4,64,0 --ucx_checksum_every=1,0 "${EXTRA[@]}" ||
  { echo "run_gpu: kv_gpu_bench FAILED" >&2; status=1; }
LOGS=("$OUT/kv_gpu_bench.log")
if [[ $EXPERIMENTS -eq 1 ]]; then
  # The stream packing each layer's messages into one (runs of <= 64 MiB).
  run kv_gpu_bench_packed "$BENCH" --modes=nccl,plain,plain_kv --tokens=32768,131072 --iters=5 --chunk_mb=64 \
      --pack_mb=64 --checksum_every=64,0 --plain_chunks=64,0 --tag=packed ||
    { echo "run_gpu: kv_gpu_bench (packed) FAILED" >&2; status=1; }
  LOGS+=("$OUT/kv_gpu_bench_packed.log")
  # NCCL's own view of its channels (how many carry one send/recv).
  run nccl_info env NCCL_DEBUG=INFO NCCL_DEBUG_SUBSYS=INIT "$BENCH" --modes=plain --tokens=2048 --layers=2 \
      --iters=1 --plain_chunks=64 --verify=0 >/dev/null || true
  [[ $DRY -eq 1 ]] || { grep -iE "channels|nRanks|NCCL version|P2P" "$OUT/nccl_info.log" | head -n 40; } || true
  # The same NCCL measurements with more p2p channels per peer.
  run kv_gpu_bench_p2p64 env NCCL_MIN_P2P_NCHANNELS=64 "$BENCH" --modes=nccl,plain,plain_kv \
      --tokens=32768,131072 --iters=5 --chunk_mb=64 --checksum_every=64 --batch_chunks=8 --pack_mb=0,64 \
      --plain_chunks=64,0 --verify=0 --tag=p2p64 ||
    { echo "run_gpu: kv_gpu_bench (NCCL_MIN_P2P_NCHANNELS=64) FAILED" >&2; status=1; }
  LOGS+=("$OUT/kv_gpu_bench_p2p64.log")
fi
[[ $DRY -eq 1 ]] && { echo "run_gpu: dry run, nothing executed; logs would go to $OUT"; exit 0; }

# RESULT/RATIO key=value lines -> JSON lines, and a table.
cat "${LOGS[@]}" 2>/dev/null | awk '/^(RESULT|RATIO) /{
       printf "{\"kind\":\"%s\"", tolower($1);
       for (i = 2; i <= NF; ++i) { split($i, kv, "="); v = kv[2];
         if (v ~ /^[0-9.]+$/) printf ",\"%s\":%s", kv[1], v; else printf ",\"%s\":\"%s\"", kv[1], v; }
       print "}" }' > "$OUT/results.jsonl"
echo
printf "%-14s %8s %12s %10s  %s\n" "mode" "tokens" "chunk" "best GB/s" "variant"
cat "${LOGS[@]}" 2>/dev/null | awk '/^RESULT /{ split("", a); v = "";
       for (i = 2; i <= NF; ++i) { split($i, kv, "="); a[kv[1]] = kv[2];
         if (kv[1] !~ /^(mode|tokens|bytes|chunk_bytes|best_gbps|median_gbps)$/) v = v " " $i }
       printf "%-14s %8s %12s %10s %s\n", a["mode"], a["tokens"], a["chunk_bytes"], a["best_gbps"], v }
     /^RATIO /{ print }'
echo "results: $OUT/results.jsonl, logs: $OUT/*.log"
exit $status
