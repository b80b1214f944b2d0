// The CUDA forward kernel of segment-masked attention (FlashAttention-2 class, written for the
// kv_limit rule): one thread block = one query tile of one (sequence, query head).
//
//   1. Block -> (query tile, head, sequence); tiles past the sequence's end exit at once.
//   2. The Q tile is copied to shared memory (cp.async), each row's kv_limit is read and clamped, and
//      the tile's smallest and largest limit are reduced across the block.
//   3. Q goes to registers once (ldmatrix). The key tiles below the largest limit
//      (tile_range.h key_tiles_to_visit) stream through shared memory, double buffered: tile t + 1 is
//      in flight while tile t is computed.
//   4. Per key tile: S = Q K^T (mma m16n8k16, K by ldmatrix); only tiles that are not entirely
//      below the smallest limit (key_tile_is_full) pay for the per-row mask j < kv_limit[r]; online
//      softmax in registers (exp2, softmax_scale * log2(e) folded into its FFMA); P converted in
//      registers into the A operand of O += P V (V by ldmatrix.trans).
//   5. O is normalised, staged through shared memory and written with 16-byte stores; lse once.
//
// The caller's contract on index values (not checked on the host, which would need a device sync):
// cu_seqlens non-decreasing from 0 to total, kv_limit in [0, seqlen_k], max_seqlen_q >= the longest
// query sequence. The kernel clamps cu_seqlens into [0, total] and kv_limit into [0, seqlen_k], so
// bad values can give wrong numbers but never an out-of-bounds access or a NaN of its own making.
#pragma once

#include <cstdint>

#include "../ism_params.h"
#include "../tile_range.h"
#include "fwd_kernel_traits.h"
#include "kv_tile_pipeline.cuh"
#include "mma_utils.cuh"
#include "online_softmax.cuh"
#include "query_tile_prologue.cuh"
#include "score_tile.cuh"
#include "smem_base.cuh"
#include "tile_io.cuh"
#include "warp_mma.cuh"

namespace ism::cuda {

template <typename Kt>
__global__ void __launch_bounds__(Kt::kNThreads) segment_attn_fwd_kernel(const SegmentAttnFwdParams p) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  using Element = typename Kt::Element;
  using Rows = typename Kt::Rows;
  constexpr int kBlockM = Kt::kBlockM, kBlockN = Kt::kBlockN;
  constexpr int kMTiles = Kt::kMTiles, kSTiles = Kt::kSTiles, kOTiles = Kt::kOTiles;
  constexpr int kNWarps = Kt::kNWarps;

  // ---- 1. Which tile (query_tile_prologue.cuh: the heaviest tiles first).
  const QueryTilePos pos = query_tile_pos<kBlockM>(p);
  if (pos.past_end()) return;
  const QueryTile tile = query_tile_at<kBlockM>(p, pos);
  const int head = tile.head, q_row0 = tile.q_row0, rows = tile.rows;

  const Element* q_ptr = static_cast<const Element*>(p.q) + static_cast<int64_t>(q_row0) * p.q_row_stride +
                         static_cast<int64_t>(head) * p.q_head_stride;
  const Element* k_ptr = static_cast<const Element*>(p.k) + static_cast<int64_t>(tile.k_begin) * p.k_row_stride +
                         static_cast<int64_t>(tile.kv_head) * p.k_head_stride;
  const Element* v_ptr = static_cast<const Element*>(p.v) + static_cast<int64_t>(tile.k_begin) * p.v_row_stride +
                         static_cast<int64_t>(tile.kv_head) * p.v_head_stride;

  // The tiles are kSmemAlign-aligned (smem_base.cuh): the ldmatrix addresses of the key loop step
  // through the d chunks by XOR-ing the absolute shared address (see below).
  extern __shared__ __align__(128) unsigned char smem_raw[];
  const uint32_t smem_pad = smem_align_pad(smem_u32(smem_raw));
  Element* smem = reinterpret_cast<Element*>(smem_raw + smem_pad);
  Element* sQ = smem + Kt::kSmemQ;
  Element* sK = smem + Kt::kSmemK;
  Element* sV = smem + Kt::kSmemV;
  int* sLimit = reinterpret_cast<int*>(smem_raw + smem_pad + Kt::kSmemTileBytes);  // [kBlockM]
  int* sReduce = sLimit + kBlockM;                                                  // [2 * kNWarps]

  const int tid = threadIdx.x;
  const int warp = tid / 32, lane = tid % 32;

  // ---- 2. Q tile in flight; meanwhile the limits of its rows and their min/max.
  const TileCopyLane<Rows> copy_lane(tid);
  load_tile_async<Rows, kBlockM>(sQ, copy_lane, q_ptr + copy_lane.gmem_offset(p.q_row_stride), p.q_row_stride, rows,
                                 static_cast<const Element*>(p.q));
  cp_async_commit();

  const int2 limit_bounds = load_row_limits<kBlockM, kNWarps>(p.kv_limit, tile, sLimit, sReduce);
  const int min_limit = limit_bounds.x, max_limit = limit_bounds.y;
  const int n_key_tiles = key_tiles_to_visit(max_limit, kBlockN);

  // First K/V tile in flight while Q moves to registers (kv_tile_pipeline.cuh).
  KvTilePipeline<Rows, kBlockN, Element> kv(sK, sV, k_ptr, v_ptr, p, copy_lane);
  kv.start(p, copy_lane, max_limit, n_key_tiles);

  // ---- 3. Q to registers (this warp's rows only), and this thread's row limits.
  cp_async_wait<1>();  // the Q group is complete (the K/V group may still be in flight)
  __syncthreads();

  // Per-lane ldmatrix coordinates: lanes 8i..8i+7 address the 8 rows of 8x8 matrix i.
  const int r8 = lane % 8;         // row within an 8x8 matrix
  const int bit3 = (lane / 8) % 2;  // matrices 1 and 3
  const int bit4 = lane / 16;       // matrices 2 and 3
  const int g = lane / 4, t4 = lane % 4;  // accumulator fragment coordinates
  const int warp_row0 = warp * Kt::kWarpRows;

  uint32_t q_frag[kMTiles][Kt::kQKSteps][4];
#pragma unroll
  for (int mi = 0; mi < kMTiles; ++mi) {
#pragma unroll
    for (int kk = 0; kk < Kt::kQKSteps; ++kk) {
      // A operand: matrix 0 = rows 0-7 / cols 0-7, 1 = rows 8-15 / cols 0-7, 2 = rows 0-7 / cols 8-15,
      // 3 = rows 8-15 / cols 8-15 of the 16x16 block -> a0..a3.
      const int row = warp_row0 + mi * 16 + r8 + bit3 * 8;
      ldmatrix_x4(q_frag[mi][kk], smem_u32(sQ + Kt::swizzle(row, 2 * kk + bit4)));
    }
  }

  int row_limit[kMTiles][2];
#pragma unroll
  for (int mi = 0; mi < kMTiles; ++mi) {
    row_limit[mi][0] = sLimit[warp_row0 + mi * 16 + g];
    row_limit[mi][1] = sLimit[warp_row0 + mi * 16 + g + 8];
  }

  float o[kMTiles][kOTiles][4];
#pragma unroll
  for (int mi = 0; mi < kMTiles; ++mi)
#pragma unroll
    for (int dt = 0; dt < kOTiles; ++dt)
#pragma unroll
      for (int e = 0; e < 4; ++e) o[mi][dt][e] = 0.f;
  OnlineSoftmax<kMTiles, kSTiles, kOTiles> softmax;
  // softmax_scale * log2(e), folded into the softmax's exp2, which needs it positive: a negative
  // scale negates Q instead, a zero one runs as a tiny positive one (online_softmax.cuh).
  const float scale_log2 = positive_scale_log2(p.softmax_scale, [&] { negate_q_fragments(q_frag); });

  // Per-lane ldmatrix addresses of the key loop, formed for d chunk pair 0 of the tile; the chunk
  // pair `pair` is then one XOR away (Kt::chunk_pair_xor), and the next 16 keys one immediate
  // offset. Cheap to form inside the loop, so nothing is hoisted into registers across it.
  //   K (plain ldmatrix, B of S = Q K^T, a [n][k] tile): chunks first (mma_utils.cuh).
  //   V (ldmatrix.trans, B of O += P V, a [k][n] tile):  rows first.
  const uint32_t k_lane = ldmatrix_lane_chunks_first<Kt::kRowBytes>(lane);
  const uint32_t v_lane = ldmatrix_lane_rows_first<Kt::kRowBytes>(lane);
  const uint32_t sK_addr = smem_u32(sK), sV_addr = smem_u32(sV);

  // ---- 4. The key loop.
  for (int kt = 0; kt < n_key_tiles; ++kt) {
    const int buf = kt % 2;
    const int k0 = kt * kBlockN;
    // K/V of tile kt have landed (the only group in flight), and after the barrier every warp is
    // done with tile kt - 1, so its buffer can take tile kt + 1.
    cp_async_wait<0>();
    __syncthreads();
    if (kt + 1 < n_key_tiles) kv.load_next(buf, k0, max_limit, p, copy_lane);
    const uint32_t k_base = sK_addr + buf * (Kt::kKVElems * 2) + k_lane;
    const uint32_t v_base = sV_addr + buf * (Kt::kKVElems * 2) + v_lane;

    // S = Q K^T (warp_mma.cuh), K by plain ldmatrix.
    float s[kMTiles][kSTiles][4];
    warp_mma_regs_by_rows_t<Element, Rows>(s, q_frag, k_base);

    // The mask, only on tiles some row cannot see entirely (block-uniform branch). Keys past the
    // tile's valid range are zeros in shared memory and always masked here: limit <= max_limit.
    if (!key_tile_is_full(min_limit, k0, kBlockN)) mask_scores<Kt>(s, row_limit, k0, t4);
    softmax.update(s, o, scale_log2);
    // O += P V, P straight from the registers of S (score_tile.cuh).
    accumulate_pv<Kt>(o, s, v_base);
  }

  // ---- 5. Epilogue. The output tile is staged in the Q buffer: each warp writes only its own rows,
  // which only it has read (ldmatrix of Q above), so a warp barrier orders the two.
  __syncwarp();
  float* lse_ptr = p.lse + static_cast<int64_t>(head) * p.lse_head_stride + q_row0;
  softmax.for_each_finished_row(warp_row0, lane, scale_log2, [&](int mi, int h, int row, float inv_sum, float lse) {
#pragma unroll
    for (int dt = 0; dt < kOTiles; ++dt) {
      // Element pair (2 t4, 2 t4 + 1) of d-tile dt is 4 bytes inside chunk dt of the row.
      *reinterpret_cast<uint32_t*>(sQ + Kt::swizzle(row, dt) + 2 * t4) =
          pack_float2<Element>(o[mi][dt][2 * h] * inv_sum, o[mi][dt][2 * h + 1] * inv_sum);
    }
    if (t4 == 0 && row < rows) lse_ptr[row] = lse;
  });
  __syncthreads();
  Element* out_ptr = static_cast<Element*>(p.out) + static_cast<int64_t>(q_row0) * p.out_row_stride +
                     static_cast<int64_t>(head) * p.out_head_stride;
  store_tile<Kt, kBlockM>(sQ, out_ptr, p.out_row_stride, rows, tid);
#else
  // The data path needs sm_80 (cp.async, bf16 mma); the host refuses older devices before launch.
  __trap();
#endif
}

}  // namespace ism::cuda
