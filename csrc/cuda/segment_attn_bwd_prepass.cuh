// Pre-pass of the CUDA backward: one thread block per (query tile, sequence, query head), with the
// query tiles (kBlockM rows) of the dK/dV kernel that reads its bounds.
//
//   delta[h][r] = rowsum(dout[r, h] * out[r, h]) - dlse[h][r]   (float32, [h_q, total_q])
//
// the per-row term of dS = P (dP - delta) (FlashAttention-2's D; the lse gradient enters here, since
// d lse / d s = P). The head-0 block of each query tile also writes the smallest and largest
// clamped kv_limit of the tile's rows, q_tile_bounds[seq][tile] = (min, max): the dK/dV kernel reads
// them to find the query tiles that see its key tile (max > first key) and those that see it whole
// (min >= end of the key tile, no mask), without reading kv_limit row by row.
#pragma once

#include <climits>
#include <cstdint>

#include "../ism_params.h"
#include "block_reduce.cuh"
#include "mma_utils.cuh"
#include "packed_rows.cuh"

namespace ism::cuda {

constexpr int kPrepassThreads = 256;

template <int kHeadDim, typename Element, int kBlockM>
__global__ void __launch_bounds__(kPrepassThreads) segment_attn_bwd_prepass_kernel(const SegmentAttnBwdParams p) {
  constexpr int kChunks = kHeadDim / 8;  // lanes per row, 8 elements (16 bytes) each
  constexpr int kRowsPerPass = kPrepassThreads / kChunks;
  static_assert(kBlockM % kRowsPerPass == 0 && kBlockM <= kPrepassThreads, "whole passes, one thread per row");

  const int m_tile = static_cast<int>(blockIdx.x) % p.q_tiles_stride;
  const int seq = static_cast<int>(blockIdx.x) / p.q_tiles_stride;
  const int head = blockIdx.y;
  const SeqRows q_seq = sequence_rows(p.cu_seqlens_q, seq, p.total_q);
  const int q_begin = q_seq.begin, seqlen_q = q_seq.len;
  const int tile_row0 = m_tile * kBlockM;
  if (tile_row0 >= seqlen_q) return;
  const int rows = min(kBlockM, seqlen_q - tile_row0);
  const int row0 = q_begin + tile_row0;
  const int tid = threadIdx.x;

  const Element* dout = static_cast<const Element*>(p.dout) + static_cast<int64_t>(row0) * p.dout_row_stride +
                        static_cast<int64_t>(head) * p.dout_head_stride;
  const Element* out = static_cast<const Element*>(p.out) + static_cast<int64_t>(row0) * p.out_row_stride +
                       static_cast<int64_t>(head) * p.out_head_stride;
  const int chunk = tid % kChunks;
#pragma unroll
  for (int pass = 0; pass < kBlockM / kRowsPerPass; ++pass) {
    const int row = tid / kChunks + pass * kRowsPerPass;
    float sum = 0.f;
    if (row < rows) {
      const uint4 a = *reinterpret_cast<const uint4*>(dout + static_cast<int64_t>(row) * p.dout_row_stride + chunk * 8);
      const uint4 b = *reinterpret_cast<const uint4*>(out + static_cast<int64_t>(row) * p.out_row_stride + chunk * 8);
      const uint32_t av[4] = {a.x, a.y, a.z, a.w}, bv[4] = {b.x, b.y, b.z, b.w};
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const float2 x = unpack_float2<Element>(av[i]), y = unpack_float2<Element>(bv[i]);
        sum = fmaf(x.x, y.x, fmaf(x.y, y.y, sum));
      }
    }
    // The kChunks lanes of a row are consecutive and aligned in the warp: reduce among them.
#pragma unroll
    for (int off = kChunks / 2; off > 0; off /= 2) sum += __shfl_xor_sync(0xffffffffu, sum, off);
    if (chunk == 0 && row < rows) {
      const int64_t lse_at = static_cast<int64_t>(head) * p.lse_head_stride + row0 + row;
      p.softmax_delta[static_cast<int64_t>(head) * p.total_q + row0 + row] = sum - (p.dlse ? p.dlse[lse_at] : 0.f);
    }
  }

  if (head != 0) return;
  __shared__ int s_reduce[2 * (kPrepassThreads / 32)];
  const int seqlen_k = sequence_rows(p.cu_seqlens_k, seq, p.total_k).len;
  int lo = INT_MAX, hi = 0;
  if (tid < rows) lo = hi = clamp_int(p.kv_limit[row0 + tid], 0, seqlen_k);
  const int2 limit_bounds = block_min_max<kPrepassThreads / 32>(lo, hi, s_reduce);
  if (tid == 0) {
    int* bounds = p.q_tile_bounds + 2 * (static_cast<int64_t>(seq) * p.q_tiles_stride + m_tile);
    bounds[0] = limit_bounds.x;
    bounds[1] = limit_bounds.y;
  }
}

}  // namespace ism::cuda
