// The combine of split keys (FlashDecoding): each chunk of a row's keys left its normalised output O_c
// and log-sum-exp lse_c (kvcache_params.h); the row's output is sum_c exp(lse_c - lse) O_c with
// lse = log sum_c exp(lse_c), computed in one pass with a running maximum. A row whose chunks all saw
// nothing (every lse_c = -inf) gets output 0 and lse -inf; a NaN lse_c (a NaN score in that chunk)
// makes the weights and the sum NaN, and the row's output and lse NaN (the rule of online_softmax.cuh's
// row_normaliser: the sum is exactly 0 or at least 1, the top chunk's own weight).
// ism_ext/ops/kvcache_composite.py holds the same formula in torch (combine_partials), which the CPU
// tests check against whole-row attention.
#pragma once

#include <cmath>
#include <cstdint>

#include "kvcache_kernel_traits.h"
#include "kvcache_params.h"
#include "mma_utils.cuh"

namespace ism::cuda {

// One 8-byte global store of two 32-bit words (gmem 8-byte aligned). Spelled out because a uint2 store
// through a cast pointer reached the PTX as two 4-byte stores here.
__device__ __forceinline__ void store_8_bytes(void* gmem, uint32_t lo, uint32_t hi) {
  asm volatile("st.global.v2.b32 [%0], {%1, %2};\n" ::"l"(gmem), "r"(lo), "r"(hi) : "memory");
}

template <int kHeadDim, typename Element>
__global__ void __launch_bounds__(KVCacheCombineShape<kHeadDim>::kNThreads)
    kvcache_combine_kernel(const KVCacheKernelParams p) {
  using Shape = KVCacheCombineShape<kHeadDim>;
  const int64_t rows = static_cast<int64_t>(p.batch) * p.h_q * p.seqlen_q;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * Shape::kRowsPerBlock + threadIdx.x / Shape::kThreadsPerRow;
  const int col = (threadIdx.x % Shape::kThreadsPerRow) * 4;
  if (row >= rows) return;

  float top = -INFINITY, sum = 0.f;
  float4 acc = make_float4(0.f, 0.f, 0.f, 0.f);
  for (int c = 0; c < p.num_splits; ++c) {
    const float lse = p.lse_partial[c * rows + row];
    if (lse == -INFINITY) continue;  // the chunk saw no key of this row
    const float next = fmaxf(top, lse);
    const float keep = expf(top - next), w = expf(lse - next);  // top = -inf at first: keep = 0
    const float4 x = *reinterpret_cast<const float4*>(p.out_partial + (c * rows + row) * kHeadDim + col);
    acc = make_float4(acc.x * keep + w * x.x, acc.y * keep + w * x.y, acc.z * keep + w * x.z, acc.w * keep + w * x.w);
    sum = sum * keep + w;
    top = next;
  }
  const bool empty = sum == 0.f;
  const float inv = empty ? 0.f : 1.f / sum;
  // Row (b * h_q + h) * seqlen_q + i of the partials is query position i of head h of sequence b.
  const int i = static_cast<int>(row % p.seqlen_q);
  const int64_t bh = row / p.seqlen_q;
  const int h = static_cast<int>(bh % p.h_q), b = static_cast<int>(bh / p.h_q);
  Element* out = static_cast<Element*>(p.out) + b * p.out_batch_stride + i * p.out_row_stride + h * p.out_head_stride;
  store_8_bytes(out + col, pack_float2<Element>(acc.x * inv, acc.y * inv),
                pack_float2<Element>(acc.z * inv, acc.w * inv));
  if (col == 0) p.lse[b * p.lse_batch_stride + h * p.lse_head_stride + i] = empty ? -INFINITY : top + logf(sum);
}

}  // namespace ism::cuda
