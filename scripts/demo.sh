#!/usr/bin/env bash
# The embedded CPU demo: writes the random `tiny` checkpoint (once), then runs
# the model monolithically: a short generation, and a long-context prefill with
# the per-layer MISA-vs-DSA selection report.
# Usage: scripts/demo.sh BUILD_DIR DEMO_DIR
set -euo pipefail
build=${1:-build}
demo=${2:-$build/demo}
bin="$build/tools/misa-pd"
model="$demo/tiny"
if [[ ! -f "$model/config.json" ]]; then
  mkdir -p "$demo"
  "$bin" write-checkpoint --preset=tiny --out="$model" --seed=42
fi
echo "== misa-pd generate (tiny random checkpoint, CPU backend, MISA selection) =="
"$bin" generate --model="$model" --prompt="The quick brown fox jumps over the lazy dog." \
  --max_new_tokens=48 --temperature=0.8 --top_p=0.95 --seed=1
echo
echo "== misa-pd selection-report (16K-token prompt: MISA and HISA vs dense DSA, per layer) =="
"$bin" selection-report --model="$model" --prompt_tokens=16384 --compare=misa,hisa --seed=1
