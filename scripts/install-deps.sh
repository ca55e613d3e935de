#!/usr/bin/env bash
# Installs the Debian 12 packages misa-pd builds against. Idempotent: packages
# already present are skipped, and nothing runs apt when all are there.
# Usage: scripts/install-deps.sh [--check]   (--check: only report what is missing)
set -euo pipefail

PACKAGES=(
  build-essential cmake pkg-config
  libabsl-dev                       # Status, StatusOr, Mutex, flags, strings
  libgoogle-glog-dev                # LOG/VLOG/CHECK (packaged abseil has no absl/log)
  libboost1.81-dev libboost-json1.81-dev  # Asio, Beast, JSON
  libcapnp-dev capnproto            # control-plane schemas
  libucx-dev ucx-utils              # RDMA / shm / tcp transport, ucx_perftest
  libxxhash-dev                     # XXH3 chunk checksums
  libpcre2-dev                      # Unicode regex for the BPE pre-tokenizer
  libgtest-dev libgmock-dev googletest
  libbenchmark-dev
  iproute2                          # network-namespace tests
)

missing=()
for p in "${PACKAGES[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$p")
  fi
done

if [[ ${#missing[@]} -eq 0 ]]; then
  echo "install-deps: all ${#PACKAGES[@]} packages present"
  exit 0
fi
if [[ "${1:-}" == "--check" ]]; then
  echo "install-deps: missing: ${missing[*]}"
  exit 1
fi

SUDO=""
if [[ $(id -u) -ne 0 ]]; then
  if command -v sudo >/dev/null; then SUDO="sudo"; else
    echo "install-deps: need root (or sudo) to install: ${missing[*]}" >&2; exit 1
  fi
fi
echo "install-deps: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
