#!/usr/bin/env bash
# Builds a relocatable bundle of misa-pd binaries for another Linux x86-64 host
# (the GPU host, a cluster node): bin/ (the binaries), lib/ (every shared
# library they need that such a host is not expected to provide), lib/ucx/
# (UCX's transport plugins) and env.sh, which points LD_LIBRARY_PATH and
# UCX_MODULE_DIR at them. System libraries (glibc, libstdc++, libgcc) and the
# CUDA driver/runtime/NCCL (present on the GPU host) are not copied.
#
# Usage: deploy/make_bundle.sh BUILD_DIR OUT_DIR [binary...]
#   Binaries default to every executable directly under BUILD_DIR/{tools,transport,
#   bench/transport,prefill_node,decode_node,orchestrator,tests/transport}.
set -euo pipefail
build=${1:?build dir}
out=${2:?output dir}
shift 2
bins=("$@")
if [[ ${#bins[@]} -eq 0 ]]; then
  for d in tools transport bench/transport prefill_node decode_node orchestrator tests/transport; do
    [[ -d "$build/$d" ]] || continue
    while IFS= read -r f; do bins+=("$f"); done < <(find "$build/$d" -maxdepth 1 -type f -executable)
  done
fi
rm -rf "$out"
mkdir -p "$out/bin" "$out/lib"
skip='^(linux-vdso|ld-linux|libc\.|libm\.|libdl\.|librt\.|libpthread\.|libstdc\+\+|libgcc_s|libcuda\.|libcudart|libnccl|libcublas|libnvidia)'
for b in "${bins[@]}"; do
  cp "$b" "$out/bin/"
  ldd "$b" | awk '/=> \//{print $1" "$3}' | while read -r name path; do
    if [[ ! "$name" =~ $skip ]]; then cp -L -n "$path" "$out/lib/$name"; fi
  done
done
if [[ -d /usr/lib/x86_64-linux-gnu/ucx ]]; then
  mkdir -p "$out/lib/ucx"
  cp -L /usr/lib/x86_64-linux-gnu/ucx/*.so.0 "$out/lib/ucx/" 2>/dev/null || true
  # The plugins' own dependencies (e.g. libibverbs for uct_ib).
  for p in "$out"/lib/ucx/*.so.0; do
    ldd "$p" | awk '/=> \//{print $1" "$3}' | while read -r name path; do
      if [[ ! "$name" =~ $skip ]]; then cp -L -n "$path" "$out/lib/$name"; fi
    done
  done
fi
cat > "$out/env.sh" <<'ENV'
# Source me: makes the bundle's libraries and UCX plugins visible.
bundle_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
export LD_LIBRARY_PATH="$bundle_dir/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export UCX_MODULE_DIR="$bundle_dir/lib/ucx"
export PATH="$bundle_dir/bin:$PATH"
export NCCL_NVLS_ENABLE=0
ENV
du -sh "$out" | awk '{print "bundle: "$1" in '"$out"'"}'
