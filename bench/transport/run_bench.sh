#!/usr/bin/env bash
# Runs kv_transport_bench (DeepSeek-V3.2-shaped KV, 61 layers x 788 B/token +
# summaries, XXH3-64 checksums on) over UCX shared memory (UCX_TLS=posix) and
# TCP loopback (UCX_TLS=tcp) and, in the same run, the fair ucx_perftest
# reference for each; prints both and their ratio. docs/perf.md ("Transport")
# explains the choice:
#   - same bytes of distinct memory: one message of the stream's size
#     (-s BYTES), never a re-put cache-resident chunk;
#   - posix: ucp_put_bw, the same one-sided put;
#   - tcp:   tag_bw -e, the same bytes over the same TCP transport with peer
#     error handling like the stream's endpoints. ucp_put_bw -e over TCP is
#     printed too but is no reference: UCX emulates TCP puts with messages the
#     target must progress, and perftest's target progresses its worker only
#     between 1 ms polls of its out-of-band socket;
#   - the same TCP segment size on both (the backend's default, 256k);
#   - best of 3 perftest runs, as the stream reports its best of ITERS.
# The stream is also run with checksums off, for scale.
#
# Usage: bench/transport/run_bench.sh [BUILD_DIR] [TOKENS] [ITERS]
set -euo pipefail
BUILD=${1:-build}
TOKENS=${2:-16384}
ITERS=${3:-5}
CHUNK=4194304
BENCH="$BUILD/bench/transport/kv_transport_bench"
[[ -x "$BENCH" ]] || { echo "run_bench: $BENCH not built" >&2; exit 1; }
command -v ucx_perftest >/dev/null || { echo "run_bench: ucx_perftest missing (apt-get install ucx-utils)" >&2; exit 1; }
export UCX_TCP_TX_SEG_SIZE=${UCX_TCP_TX_SEG_SIZE:-256k} UCX_TCP_RX_SEG_SIZE=${UCX_TCP_RX_SEG_SIZE:-256k}
PORT=$((20000 + RANDOM % 20000))

# perftest TLS BYTES TEST [flags...] -> best overall GB/s (10^9 B/s) of 3 runs.
perftest() {
  local tls=$1 bytes=$2 test=$3 best=0
  shift 3
  for _ in 1 2 3; do
    UCX_TLS=$tls timeout 120 ucx_perftest -p $PORT >/dev/null 2>&1 &
    local srv=$!
    sleep 0.5
    local final
    final=$(UCX_TLS=$tls timeout 120 ucx_perftest localhost -p $PORT -t "$test" -s "$bytes" -n 3 -w 1 "$@" \
              2>/dev/null | grep '^Final:' || true)
    wait $srv || true
    PORT=$((PORT + 1))
    # Final: iters p50 avg overall | bw avg (MiB/s) | bw overall (MiB/s) | ...
    [[ -n "$final" ]] && best=$(awk -v b="$best" '{v = $7 * 1048576 / 1e9; printf "%.3f", (v > b ? v : b)}' <<<"$final")
  done
  echo "$best"
}

printf "%-6s %-7s %-40s %9s %9s %6s\n" "tls" "tokens" "ucx_perftest reference" "kv GB/s" "ref GB/s" "ratio"
for tls in posix tcp; do
  line=$(UCX_TLS=$tls "$BENCH" --backend=ucx --tokens="$TOKENS" --iters="$ITERS" --chunk_bytes=$CHUNK | grep '^RESULT')
  nock=$(UCX_TLS=$tls "$BENCH" --backend=ucx --tokens="$TOKENS" --iters="$ITERS" --chunk_bytes=$CHUNK --checksum=0 |
         sed -n 's/.* best_gbps=\([0-9.]*\).*/\1/p')
  bytes=$(sed -n 's/.* bytes=\([0-9]*\).*/\1/p' <<<"$line")
  ours=$(sed -n 's/.* best_gbps=\([0-9.]*\).*/\1/p' <<<"$line")
  if [[ $tls == posix ]]; then refs=("ucp_put_bw"); else refs=("tag_bw -e" "ucp_put_bw -e"); fi
  for r in "${refs[@]}"; do
    read -r test flags <<<"$r"
    # shellcheck disable=SC2086
    ref=$(perftest "$tls" "$bytes" "$test" $flags)
    ratio=$(awk -v a="$ours" -v b="$ref" 'BEGIN{ if (b + 0 > 0) printf "%.2f", a / b; else print "n/a" }')
    printf "%-6s %-7s %-40s %9s %9s %6s\n" "$tls" "$TOKENS" "$test $flags -s $bytes -n 3 -w 1" "$ours" "$ref" "$ratio"
  done
  echo "  kv_stream: $line"
  echo "  kv_stream with --checksum=0: best_gbps=$nock"
done
loop_line=$("$BENCH" --backend=loopback --tokens="$TOKENS" --iters="$ITERS" --chunk_bytes=$CHUNK | grep '^RESULT')
echo "loopback backend (in-process memcpy, same protocol): $loop_line"
