#!/usr/bin/env bash
# Runs kv_transport_bench (DeepSeek-V3.2-shaped KV, 61 layers x 788 B/token +
# summaries) over UCX shared memory (UCX_TLS=posix) and TCP loopback
# (UCX_TLS=tcp), and in the same run ucx_perftest ucp_put_bw (server + client
# on localhost) moving the same total bytes in messages of the stream's chunk
# size. Prints both and their ratio.
# Usage: bench/transport/run_bench.sh [BUILD_DIR] [TOKENS] [ITERS]
set -euo pipefail
BUILD=${1:-build}
TOKENS=${2:-16384}
ITERS=${3:-5}
CHUNK=4194304
BENCH="$BUILD/bench/transport/kv_transport_bench"
[[ -x "$BENCH" ]] || { echo "run_bench: $BENCH not built" >&2; exit 1; }
command -v ucx_perftest >/dev/null || { echo "run_bench: ucx_perftest missing (apt-get install ucx-utils)" >&2; exit 1; }
PORT=$((20000 + RANDOM % 20000))

printf "%-8s %-12s %14s %14s %8s\n" "UCX_TLS" "tokens" "kv_stream GB/s" "perftest GB/s" "ratio"
loop_line=$("$BENCH" --backend=loopback --tokens="$TOKENS" --iters="$ITERS" --chunk_bytes=$CHUNK | grep '^RESULT')
for tls in posix tcp; do
  line=$(UCX_TLS=$tls "$BENCH" --backend=ucx --tokens="$TOKENS" --iters="$ITERS" --chunk_bytes=$CHUNK | grep '^RESULT')
  bytes=$(sed -n 's/.* bytes=\([0-9]*\).*/\1/p' <<<"$line")
  ours=$(sed -n 's/.* best_gbps=\([0-9.]*\).*/\1/p' <<<"$line")
  n=$(( (bytes + CHUNK - 1) / CHUNK ))
  UCX_TLS=$tls timeout 120 ucx_perftest -p $PORT >/dev/null 2>&1 &
  srv=$!
  sleep 0.5
  final=$(UCX_TLS=$tls timeout 120 ucx_perftest localhost -p $PORT -t ucp_put_bw -s $CHUNK -n $n 2>/dev/null | grep '^Final:')
  wait $srv || true
  # Final: iters p50 avg overall | bw avg (MB/s) | bw overall (MB/s) | ...
  ref=$(awk '{printf "%.3f", $7 / 1000 * 1.048576}' <<<"$final")
  ratio=$(awk -v a="$ours" -v b="$ref" 'BEGIN{printf "%.2f", a / b}')
  printf "%-8s %-12s %14s %14s %8s\n" "$tls" "$TOKENS" "$ours" "$ref" "$ratio"
  echo "  kv_stream: $line"
  echo "  perftest:  ucx_perftest -t ucp_put_bw -s $CHUNK -n $n  ->  $final"
  PORT=$((PORT + 1))
done
echo "loopback (in-process memcpy, same protocol): $loop_line"
