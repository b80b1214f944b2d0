// The start of the kernels whose thread block owns one query tile of one (sequence, query head):
// the forward (segment_attn_fwd_kernel.cuh) and the deterministic dQ kernel
// (segment_attn_bwd_dq_kernel.cuh). Which tile the block owns, and its rows' clamped kv_limit.
#pragma once

#include <climits>

#include "../ism_params.h"
#include "block_reduce.cuh"
#include "packed_rows.cuh"

namespace ism::cuda {

// Where a block's query tile lies: blockIdx decoded, and its sequence's rows. The 1-D grid (launch_grids.h) is ordered
// tile-major, all (head, sequence) pairs of the last query tile first: under ISM, MAS and causal
// layouts the last tiles of a sequence see the most keys, so the heaviest blocks start first and
// the light ones fill the tail of the grid. Heads vary fastest, so the query heads that share one
// K/V head (GQA) run side by side and share it in L2.
struct QueryTilePos {
  int head;       // query head
  int seq;        // sequence
  int row0;       // first row of the tile, counted within the sequence
  SeqRows q_seq;  // the sequence's query rows
  // The grid is sized by the longest sequence: a tile past its sequence's end has nothing to do.
  __device__ __forceinline__ bool past_end() const { return row0 >= q_seq.len; }
};

template <int kBlockM>
__device__ __forceinline__ QueryTilePos query_tile_pos(const SegmentAttnFwdParams& p) {
  const int heads_x_batch = p.h_q * p.batch;
  const int m_tiles = (p.max_seqlen_q + kBlockM - 1) / kBlockM;
  const int m_tile = m_tiles - 1 - static_cast<int>(blockIdx.x) / heads_x_batch;
  const int rest = static_cast<int>(blockIdx.x) % heads_x_batch;
  const int head = rest % p.h_q;
  const int seq = rest / p.h_q;
  return {head, seq, m_tile * kBlockM, sequence_rows(p.cu_seqlens_q, seq, p.total_q)};
}

// The rest of the tile's coordinates, for a tile that is not past its sequence's end. (Two steps so
// that the kernel itself returns in between: an early return inside one helper changed the
// kernels' code.)
struct QueryTile {
  int head;      // query head
  int kv_head;   // the K/V head it reads (GQA)
  int q_row0;    // first packed row of the tile
  int rows;      // rows of the tile inside its sequence: 1..kBlockM
  int k_begin;   // first packed key row of the sequence
  int seqlen_k;  // keys of the sequence
};

template <int kBlockM>
__device__ __forceinline__ QueryTile query_tile_at(const SegmentAttnFwdParams& p, const QueryTilePos& pos) {
  QueryTile t;
  t.rows = min(kBlockM, pos.q_seq.len - pos.row0);
  t.q_row0 = pos.q_seq.begin + pos.row0;
  const SeqRows k_seq = sequence_rows(p.cu_seqlens_k, pos.seq, p.total_k);
  t.k_begin = k_seq.begin;
  t.seqlen_k = k_seq.len;
  t.head = pos.head;
  t.kv_head = pos.head / (p.h_q / p.h_kv);
  return t;
}

// Writes the clamped kv_limit of each row of the tile to s_limit[kBlockM] and returns the tile's
// smallest and largest (x, y). Rows past the sequence's end get limit 0: they are computed (on
// zero-filled operands) but never stored, and they take no part in the min/max. Every thread of the
// block calls it; the barrier inside also publishes s_limit to every warp. s_reduce: 2 kNWarps ints.
template <int kBlockM, int kNWarps>
__device__ __forceinline__ int2 load_row_limits(const int* kv_limit, const QueryTile& t, int* s_limit, int* s_reduce) {
  const int tid = threadIdx.x;
  int lo = INT_MAX, hi = 0;
  if (tid < kBlockM) {
    int lim = 0;
    if (tid < t.rows) {
      lim = clamp_int(kv_limit[t.q_row0 + tid], 0, t.seqlen_k);
      lo = hi = lim;
    }
    s_limit[tid] = lim;
  }
  return block_min_max<kNWarps>(lo, hi, s_reduce);
}

}  // namespace ism::cuda
