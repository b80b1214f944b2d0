// Bounds pre-pass of the CUDA backward: one thread block per (query tile, sequence), with the query
// tiles (kBlockM rows) of the dK/dV kernel that reads its bounds. It writes the smallest and largest
// clamped kv_limit of the tile's rows, q_tile_bounds[seq][tile] = (min, max): the dK/dV kernel reads
// them to find the query tiles that see its key tile (max > first key) and those that see it whole
// (min >= end of the key tile, no mask), without reading kv_limit row by row.
//
// The other per-row input of the dK/dV kernel, delta = rowsum(dout * out) - dlse (FlashAttention-2's
// D, the per-row term of dS = P (dP - delta); the lse gradient enters there, since d lse / d s = P),
// is the delta pass's: the forward kernel run again, which takes it from the float32 output rather
// than the rounded 16-bit one (segment_attn_fwd_kernel.cuh, segment_attn_bwd_launch.h).
#pragma once

#include <climits>
#include <cstdint>

#include "../ism_params.h"
#include "block_reduce.cuh"
#include "packed_rows.cuh"

namespace ism::cuda {

constexpr int kPrepassThreads = 256;

template <int kBlockM>
__global__ void __launch_bounds__(kPrepassThreads) segment_attn_bwd_bounds_kernel(const SegmentAttnBwdParams p) {
  static_assert(kBlockM <= kPrepassThreads, "one thread per row");
  const int m_tile = static_cast<int>(blockIdx.x) % p.q_tiles_stride;
  const int seq = static_cast<int>(blockIdx.x) / p.q_tiles_stride;
  const SeqRows q_seq = sequence_rows(p.cu_seqlens_q, seq, p.total_q);
  const int tile_row0 = m_tile * kBlockM;
  if (tile_row0 >= q_seq.len) return;
  const int rows = min(kBlockM, q_seq.len - tile_row0);
  const int row0 = q_seq.begin + tile_row0;
  const int tid = threadIdx.x;

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
