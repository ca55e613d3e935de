#!/usr/bin/env bash
# Round 9 (branch sel-r9) device session: bench/kernels/sel_run.sh with round
# 9's sanitizer runs (memcheck + racecheck on the seeded small case and the
# slot-claim cases) and profiles (MISA 64K, dense 32K). Bundle: bin/ (the
# branch's kernels_cuda_indexer_test, pd_indexer_bench), old/ (main's
# pd_indexer_bench), and in run 2 old9/ (run 1's pd_indexer_bench).
# Usage (repo root, .bundle/bundle.tar.xz carried): bash bench/kernels/sel9_run.sh
SEL_SAN="memcheck:SeededSmallTopk racecheck:SeededSmallTopk memcheck:SlotClaims racecheck:SlotClaims" \
  SEL_NCU="misa64k:misa:65536 dense32k:dense:32768" exec bash "$(dirname "${BASH_SOURCE[0]}")/sel_run.sh"
