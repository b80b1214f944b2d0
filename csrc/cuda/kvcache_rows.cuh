// The query side of the KV-cache attention kernel (kvcache_attn_kernel.cuh): which tile a block owns,
// the packed rows of a GQA group, their Q rows (cp.async) and their clamped kv_limit.
//
// Packed row r of (sequence s, K/V head hk) is query head hk * group + r / seqlen_q at position
// r % seqlen_q: the rows of all the heads that read K/V head hk, head-major.
#pragma once

#include <climits>
#include <cstdint>

#include "block_reduce.cuh"
#include "kvcache_params.h"
#include "mma_utils.cuh"
#include "packed_rows.cuh"
#include "tile_io.cuh"

namespace ism::cuda {

struct KVCacheBlock {
  int seq, kv_head, row_tile, split;
  int row0;    // first packed row of the tile
  int rows;    // packed rows of the tile, 1..kBlockM
  int cached;  // keys in the cache before this call: positions below come from the cache, the rest from k_new
  int n_keys;  // cached + seqlen_new: every kv_limit is clamped into [0, n_keys]
};

// blockIdx.x -> (row tile, split, K/V head, sequence), the row tile fastest (kvcache_plan.h).
template <int kBlockM>
__device__ __forceinline__ KVCacheBlock kvcache_block(const KVCacheKernelParams& p) {
  KVCacheBlock b;
  int x = static_cast<int>(blockIdx.x);
  b.row_tile = x % p.row_tiles;
  x /= p.row_tiles;
  b.split = x % p.num_splits;
  x /= p.num_splits;
  b.kv_head = x % p.h_kv;
  b.seq = x / p.h_kv;
  const int packed = (p.h_q / p.h_kv) * p.seqlen_q;
  b.row0 = b.row_tile * kBlockM;
  b.rows = min(kBlockM, packed - b.row0);
  // The op checked the lengths against the capacity; the clamp only keeps a negative one harmless.
  b.cached = max(p.cache_seqlens[b.seq], 0);
  b.n_keys = b.cached + p.seqlen_new;
  return b;
}

// Query head and position of packed row `r` of the block's tile.
struct PackedRow {
  int head, pos;
};

__device__ __forceinline__ PackedRow packed_row(const KVCacheKernelParams& p, const KVCacheBlock& b, int r) {
  const int pr = b.row0 + r;
  return {b.kv_head * (p.h_q / p.h_kv) + pr / p.seqlen_q, pr % p.seqlen_q};
}

// Issues the cp.async copies of the tile's Q rows (kRows rows of Rows; rows past b.rows zero-filled).
// The caller commits the group.
template <typename Rows, int kRows, typename Element>
__device__ __forceinline__ void load_packed_q_async(Element* sQ, const TileCopyLane<Rows>& lane,
                                                    const KVCacheKernelParams& p, const KVCacheBlock& b) {
  constexpr int kRowsPerPass = TileCopyLane<Rows>::kRowsPerPass;
  static_assert(kRows % kRowsPerPass == 0, "whole passes");
  const Element* q = static_cast<const Element*>(p.q) + b.seq * p.q_batch_stride + lane.chunk * 8;
  const uint32_t dst0 = smem_u32(sQ + Rows::swizzle(lane.row, lane.chunk));
#pragma unroll
  for (int pass = 0; pass < kRows / kRowsPerPass; ++pass) {
    const int r = lane.row + pass * kRowsPerPass;
    const bool valid = r < b.rows;
    const Element* src = static_cast<const Element*>(p.q);  // zero-filled rows still need a valid address
    if (valid) {
      const PackedRow row = packed_row(p, b, r);
      src = q + row.pos * p.q_row_stride + row.head * p.q_head_stride;
    }
    cp_async_16(dst0 + pass * kRowsPerPass * Rows::kRowBytes, src, valid);
  }
}

// Writes each row's kv_limit, clamped into [0, n_keys], to s_limit[kBlockM] and returns the tile's
// smallest and largest (x, y); rows past the tile's end get 0 and take no part. Every thread calls it
// (one barrier inside, which also publishes s_limit). s_reduce: 2 kNWarps ints.
template <int kBlockM, int kNWarps>
__device__ __forceinline__ int2 load_packed_limits(const KVCacheKernelParams& p, const KVCacheBlock& b, int* s_limit,
                                                   int* s_reduce) {
  const int tid = threadIdx.x;
  int lo = INT_MAX, hi = 0;
  if (tid < kBlockM) {
    int lim = 0;
    if (tid < b.rows) {
      const int pos = (b.row0 + tid) % p.seqlen_q;
      lim = clamp_int(p.kv_limit[static_cast<int64_t>(b.seq) * p.seqlen_q + pos], 0, b.n_keys);
      lo = hi = lim;
    }
    s_limit[tid] = lim;
  }
  return block_min_max<kNWarps>(lo, hi, s_reduce);
}

}  // namespace ism::cuda
