// The main CUDA backward kernel of segment-masked attention (FlashAttention-2 class): one thread
// block owns one key tile (kBlockN keys) of one (sequence, K/V head), keeps its dK and dV in
// registers and walks the query tiles that see it, for every query head of its GQA group.
//
//   1. Block -> (key tile, K/V head, sequence), key tile 0 first: under ISM, MAS and causal layouts
//      the first keys are seen by the most queries, so the heaviest blocks start first.
//   2. K and V of the tile go to shared memory once (cp.async). The first query tile that sees the
//      tile is found from the pre-pass's per-tile kv_limit bounds: a tile sees key j iff its
//      largest kv_limit exceeds j (tile_range.h query_tile_sees_key_tile), so the block looks for
//      the first tile whose max exceeds the tile's first key, 256 tiles per round.
//   3. Steps = (query tile, query head of the group). Q, dO, lse, delta and kv_limit of step t + 1
//      are in flight (double buffered) while step t computes, per warp (16 keys):
//        S^T  = K Q^T                       mma, K by ldmatrix (A), Q by ldmatrix (B)
//        P^T  = exp2(S^T scale log2e - lse log2e), masked by key < kv_limit[query] only on query
//               tiles that do not see the whole key tile (their smallest kv_limit is below its end)
//        dV  += P^T dO                      P^T straight from the accumulator registers
//        dP^T = V dO^T
//        dS^T = P^T (dP^T - delta[query])
//        dK  += dS^T Q                      dS^T likewise
//      and, unless dQ is left to the deterministic kernel:
//        dS^T -> shared memory (its own tile, or the step's Q buffer once every warp is done with
//        Q: Kt::kDsInQ); dQ(step) = dS K by all warps re-split over (rows, d);
//        float2 atomics into the float32 dQ accumulator (scaled by softmax_scale).
//   4. dK (scaled) and dV are staged through shared memory and written with 16-byte stores. Keys
//      that no query sees get zero gradients.
//
// A tile of queries past its sequence's end is zero-filled (Q, dO, lse, delta and kv_limit all 0),
// which makes its dS exactly 0 and its P finite; its rows are never stored. A query with kv_limit 0
// has lse -inf: its tile is always masked (its smallest limit is 0), and P is selected to 0 there,
// never multiplied. Values of kv_limit outside [0, seqlen_k] compare like their clamped values.
#pragma once

#include <climits>
#include <cstdint>

#include "../attn_constants.h"
#include "../ism_params.h"
#include "../tile_range.h"
#include "bwd_kernel_traits.h"
#include "mma_utils.cuh"
#include "packed_rows.cuh"
#include "smem_base.cuh"
#include "tile_io.cuh"
#include "warp_mma.cuh"

namespace ism::cuda {

// The first query tile m of a sequence (of n_tiles) that sees the key tile starting at `key0` (its
// largest kv_limit exceeds key0, tile_range.h), or n_tiles.
// bounds[2 m + 1] is that largest limit. All threads of the block call it; it returns the same value
// in all of them. s_scan holds one int per warp.
template <int kNThreads>
__device__ __forceinline__ int first_query_tile_seeing(const int* bounds, int n_tiles, int key0, int* s_scan) {
  const int warp = threadIdx.x / 32;
  for (int base = 0; base < n_tiles; base += kNThreads) {
    const int m = base + static_cast<int>(threadIdx.x);
    const bool sees = m < n_tiles && query_tile_sees_key_tile(bounds[2 * m + 1], key0);
    const unsigned vote = __ballot_sync(0xffffffffu, sees);
    if (threadIdx.x % 32 == 0) s_scan[warp] = vote ? base + warp * 32 + __ffs(vote) - 1 : INT_MAX;
    __syncthreads();
    int first = INT_MAX;
#pragma unroll
    for (int w = 0; w < kNThreads / 32; ++w) first = min(first, s_scan[w]);
    __syncthreads();  // s_scan is rewritten by the next round
    if (first != INT_MAX) return first;
  }
  return n_tiles;
}

template <typename Kt, bool kAtomicDq>
__global__ void __launch_bounds__(Kt::kNThreads, 1) segment_attn_bwd_dkdv_kernel(const SegmentAttnBwdParams p) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  using Element = typename Kt::Element;
  using KvRows = typename Kt::KvRows;
  using DsRows = typename Kt::DsRows;
  constexpr int kBlockM = Kt::kBlockM, kBlockN = Kt::kBlockN, kHeadDim = Kt::kHeadDim;
  constexpr int kSTiles = Kt::kSTiles, kDTiles = Kt::kDTiles, kQSteps = Kt::kQSteps;
  constexpr int kRowBytes = KvRows::kRowBytes;

  // ---- 1. Which key tile.
  const int heads_x_batch = p.h_kv * p.batch;
  const int n_tile = static_cast<int>(blockIdx.x) / heads_x_batch;
  const int rest = static_cast<int>(blockIdx.x) % heads_x_batch;
  const int kv_head = rest % p.h_kv;
  const int seq = rest / p.h_kv;
  const SeqRows k_seq = sequence_rows(p.cu_seqlens_k, seq, p.total_k);
  const int k_begin = k_seq.begin, seqlen_k = k_seq.len;
  const int key0 = n_tile * kBlockN;  // first key of the tile, counted within the sequence
  if (key0 >= seqlen_k) return;       // the grid is sized by the longest sequence
  const int keys = min(kBlockN, seqlen_k - key0);
  const SeqRows q_seq = sequence_rows(p.cu_seqlens_q, seq, p.total_q);
  const int q_begin = q_seq.begin, seqlen_q = q_seq.len;
  // The bounds workspace has q_tiles_stride tiles (sized by the max_seqlen_q hint): a hint below the
  // real length gives wrong gradients for the rows past it, never a read past the workspace.
  const int n_q_tiles = min((seqlen_q + kBlockM - 1) / kBlockM, p.q_tiles_stride);
  const int group = p.h_q / p.h_kv;
  const int head0 = kv_head * group;

  extern __shared__ __align__(128) unsigned char smem_raw[];
  unsigned char* smem = smem_raw + smem_align_pad(smem_u32(smem_raw));  // smem_base.cuh
  Element* sK = reinterpret_cast<Element*>(smem + Kt::kSmemK);
  Element* sV = reinterpret_cast<Element*>(smem + Kt::kSmemV);
  Element* sQ = reinterpret_cast<Element*>(smem + Kt::kSmemQ);
  Element* sDo = reinterpret_cast<Element*>(smem + Kt::kSmemDo);
  Element* sDsTile = reinterpret_cast<Element*>(smem + Kt::kSmemDs);  // unless Kt::kDsInQ
  float* sLse = reinterpret_cast<float*>(smem + Kt::kSmemLse);
  float* sDelta = reinterpret_cast<float*>(smem + Kt::kSmemDelta);
  int* sLimit = reinterpret_cast<int*>(smem + Kt::kSmemLimit);
  int* sScan = reinterpret_cast<int*>(smem + Kt::kSmemScan);

  const int tid = threadIdx.x;
  const int warp = tid / 32, lane = tid % 32;
  const int g = lane / 4, t4 = lane % 4;  // accumulator fragment coordinates

  // ---- 2. K and V of the tile; the first query tile that sees it.
  const TileCopyLane<KvRows> copy_lane(tid);
  const int64_t k_row0 = static_cast<int64_t>(k_begin) + key0;
  const Element* k_base = static_cast<const Element*>(p.k);
  const Element* v_base = static_cast<const Element*>(p.v);
  load_tile_async<KvRows, kBlockN>(
      sK, copy_lane, k_base + k_row0 * p.k_row_stride + kv_head * p.k_head_stride + copy_lane.gmem_offset(p.k_row_stride),
      p.k_row_stride, keys, k_base);
  load_tile_async<KvRows, kBlockN>(
      sV, copy_lane, v_base + k_row0 * p.v_row_stride + kv_head * p.v_head_stride + copy_lane.gmem_offset(p.v_row_stride),
      p.v_row_stride, keys, v_base);
  cp_async_commit();

  Element* dk_out = static_cast<Element*>(p.dk) + k_row0 * p.dk_row_stride + kv_head * p.dk_head_stride;
  Element* dv_out = static_cast<Element*>(p.dv) + k_row0 * p.dv_row_stride + kv_head * p.dv_head_stride;
  const int* bounds = p.q_tile_bounds + 2 * static_cast<int64_t>(seq) * p.q_tiles_stride;
  int m = first_query_tile_seeing<Kt::kNThreads>(bounds, n_q_tiles, key0, sScan);
  if (m >= n_q_tiles) {  // no query sees these keys
    cp_async_wait<0>();
    store_zero_rows<KvRows, kBlockN>(dk_out, p.dk_row_stride, keys, tid);
    store_zero_rows<KvRows, kBlockN>(dv_out, p.dv_row_stride, keys, tid);
    return;
  }

  // Issues the copies of step (query tile m_tile, head head0 + j) into buffer `buf`. Rows past the
  // sequence's end are zero-filled and read nothing (their copies carry a valid fallback address).
  const Element* q_base = static_cast<const Element*>(p.q);
  const Element* do_base = static_cast<const Element*>(p.dout);
  auto load_step = [&](int m_tile, int j, int buf) {
    const int row0 = q_begin + m_tile * kBlockM;
    const int rows = min(kBlockM, seqlen_q - m_tile * kBlockM);
    const int head = head0 + j;
    load_tile_async<KvRows, kBlockM>(sQ + buf * (kBlockM * kHeadDim), copy_lane,
                                     q_base + static_cast<int64_t>(row0) * p.q_row_stride +
                                         static_cast<int64_t>(head) * p.q_head_stride +
                                         copy_lane.gmem_offset(p.q_row_stride),
                                     p.q_row_stride, rows, q_base);
    load_tile_async<KvRows, kBlockM>(sDo + buf * (kBlockM * kHeadDim), copy_lane,
                                     do_base + static_cast<int64_t>(row0) * p.dout_row_stride +
                                         static_cast<int64_t>(head) * p.dout_head_stride +
                                         copy_lane.gmem_offset(p.dout_row_stride),
                                     p.dout_row_stride, rows, do_base);
    if (tid < kBlockM) {
      const bool valid = tid < rows;
      const int64_t lse_at = static_cast<int64_t>(head) * p.lse_head_stride + row0 + tid;
      const int64_t delta_at = static_cast<int64_t>(head) * p.total_q + row0 + tid;
      cp_async_4(smem_u32(sLse + buf * kBlockM + tid), valid ? p.lse + lse_at : p.lse, valid);
      cp_async_4(smem_u32(sDelta + buf * kBlockM + tid), valid ? p.softmax_delta + delta_at : p.softmax_delta, valid);
      cp_async_4(smem_u32(sLimit + buf * kBlockM + tid), valid ? p.kv_limit + row0 + tid : p.kv_limit, valid);
    }
  };

  // Tile bounds are read one tile ahead (peek_*) so that moving to the next tile waits on no load.
  int j = 0;
  int cur_min = bounds[2 * m];
  int peek_min = 0, peek_max = 0;
  if (m + 1 < n_q_tiles) {
    peek_min = bounds[2 * (m + 1)];
    peek_max = bounds[2 * (m + 1) + 1];
  }
  load_step(m, 0, 0);
  cp_async_commit();

  float dk[kDTiles][4], dv[kDTiles][4];
#pragma unroll
  for (int dt = 0; dt < kDTiles; ++dt)
#pragma unroll
    for (int e = 0; e < 4; ++e) dk[dt][e] = dv[dt][e] = 0.f;

  const float scale_log2 = p.softmax_scale * kLog2e;
  // ldmatrix lane addresses (mma_utils.cuh): rows-first for A of [m][k] tiles and .trans B of
  // [k][n] tiles, chunks-first for B of [n][k] tiles and .trans A of [k][m] tiles.
  const uint32_t lane_rows_first = ldmatrix_lane_rows_first<kRowBytes>(lane);
  const uint32_t lane_chunks_first = ldmatrix_lane_chunks_first<kRowBytes>(lane);
  const uint32_t sK_addr = smem_u32(sK), sV_addr = smem_u32(sV), sQ_addr = smem_u32(sQ), sDo_addr = smem_u32(sDo);
  const uint32_t k_warp = sK_addr + warp * 16 * kRowBytes + lane_rows_first;  // A of S^T: this warp's keys
  const uint32_t v_warp = sV_addr + warp * 16 * kRowBytes + lane_rows_first;  // A of dP^T
  const int key_row = key0 + warp * 16 + g;  // the keys of this thread's accumulator rows: +0 and +8

  // ---- 3. The steps.
  for (int step = 0;; ++step) {
    const int buf = step & 1;
    // The next step: the next head of the group, else the next query tile that sees the key tile
    // (tiles in between that see nothing are skipped; with the usual monotone layouts there are none).
    int next_m = m, next_j = j + 1, next_min = cur_min;
    if (next_j == group) {
      next_j = 0;
      next_m = m + 1;
      next_min = peek_min;
      int next_max = peek_max;
      while (next_m < n_q_tiles && !query_tile_sees_key_tile(next_max, key0)) {
        ++next_m;
        if (next_m < n_q_tiles) {
          next_min = bounds[2 * next_m];
          next_max = bounds[2 * next_m + 1];
        }
      }
    }
    const bool has_next = next_m < n_q_tiles;
    int next_peek_min = peek_min, next_peek_max = peek_max;
    if (has_next && next_j == 0 && next_m + 1 < n_q_tiles) {
      next_peek_min = bounds[2 * (next_m + 1)];
      next_peek_max = bounds[2 * (next_m + 1) + 1];
    }

    // Step `step` has landed; after the barrier every warp is done with step - 1, whose buffers
    // (and the dS tile) can be overwritten.
    cp_async_wait<0>();
    __syncthreads();
    if (has_next) {
      load_step(next_m, next_j, buf ^ 1);
      cp_async_commit();
    }

    const bool full = key_tile_is_full(cur_min, key0, kBlockN);  // every query of the tile sees every key
    const uint32_t q_addr = sQ_addr + buf * (kBlockM * kRowBytes);
    const uint32_t do_addr = sDo_addr + buf * (kBlockM * kRowBytes);
    const float* lse_s = sLse + buf * kBlockM;
    const float* delta_s = sDelta + buf * kBlockM;
    const int* limit_s = sLimit + buf * kBlockM;

    // S^T = K Q^T: 16 keys x kBlockM queries per warp; the Q tile is [query][d] = [n][k].
    float st[kSTiles][4];
    warp_mma_rows_by_rows_t<Element, KvRows, Kt::kQKSteps>(st, k_warp, q_addr + lane_chunks_first);
    // P^T from the saved lse, packed at once into A operands over k16 steps of queries (two adjacent
    // n8 tiles of the accumulator are one A fragment, as the forward's P), so that only 16-bit P^T
    // is live while dP^T is computed. Element e of n-tile nt: key key_row + 8 (e / 2), query
    // nt 8 + 2 t4 + e % 2.
    uint32_t p_frag[kQSteps][4];
#pragma unroll
    for (int nt = 0; nt < kSTiles; ++nt) {
      const int col = nt * 8 + 2 * t4;
      const float2 lse = *reinterpret_cast<const float2*>(lse_s + col);
      const float lse2[2] = {lse.x * kLog2e, lse.y * kLog2e};
#pragma unroll
      for (int e = 0; e < 4; ++e) st[nt][e] = fast_exp2(fmaf(st[nt][e], scale_log2, -lse2[e % 2]));
      if (!full) {
        const int2 lim = *reinterpret_cast<const int2*>(limit_s + col);
        const int limits[2] = {lim.x, lim.y};
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          if (key_row + 8 * (e / 2) >= limits[e % 2]) st[nt][e] = 0.f;
        }
      }
      p_frag[nt / 2][2 * (nt % 2)] = pack_float2<Element>(st[nt][0], st[nt][1]);
      p_frag[nt / 2][2 * (nt % 2) + 1] = pack_float2<Element>(st[nt][2], st[nt][3]);
    }

    // dV += P^T dO: the dO tile is [query][d] = [k][n].
    warp_mma_regs_by_rows<Element, KvRows>(dv, p_frag, do_addr + lane_rows_first);

    // dP^T = V dO^T, then dS^T = P^T (dP^T - delta) in place, with P^T read back from its 16-bit
    // fragments (the rounding that the dV product already used).
    float dpt[kSTiles][4];
    warp_mma_rows_by_rows_t<Element, KvRows, Kt::kQKSteps>(dpt, v_warp, do_addr + lane_chunks_first);
    uint32_t ds_frag[kQSteps][4];
#pragma unroll
    for (int nt = 0; nt < kSTiles; ++nt) {
      const float2 delta = *reinterpret_cast<const float2*>(delta_s + nt * 8 + 2 * t4);
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const float2 prob = unpack_float2<Element>(p_frag[nt / 2][2 * (nt % 2) + h]);
        ds_frag[nt / 2][2 * (nt % 2) + h] = pack_float2<Element>(prob.x * (dpt[nt][2 * h] - delta.x),
                                                                 prob.y * (dpt[nt][2 * h + 1] - delta.y));
      }
    }

    // dK += dS^T Q, as dV with the Q tile.
    warp_mma_regs_by_rows<Element, KvRows>(dk, ds_frag, q_addr + lane_rows_first);

    if constexpr (kAtomicDq) {
      // dS^T to shared memory ([key][query]); A fragment register i of step kk holds rows g (i even)
      // or g + 8 (i odd) and query chunk 2 kk (i < 2) or 2 kk + 1. In the Q buffer (kDsInQ) only
      // once every warp is done with Q; the barrier at the top of the next step keeps it until the
      // dQ product has read it, before the buffer takes the copies of step + 2.
      Element* sDs = Kt::kDsInQ ? sQ + buf * (kBlockM * kHeadDim) : sDsTile;
      if constexpr (Kt::kDsInQ) __syncthreads();
#pragma unroll
      for (int kk = 0; kk < kQSteps; ++kk) {
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          const int row = warp * 16 + g + 8 * (i % 2);
          *reinterpret_cast<uint32_t*>(sDs + DsRows::swizzle(row, 2 * kk + i / 2) + 2 * t4) = ds_frag[kk][i];
        }
      }
      __syncthreads();
      // dQ(step) = dS K over the tile's kBlockN keys: warp (wm, wd) owns query rows [16 wm, 16 wm + 16)
      // and d columns [kDqCols wd, kDqCols (wd + 1)), in passes of kDqPassCols columns: a single pass
      // but in the small d = 128 tiles, where a warp owns all 128 columns and 64 floats of dQ at once
      // spilled. A = dS from the [key][query] tile (.trans, chunks first), B = K as [key][d] = [k][n]
      // (.trans, rows first).
      const int wm = warp % Kt::kDqWarpsM, wd = warp / Kt::kDqWarpsM;
      const uint32_t ds_lane = (smem_u32(sDs) + ldmatrix_lane_chunks_first<DsRows::kRowBytes>(lane)) ^
                               DsRows::chunk_pair_xor(wm);
      const int rows = min(kBlockM, seqlen_q - m * kBlockM);
      const int64_t acc_row_stride = static_cast<int64_t>(p.h_q) * kHeadDim;
      const int r = wm * 16 + g;
      const float scale = p.softmax_scale;
#pragma unroll
      for (int pass = 0; pass < Kt::kDqPasses; ++pass) {
        constexpr int kPassTiles = Kt::kDqPassCols / 8;
        const int pair0 = wd * (Kt::kDqTiles / 2) + pass * (kPassTiles / 2);  // the pass's first chunk pair
        float dq[kPassTiles][4];
#pragma unroll
        for (int dt = 0; dt < kPassTiles; ++dt)
#pragma unroll
          for (int e = 0; e < 4; ++e) dq[dt][e] = 0.f;
#pragma unroll
        for (int ks = 0; ks < Kt::kKeySteps; ++ks) {
          uint32_t a[4];
          ldmatrix_x4_trans(a, ds_lane + ks * 16 * DsRows::kRowBytes);
#pragma unroll
          for (int dp = 0; dp < kPassTiles / 2; ++dp) {
            uint32_t b[4];
            ldmatrix_x4_trans(b, ((sK_addr + lane_rows_first) ^ KvRows::chunk_pair_xor(pair0 + dp)) +
                                     ks * 16 * kRowBytes);
            mma_m16n8k16<Element>(dq[2 * dp], a, b[0], b[1]);
            mma_m16n8k16<Element>(dq[2 * dp + 1], a, b[2], b[3]);
          }
        }
        float* acc = p.dq_accum + static_cast<int64_t>(q_begin + m * kBlockM) * acc_row_stride +
                     static_cast<int64_t>(head0 + j) * kHeadDim + wd * Kt::kDqCols + pass * Kt::kDqPassCols + 2 * t4;
#pragma unroll
        for (int dt = 0; dt < kPassTiles; ++dt) {
          if (r < rows) atomic_add_float2(acc + r * acc_row_stride + dt * 8, dq[dt][0] * scale, dq[dt][1] * scale);
          if (r + 8 < rows) {
            atomic_add_float2(acc + (r + 8) * acc_row_stride + dt * 8, dq[dt][2] * scale, dq[dt][3] * scale);
          }
        }
      }
    }

    if (!has_next) break;
    m = next_m;
    j = next_j;
    cur_min = next_min;
    peek_min = next_peek_min;
    peek_max = next_peek_max;
  }

  // ---- 4. Epilogue: dK = softmax_scale * sum dS^T Q and dV, staged in the Q and dO buffers.
  __syncthreads();  // every warp is done reading Q and dO
  Element* sDk = sQ;
  Element* sDv = sDo;
  const float scale = p.softmax_scale;
#pragma unroll
  for (int dt = 0; dt < kDTiles; ++dt) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int row = warp * 16 + g + 8 * h;
      *reinterpret_cast<uint32_t*>(sDk + KvRows::swizzle(row, dt) + 2 * t4) =
          pack_float2<Element>(dk[dt][2 * h] * scale, dk[dt][2 * h + 1] * scale);
      *reinterpret_cast<uint32_t*>(sDv + KvRows::swizzle(row, dt) + 2 * t4) =
          pack_float2<Element>(dv[dt][2 * h], dv[dt][2 * h + 1]);
    }
  }
  __syncthreads();
  store_tile<KvRows, kBlockN>(sDk, dk_out, p.dk_row_stride, keys, tid);
  store_tile<KvRows, kBlockN>(sDv, dv_out, p.dv_row_stride, keys, tid);
#else
  __trap();  // sm_80+ only; the host refuses older devices before launch
#endif
}

}  // namespace ism::cuda
