// Plain parameter structs shared by every segment-attention kernel, CPU and CUDA.
//
// They hold raw pointers, strides and sizes only, so a kernel translation unit can include this
// header without any torch header (nvcc compiles the CUDA kernels against it alone).
//
// Layout (FlashAttention's varlen convention):
//   q  [total_q, h_q,  d]   k, v [total_k, h_kv, d]   (last dim contiguous, other strides free)
//   cu_seqlens_q/k [b + 1]  int32, sequence i owns rows [cu[i], cu[i+1])
//   kv_limit       [total_q] int32, query row r may attend keys j < kv_limit[r] of its own sequence
//   out            [total_q, h_q, d] (same strides rule as q)
//   lse            [h_q, total_q] float32, natural-log log-sum-exp of the scaled scores
#pragma once

#include <cstdint>

namespace ism {

enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

struct SegmentAttnFwdParams {
  // Inputs.
  const void* q;
  const void* k;
  const void* v;
  const int32_t* cu_seqlens_q;
  const int32_t* cu_seqlens_k;
  const int32_t* kv_limit;
  // Outputs.
  void* out;
  float* lse;

  // Strides in elements; the last dimension is always contiguous.
  int64_t q_row_stride, q_head_stride;
  int64_t k_row_stride, k_head_stride;
  int64_t v_row_stride, v_head_stride;
  int64_t out_row_stride, out_head_stride;
  int64_t lse_head_stride;  // lse[h * lse_head_stride + row]

  int batch;          // number of sequences b
  int h_q, h_kv;      // query heads, key/value heads (h_q % h_kv == 0)
  int head_dim;       // d
  int total_q, total_k;
  int max_seqlen_q, max_seqlen_k;
  float softmax_scale;
  DType dtype;
};

struct SegmentAttnBwdParams : SegmentAttnFwdParams {
  // Forward outputs the backward reads (`out`/`lse` of the base struct are inputs here).
  const void* dout;
  const float* dlse;  // optional gradient of lse [h_q, total_q]; nullptr when lse was not used
  int64_t dout_row_stride, dout_head_stride;

  // Gradients (same shapes as q, k, v).
  void* dq;
  void* dk;
  void* dv;
  int64_t dq_row_stride, dq_head_stride;
  int64_t dk_row_stride, dk_head_stride;
  int64_t dv_row_stride, dv_head_stride;

  // Workspace of the CUDA backward (the CPU kernel computes these internally and ignores them).
  float* softmax_delta;  // [h_q, total_q]: rowsum(dout * out) - dlse (dlse shares lse's strides)
  float* dq_accum;       // [total_q, h_q, d] float32, zeroed: dQ summed over key tiles with atomics
  int* q_tile_bounds;    // [batch, q_tiles_stride, 2]: (min, max) clamped kv_limit of each query tile
  int q_tiles_stride;    // query tiles of the longest sequence
};

}  // namespace ism

namespace ism {

// Attention that appends new keys/values into a KV cache in place and attends over the cache.
//   q            [b, lq, h_q, d]          new queries (lq = 1 for decode, or a whole new segment)
//   k_new/v_new  [b, lq_new, h_kv, d]     written at positions cache_seqlens[s] .. of sequence s
//                                          (lq_new = lq, or 0 to attend without appending)
//   cache        contiguous [b_cache, capacity, h_kv, d] (row of sequence s: cache_batch_idx[s], or s)
//                or paged [num_pages, page_size, h_kv, d] with block_table [b, max_pages]
//   kv_limit     [b, lq] int32: query i of sequence s sees cache positions j < kv_limit[s][i]
//   out          [b, lq, h_q, d];  lse [b, h_q, lq] float32
struct KVCacheAttnParams {
  const void* q;
  const void* k_new;
  const void* v_new;
  void* k_cache;
  void* v_cache;
  const int32_t* cache_seqlens;    // [b], lengths before this call's append
  const int32_t* kv_limit;         // [b * lq]
  const int32_t* cache_batch_idx;  // [b] or nullptr (contiguous caches only)
  const int32_t* block_table;      // [b, max_pages] or nullptr (paged caches only)
  void* out;
  float* lse;

  int64_t q_batch_stride, q_row_stride, q_head_stride;
  int64_t k_new_batch_stride, k_new_row_stride, k_new_head_stride;
  int64_t v_new_batch_stride, v_new_row_stride, v_new_head_stride;
  // Contiguous: batch = stride of one cache row; paged: batch = stride of one page.
  int64_t k_cache_batch_stride, k_cache_row_stride, k_cache_head_stride;
  int64_t v_cache_batch_stride, v_cache_row_stride, v_cache_head_stride;
  int64_t out_batch_stride, out_row_stride, out_head_stride;
  int64_t lse_batch_stride, lse_head_stride;
  int64_t block_table_batch_stride;

  int batch, seqlen_q, seqlen_new;
  int h_q, h_kv, head_dim;
  int page_size;  // 0 for a contiguous cache
  float softmax_scale;
  DType dtype;
};

}  // namespace ism
