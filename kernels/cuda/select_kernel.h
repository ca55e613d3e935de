// Internal declarations of the selection kernel templates (defined in
// select_kernel.cuh, instantiated in select_g*.cu, launched by select.cu).
#ifndef PD_KERNELS_CUDA_SELECT_KERNEL_H_
#define PD_KERNELS_CUDA_SELECT_KERNEL_H_

#include <cuda_runtime.h>

#include <cstdint>

namespace pd::kernels::cuda::select_internal {

// Everything the kernels read, flattened from SelectParams + SelectPlan.
struct SelectArgs {
  const uint8_t* pool;          // key pool
  const int32_t* page_table;    // [num_seqs, page_table_stride]
  int64_t page_table_stride;
  const int64_t* num_tokens;    // [num_seqs]
  uint32_t page_bytes;          // KvLayout::IndexPageBytes()
  uint32_t scale_offset;        // KvLayout::IndexScaleOffset(0)
  const uint8_t* q8;            // [T, H, 128]
  const float* weights;         // [T, H]
  const int64_t* positions;     // [T]
  const int32_t* query_start;   // [num_seqs + 1]
  int heads;                    // H
  const int32_t* head_list;     // [T, G] or nullptr; [T, masked_heads] when masked_heads > 0
  int masked_heads;             // > 0: rows are all heads, weights of unlisted heads zeroed
  const int32_t* key_list;      // [num_seqs, key_list_stride] or nullptr
  const int32_t* key_list_len;  // [num_seqs]
  int64_t key_list_stride;
  int key_list_per_query;       // 1: key_list rows are queries (one query per CTA), else sequences
  int experiment;               // SelectParams::experiment (benchmark-only knobs)
  int seed_k;                   // > 0: version 2 seeds each query's threshold with the
                                //   seed_k-th best of every kSelectSampleStride-th key
                                //   (SelectSeedTopk); 0: no seeding
  int64_t seed_min_keys;        // seed only CTAs whose key range has at least this many keys
  int rows_per_cta;             // 128, or 64 (G == 64, one query per sequence)
  int topk;
  int sorted;
  int splits;
  int64_t keys_per_split;
  uint64_t* lists;              // [T, splits, kSelectListCap]
  int32_t* counts;              // [T, splits]
  int32_t* out;                 // [T, topk]; nullptr in the scan when splits > 1
  int32_t* merge_out;           // [T, topk] for the merge
};

// Scoring + fused top-k; grid (groups_per_seq, splits, num_seqs).
template <int G, bool kWgmma>
cudaError_t LaunchSelectKernel(const SelectArgs& args, dim3 grid, cudaStream_t stream);

// Version 2 (select_kernel_v2.cuh): double-buffered accumulators, permuted
// columns, warp-partitioned lists; topk up to 8192 without a key list.
template <int G>
cudaError_t LaunchSelectKernelV2(const SelectArgs& args, dim3 grid, cudaStream_t stream);

// Merge of the split lists; one CTA per query.
cudaError_t LaunchMergeKernel(const SelectArgs& args, int64_t num_queries, cudaStream_t stream);

}  // namespace pd::kernels::cuda::select_internal

#endif  // PD_KERNELS_CUDA_SELECT_KERNEL_H_
