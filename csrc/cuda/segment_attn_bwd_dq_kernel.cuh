// The deterministic dQ kernel of the CUDA backward: dQ without atomics, one thread block per query
// tile (64 rows) of one (sequence, query head), walking the key tiles it sees in order, so every dQ
// element is one thread's sum in a fixed order. It recomputes S and dP (two of the five tile
// products the dK/dV kernel also does), so the deterministic backward costs 7 products instead of 5.
//
// The structure is the forward kernel's (segment_attn_fwd_kernel.cuh): Q and dO go to registers once
// as A operands; K and V tiles of 64 keys below the tile's largest kv_limit stream through shared
// memory double buffered; per key tile and warp (16 rows):
//   S  = Q K^T;  P = exp2(S scale log2e - lse log2e), masked by key < kv_limit[row] only on key
//   tiles some row does not see whole;  dP = dO V^T;  dS = P (dP - delta);  dQ += dS K
// with dS fed to the last product straight from the accumulator registers. dQ is scaled by
// softmax_scale, staged through shared memory and written with 16-byte stores.
#pragma once

#include <cstdint>

#include "../attn_constants.h"
#include "../ism_params.h"
#include "../tile_range.h"
#include "bwd_kernel_traits.h"
#include "kv_tile_pipeline.cuh"
#include "mma_utils.cuh"
#include "query_tile_prologue.cuh"
#include "smem_base.cuh"
#include "tile_io.cuh"
#include "warp_mma.cuh"

namespace ism::cuda {

template <typename Kt>
__global__ void __launch_bounds__(Kt::kNThreads) segment_attn_bwd_dq_kernel(const SegmentAttnBwdParams p) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  using Element = typename Kt::Element;
  using Rows = typename Kt::Rows;
  constexpr int kBlockM = Kt::kBlockM, kBlockN = Kt::kBlockN;
  constexpr int kSTiles = Kt::kSTiles, kDTiles = Kt::kDTiles, kNWarps = Kt::kNWarps;
  constexpr int kRowBytes = Rows::kRowBytes;

  // ---- 1. Which tile (query_tile_prologue.cuh: the last query tiles, which see the most keys under
  // the usual layouts, first).
  const QueryTilePos pos = query_tile_pos<kBlockM>(p);
  if (pos.past_end()) return;
  const QueryTile tile = query_tile_at<kBlockM>(p, pos);
  const int head = tile.head, q_row0 = tile.q_row0, rows = tile.rows;

  extern __shared__ __align__(128) unsigned char smem_raw[];
  unsigned char* smem = smem_raw + smem_align_pad(smem_u32(smem_raw));  // smem_base.cuh
  Element* sQ = reinterpret_cast<Element*>(smem + Kt::kSmemQ);
  Element* sDo = reinterpret_cast<Element*>(smem + Kt::kSmemDo);
  Element* sK = reinterpret_cast<Element*>(smem + Kt::kSmemK);
  Element* sV = reinterpret_cast<Element*>(smem + Kt::kSmemV);
  int* sLimit = reinterpret_cast<int*>(smem + Kt::kSmemLimit);
  int* sReduce = reinterpret_cast<int*>(smem + Kt::kSmemReduce);

  const int tid = threadIdx.x;
  const int warp = tid / 32, lane = tid % 32;
  const int g = lane / 4, t4 = lane % 4;

  // ---- 2. Q and dO tiles in flight; the rows' limits and the tile's smallest and largest.
  const TileCopyLane<Rows> copy_lane(tid);
  const Element* q_base = static_cast<const Element*>(p.q);
  const Element* do_base = static_cast<const Element*>(p.dout);
  load_tile_async<Rows, kBlockM>(sQ, copy_lane,
                                 q_base + static_cast<int64_t>(q_row0) * p.q_row_stride +
                                     static_cast<int64_t>(head) * p.q_head_stride + copy_lane.gmem_offset(p.q_row_stride),
                                 p.q_row_stride, rows, q_base);
  load_tile_async<Rows, kBlockM>(sDo, copy_lane,
                                 do_base + static_cast<int64_t>(q_row0) * p.dout_row_stride +
                                     static_cast<int64_t>(head) * p.dout_head_stride +
                                     copy_lane.gmem_offset(p.dout_row_stride),
                                 p.dout_row_stride, rows, do_base);
  cp_async_commit();
  const int2 limit_bounds = load_row_limits<kBlockM, kNWarps>(p.kv_limit, tile, sLimit, sReduce);
  const int min_limit = limit_bounds.x, max_limit = limit_bounds.y;
  const int n_key_tiles = key_tiles_to_visit(max_limit, kBlockN);

  // First K/V tile in flight while Q and dO move to registers (kv_tile_pipeline.cuh).
  const Element* k_rows = static_cast<const Element*>(p.k) + static_cast<int64_t>(tile.k_begin) * p.k_row_stride +
                          static_cast<int64_t>(tile.kv_head) * p.k_head_stride;
  const Element* v_rows = static_cast<const Element*>(p.v) + static_cast<int64_t>(tile.k_begin) * p.v_row_stride +
                          static_cast<int64_t>(tile.kv_head) * p.v_head_stride;
  KvTilePipeline<Rows, kBlockN, Element> kv(sK, sV, k_rows, v_rows, p, copy_lane);
  kv.start(p, copy_lane, max_limit, n_key_tiles);

  // ---- 3. Q and dO to registers; this thread's rows' limit, lse (log2 domain) and delta.
  cp_async_wait<1>();
  __syncthreads();
  const uint32_t lane_rows_first = ldmatrix_lane_rows_first<kRowBytes>(lane);
  const uint32_t lane_chunks_first = ldmatrix_lane_chunks_first<kRowBytes>(lane);
  uint32_t q_frag[Kt::kQKSteps][4], do_frag[Kt::kQKSteps][4];
  {
    const uint32_t q_warp = smem_u32(sQ) + warp * 16 * kRowBytes + lane_rows_first;
    const uint32_t do_warp = smem_u32(sDo) + warp * 16 * kRowBytes + lane_rows_first;
#pragma unroll
    for (int kk = 0; kk < Kt::kQKSteps; ++kk) {
      ldmatrix_x4(q_frag[kk], q_warp ^ Rows::chunk_pair_xor(kk));
      ldmatrix_x4(do_frag[kk], do_warp ^ Rows::chunk_pair_xor(kk));
    }
  }
  int row_limit[2];
  float row_lse2[2], row_delta[2];
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int r = warp * 16 + g + 8 * h;
    row_limit[h] = sLimit[r];
    // Rows past the end: lse 0 and delta 0 keep P finite and dS = P (0 - 0) = 0 (dO is zero-filled).
    const bool valid = r < rows;
    row_lse2[h] = valid ? p.lse[static_cast<int64_t>(head) * p.lse_head_stride + q_row0 + r] * kLog2e : 0.f;
    row_delta[h] = valid ? p.softmax_delta[static_cast<int64_t>(head) * p.total_q + q_row0 + r] : 0.f;
  }

  float dq[kDTiles][4];
#pragma unroll
  for (int dt = 0; dt < kDTiles; ++dt)
#pragma unroll
    for (int e = 0; e < 4; ++e) dq[dt][e] = 0.f;
  const float scale_log2 = p.softmax_scale * kLog2e;
  const uint32_t sK_addr = smem_u32(sK), sV_addr = smem_u32(sV);

  // ---- 4. The key loop.
  for (int kt = 0; kt < n_key_tiles; ++kt) {
    const int buf = kt % 2;
    const int k0 = kt * kBlockN;
    cp_async_wait<0>();  // as in the forward (kv_tile_pipeline.cuh)
    __syncthreads();
    if (kt + 1 < n_key_tiles) kv.load_next(buf, k0, max_limit, p, copy_lane);
    const uint32_t k_addr = sK_addr + buf * (kBlockN * kRowBytes);
    const uint32_t v_addr = sV_addr + buf * (kBlockN * kRowBytes);

    // S = Q K^T and dP = dO V^T; K and V are [key][d] = [n][k]: plain ldmatrix, chunks first.
    float s[kSTiles][4], dp[kSTiles][4];
#pragma unroll
    for (int nt = 0; nt < kSTiles; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) s[nt][e] = dp[nt][e] = 0.f;
#pragma unroll
    for (int kk = 0; kk < Kt::kQKSteps; ++kk) {
#pragma unroll
      for (int np = 0; np < kSTiles / 2; ++np) {
        uint32_t b[4];
        ldmatrix_x4(b, ((k_addr + lane_chunks_first) ^ Rows::chunk_pair_xor(kk)) + np * 16 * kRowBytes);
        mma_m16n8k16<Element>(s[2 * np], q_frag[kk], b[0], b[1]);
        mma_m16n8k16<Element>(s[2 * np + 1], q_frag[kk], b[2], b[3]);
        ldmatrix_x4(b, ((v_addr + lane_chunks_first) ^ Rows::chunk_pair_xor(kk)) + np * 16 * kRowBytes);
        mma_m16n8k16<Element>(dp[2 * np], do_frag[kk], b[0], b[1]);
        mma_m16n8k16<Element>(dp[2 * np + 1], do_frag[kk], b[2], b[3]);
      }
    }
    // dS = P (dP - delta); element e of n-tile nt: row g + 8 (e / 2), key k0 + 8 nt + 2 t4 + e % 2.
    const bool full = key_tile_is_full(min_limit, k0, kBlockN);
#pragma unroll
    for (int nt = 0; nt < kSTiles; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        float prob = fast_exp2(fmaf(s[nt][e], scale_log2, -row_lse2[e / 2]));
        if (!full && k0 + nt * 8 + 2 * t4 + (e % 2) >= row_limit[e / 2]) prob = 0.f;
        dp[nt][e] = prob * (dp[nt][e] - row_delta[e / 2]);
      }
    }
    uint32_t ds_frag[Kt::kKeySteps][4];
#pragma unroll
    for (int kk = 0; kk < Kt::kKeySteps; ++kk) {
      ds_frag[kk][0] = pack_float2<Element>(dp[2 * kk][0], dp[2 * kk][1]);
      ds_frag[kk][1] = pack_float2<Element>(dp[2 * kk][2], dp[2 * kk][3]);
      ds_frag[kk][2] = pack_float2<Element>(dp[2 * kk + 1][0], dp[2 * kk + 1][1]);
      ds_frag[kk][3] = pack_float2<Element>(dp[2 * kk + 1][2], dp[2 * kk + 1][3]);
    }
    // dQ += dS K: the K tile is [key][d] = [k][n].
    warp_mma_regs_by_rows<Element, Rows>(dq, ds_frag, k_addr + lane_rows_first);
  }

  // ---- 5. Epilogue: dQ * softmax_scale, staged in the Q tile (each warp rewrites only the rows it
  // alone read), then 16-byte stores.
  __syncwarp();
  const float scale = p.softmax_scale;
#pragma unroll
  for (int dt = 0; dt < kDTiles; ++dt) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int row = warp * 16 + g + 8 * h;
      *reinterpret_cast<uint32_t*>(sQ + Rows::swizzle(row, dt) + 2 * t4) =
          pack_float2<Element>(dq[dt][2 * h] * scale, dq[dt][2 * h + 1] * scale);
    }
  }
  __syncthreads();
  Element* dq_out = static_cast<Element*>(p.dq) + static_cast<int64_t>(q_row0) * p.dq_row_stride +
                    static_cast<int64_t>(head) * p.dq_head_stride;
  store_tile<Rows, kBlockM>(sQ, dq_out, p.dq_row_stride, rows, tid);
#else
  __trap();
#endif
}

}  // namespace ism::cuda
