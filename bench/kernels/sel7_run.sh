#!/usr/bin/env bash
# Round 7 (branch sel-r7) device session: bench/kernels/sel_run.sh with round
# 7's sanitizer runs (memcheck + racecheck on the seeded small case, memcheck
# on the final-selection cases) and profile (MISA 64K). Bundle: bin/ (round 7's
# kernels_cuda_indexer_test, pd_indexer_bench), old/ (8f45b1c's pd_indexer_bench).
# Round 7 ran the standalone form of these steps (same order and JSON names;
# step log names and the sanitizer time limits differ).
# Usage (repo root, .bundle/bundle.tar.xz carried): bash bench/kernels/sel7_run.sh
SEL_SAN="memcheck:SeededSmallTopk racecheck:SeededSmallTopk memcheck:FinalSelectionPerWarp" \
  SEL_NCU="misa64k:misa:65536" exec bash "$(dirname "${BASH_SOURCE[0]}")/sel_run.sh"
