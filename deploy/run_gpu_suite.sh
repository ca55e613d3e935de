#!/usr/bin/env bash
# Runs misa-pd's GPU suite on a GPU host from a bundle built elsewhere
# (deploy/make_bundle.sh, tarred as .bundle/bundle.tar.xz): the one-GPU tests
# of the kernels and of the model's GPU backend, and, on a host with two GPUs, the transport's
# GPU tests and NCCL / UCX-staging benchmarks (bench/transport/run_gpu.sh).
# Every step runs under a timeout and keeps going after a failure; logs go to
# $OUT (default ./gpu-suite-out): suite.log, logs.tgz (every step's full log)
# and results.jsonl (the transport benchmark); with PD_SUITE_BENCH=1 also the
# indexer, sparse MLA and per-layer benchmarks (their JSON beside the logs).
# Usage: [PD_SUITE_BENCH=1] deploy/run_gpu_suite.sh [BUNDLE_TAR]
set -u
OUT=${OUT:-$PWD/gpu-suite-out}
W=$(mktemp -d)
mkdir -p "$OUT"
exec > >(tee -a "$OUT/suite.log") 2>&1
trap 'tar czf "$OUT/logs.tgz" -C "$W" . 2>/dev/null; cp -f "$W"/transport/results.jsonl "$OUT/" 2>/dev/null' EXIT
tarball=${1:-.bundle/bundle.tar.xz}
B=/tmp/pd_bundle
rm -rf "$B" && mkdir -p "$B" && tar xJf "$tarball" -C "$B" || { echo "cannot unpack $tarball"; exit 1; }
# The bundle leaves the CUDA runtime and NCCL to the host.
export LD_LIBRARY_PATH="/usr/local/cuda/lib64${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
source "$B/env.sh"
export NCCL_NVLS_ENABLE=0
date
nvidia-smi --query-gpu=index,name,memory.total,clocks.sm,driver_version --format=csv || true
ngpu=$(nvidia-smi -L 2>/dev/null | wc -l)

step() {  # step NAME TIMEOUT_S CMD...
  local name=$1 t=$2; shift 2
  echo "=== $name"
  local t0=$(date +%s)
  timeout -k 5 "$t" "$@" > "$W/$name.log" 2>&1
  local rc=$?
  echo "=== $name rc=$rc ($(( $(date +%s) - t0 )) s)"
  tail -n 25 "$W/$name.log"
}

for t in kernels_cuda_indexer_test kernels_cuda_mla_test; do
  [ -x "$B/bin/$t" ] && step "$t" 100 "$B/bin/$t"
done
[ -x "$B/bin/kernels_cuda_model_test" ] && step kernels_cuda_model_test 60 "$B/bin/kernels_cuda_model_test"
[ -x "$B/bin/model_gpu_model_test" ] && step model_gpu_model_test 120 "$B/bin/model_gpu_model_test"
if [ "$ngpu" -ge 2 ] && [ -x "$B/bin/kv_gpu_bench" ]; then
  mkdir -p "$W/transport"
  step transport_gpu 200 env OUT="$W/transport" bash bench/transport/run_gpu.sh "$B"
fi
# PD_SUITE_BENCH=1: the kernel and layer benchmarks too (JSON to $OUT).
if [ -n "${PD_SUITE_BENCH:-}" ]; then
  if [ -x "$B/bin/pd_indexer_bench" ]; then
    step pd_indexer_bench 240 "$B/bin/pd_indexer_bench" --json "$W/indexer_bench.json"
  fi
  if [ -x "$B/bin/pd_mla_bench" ]; then
    step pd_mla_bench 120 "$B/bin/pd_mla_bench" --json "$W/mla_bench.json"
  fi
  if [ -x "$B/bin/pd_layer_bench" ]; then
    step pd_layer_bench 240 "$B/bin/pd_layer_bench" --json "$W/layer_bench.json"
  fi
  cp -f "$W"/*_bench.json "$OUT/" 2>/dev/null || true
fi
date
