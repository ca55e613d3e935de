#!/usr/bin/env bash
# One GPU-host session for the GPU backend (issue #3 item 9). The binaries are
# built on the development machine (the GPU host lacks abseil/gtest) and carried
# as .bundle/bundle.tar.xz:
#   cmake --build build-f3 --target misa-pd pd_layer_bench kernels_cuda_model_test model_gpu_model_test
#   deploy/make_bundle.sh build-f3 /tmp/b build-f3/tools/misa-pd build-f3/bench/model/pd_layer_bench \
#     build-f3/kernels/cuda/model/kernels_cuda_model_test build-f3/model/model_gpu_model_test
#   strip /tmp/b/bin/*; mkdir -p .bundle; tar cJf .bundle/bundle.tar.xz -C /tmp/b .
# Then (device tool, carry .bundle): bash bench/model/gpu_run.sh
# Runs the engine's kernel tests, the GPU-vs-CPU model tests, the per-layer
# benchmark and a misa-pd smoke run; every step keeps going after a failure;
# logs and JSON go to $OUT (default ./gpu-out).
set -x
OUT=${OUT:-$PWD/gpu-out}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/run.log") 2>&1
B=/tmp/pd_bundle
rm -rf "$B" && mkdir -p "$B" && tar xJf .bundle/bundle.tar.xz -C "$B" || exit 1
source "$B/env.sh"
date
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm,driver_version --format=csv || true
SAN=$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)

# 1. The engine's kernels and GEMMs against the CPU reference.
timeout -k 5 ${KT_S:-90} "$B/bin/kernels_cuda_model_test" > "$OUT/kernel_test.log" 2>&1
krc=$?
echo "kernel test rc=$krc"
if [ $krc -ne 0 ] && [ -x "$SAN" ]; then
  timeout -k 5 ${SAN_S:-90} "$SAN" --tool memcheck "$B/bin/kernels_cuda_model_test" > "$OUT/sanitizer.log" 2>&1
  echo "memcheck rc=$?"
fi

# 2. The GPU backend against the CPU backend.
timeout -k 5 ${MT_S:-240} "$B/bin/model_gpu_model_test" > "$OUT/model_test.log" 2>&1
mrc=$?
echo "model test rc=$mrc"
if [ $mrc -ne 0 ] && [ -x "$SAN" ] && [ ! -s "$OUT/sanitizer.log" ]; then
  timeout -k 5 ${SAN_S:-120} "$SAN" --tool memcheck "$B/bin/model_gpu_model_test" \
    --gtest_filter='*Tiny*:*Batched*' > "$OUT/sanitizer.log" 2>&1
  echo "model memcheck rc=$?"
fi

# 3. One V3.2 layer at 128K: prefill chunk and decode batches, dense vs MISA.
timeout -k 5 ${BENCH_S:-240} "$B/bin/pd_layer_bench" --json "$OUT/layer_bench.json" \
  > "$OUT/layer_bench.log" 2>&1
echo "layer bench rc=$?"

# 4. misa-pd with --backend=gpu on a tiny random checkpoint.
{
  "$B/bin/misa-pd" write-checkpoint --preset tiny --out /tmp/tiny --seed 5
  for be in cpu gpu; do
    timeout -k 5 60 "$B/bin/misa-pd" generate --model /tmp/tiny --random_prompt 300 --max_new_tokens 12 \
      --backend $be --ignore_eos
  done
  timeout -k 5 60 "$B/bin/misa-pd" selection-report --model /tmp/tiny --prompt_tokens 600 \
    --compare dense,misa --backend gpu
} > "$OUT/smoke.log" 2>&1
echo "smoke rc=$?"

set +x
echo "===== summary ====="
grep -E "^\[ +(OK|FAILED|SKIPPED) +\]|passed|failed|^  " "$OUT/kernel_test.log" | head -40
grep -E "^\[ +(OK|FAILED) +\]|^  |Failure|Expected|Which is|actual|PASSED|FAILED" "$OUT/model_test.log" | head -60
grep -E "ERROR SUMMARY|Invalid|Address|at 0x" "$OUT/sanitizer.log" 2>/dev/null | head -20
cat "$OUT/layer_bench.log" | tail -25
grep -E "tokens:|backend|finish|error|ERROR|layer|recall" "$OUT/smoke.log" | head -30
date
