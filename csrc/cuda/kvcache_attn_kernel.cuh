// The CUDA kernel of `ism::attn_with_kvcache`: append this call's new K/V rows into the cache in place
// and attend the new queries over the updated cache with the kv_limit rule, in one launch. A thread block
// owns one tile of the packed query rows of a (sequence, K/V head) (kvcache_rows.cuh) and one chunk of
// its keys (kvcache_plan.h):
//
//   1. Q rows in flight (cp.async); each row's kv_limit, clamped into [0, cached + new]; the tile's
//      smallest and largest limit; the block's key chunk of the keys below the largest.
//   2. The first kStages - 1 K/V tiles in flight from the cache or, for this call's positions, from
//      k_new / v_new (kvcache_key_source.cuh); meanwhile the block's share of the append.
//   3. Q to registers (ldmatrix), once.
//   4. The key loop over a ring of kStages K/V buffers: S = Q K^T, the per-row mask on tiles some row
//      cannot see entirely (tile_range.h), online softmax (exp2, scale folded in), O += P V with P kept
//      in registers. kGroup: warp w computes keys [16 w, 16 w + 16) of each tile for all 16 rows; kRows:
//      warp w computes its rows against the whole tile (kvcache_kernel_traits.h).
//   5. kGroup merges the warps' states; the rows go out as the op's output, or as the chunk's partials
//      when the keys are split (kvcache_epilogue.cuh).
//
// Index values were checked on the host before the launch (the op copies the small index tensors to
// the host once); the clamps here only keep every address inside the tensors.
#pragma once

#include <cstdint>

#include "../tile_range.h"
#include "kvcache_append.cuh"
#include "kvcache_epilogue.cuh"
#include "kvcache_key_source.cuh"
#include "kvcache_kernel_traits.h"
#include "kvcache_plan.h"
#include "kvcache_rows.cuh"
#include "mma_utils.cuh"
#include "online_softmax.cuh"
#include "score_tile.cuh"
#include "smem_base.cuh"
#include "warp_mma.cuh"

namespace ism::cuda {

template <typename Kt>
__global__ void __launch_bounds__(Kt::kNThreads) kvcache_attn_kernel(const KVCacheKernelParams p) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  using Element = typename Kt::Element;
  using Rows = typename Kt::Rows;
  constexpr int kBlockM = Kt::kBlockM, kBlockN = Kt::kBlockN, kStages = Kt::kStages;
  constexpr int kMTiles = Kt::kMTiles, kNWarps = Kt::kNWarps;

  const KVCacheBlock blk = kvcache_block<kBlockM>(p);
  extern __shared__ __align__(128) unsigned char smem_raw[];
  const uint32_t smem_pad = smem_align_pad(smem_u32(smem_raw));
  Element* smem = reinterpret_cast<Element*>(smem_raw + smem_pad);
  Element* sQ = smem + Kt::kSmemQ;
  Element* sK = smem + Kt::kSmemK;  // kStages buffers
  Element* sV = smem + Kt::kSmemV;  // kStages buffers
  int* sLimit = reinterpret_cast<int*>(smem_raw + smem_pad + Kt::kSmemTileBytes);  // [kBlockM]
  int* sReduce = sLimit + kBlockM;                                                  // [2 * kNWarps]
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const TileCopyLane<Rows> copy_lane(tid);

  // ---- 1. Q in flight; the rows' limits and the block's chunk of the keys.
  load_packed_q_async<Rows, kBlockM>(sQ, copy_lane, p, blk);
  cp_async_commit();
  const int2 bounds = load_packed_limits<kBlockM, kNWarps>(p, blk, sLimit, sReduce);
  const int min_limit = bounds.x;
  const KeyChunk chunk = key_chunk(bounds.y, p.num_splits, blk.split, kBlockN);
  const int n_tiles = key_tiles_to_visit(chunk.end - chunk.begin, kBlockN);

  // ---- 2. Tiles 0 .. kStages - 2 in flight (one group each, empty past the chunk), then the append.
  const KeySource src = key_source(p, blk);
#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < n_tiles) {
      load_key_tile<Rows, kBlockN, Kt::kKeyLoadUnroll>(sK + s * Kt::kKVElems, sV + s * Kt::kKVElems, copy_lane, src,
                                                       p, chunk.begin + s * kBlockN, chunk.end);
    }
    cp_async_commit();
  }
  append_new_rows<Kt>(p, blk, src);

  // ---- 3. Q to registers: kGroup warps all take the 16 rows, kRows warps their own.
  cp_async_wait<kStages - 1>();  // the Q group is complete
  __syncthreads();
  const int r8 = lane % 8, bit3 = (lane / 8) % 2, bit4 = lane / 16;
  const int g = lane / 4, t4 = lane % 4;
  const int warp_row0 = Kt::kWarpsSplitKeys ? 0 : warp * Kt::kWarpRows;
  const int warp_key0 = Kt::kWarpsSplitKeys ? warp * Kt::kWarpKeys : 0;
  uint32_t q_frag[kMTiles][Kt::kQKSteps][4];
#pragma unroll
  for (int mi = 0; mi < kMTiles; ++mi)
#pragma unroll
    for (int kk = 0; kk < Kt::kQKSteps; ++kk)
      ldmatrix_x4(q_frag[mi][kk], smem_u32(sQ + Kt::swizzle(warp_row0 + mi * 16 + r8 + bit3 * 8, 2 * kk + bit4)));
  int row_limit[kMTiles][2];
#pragma unroll
  for (int mi = 0; mi < kMTiles; ++mi) {
    row_limit[mi][0] = sLimit[warp_row0 + mi * 16 + g];
    row_limit[mi][1] = sLimit[warp_row0 + mi * 16 + g + 8];
  }
  float o[kMTiles][Kt::kOTiles][4];
#pragma unroll
  for (int mi = 0; mi < kMTiles; ++mi)
#pragma unroll
    for (int dt = 0; dt < Kt::kOTiles; ++dt)
#pragma unroll
      for (int e = 0; e < 4; ++e) o[mi][dt][e] = 0.f;
  OnlineSoftmax<kMTiles, Kt::kSTiles, Kt::kOTiles> softmax;
  // softmax_scale * log2(e), positive, for the online softmax; a negative scale negates Q (online_softmax.cuh).
  const float scale_log2 = positive_scale_log2(p.softmax_scale, [&] { negate_q_fragments(q_frag); });
  // ldmatrix lane addresses for chunk pair 0 of this warp's keys: K plain (chunks first), V .trans (rows first).
  const uint32_t k_lane = ldmatrix_lane_chunks_first<Kt::kRowBytes>(lane) + warp_key0 * Kt::kRowBytes;
  const uint32_t v_lane = ldmatrix_lane_rows_first<Kt::kRowBytes>(lane) + warp_key0 * Kt::kRowBytes;
  const uint32_t sK_addr = smem_u32(sK), sV_addr = smem_u32(sV);

  // ---- 4. The key loop. Tile kt sits in buffer kt % kStages; after the barrier every warp is done with
  // tile kt - 1, whose buffer takes tile kt + kStages - 1. One group is committed per iteration (empty
  // at the end) so that "tile kt has landed" is always wait_group<kStages - 2>.
  for (int kt = 0; kt < n_tiles; ++kt) {
    const int stage = kt % kStages;
    const int k0 = chunk.begin + kt * kBlockN;
    cp_async_wait<kStages - 2>();
    __syncthreads();
    if (kt + kStages - 1 < n_tiles) {
      const int next = (kt + kStages - 1) % kStages;
      load_key_tile<Rows, kBlockN, Kt::kKeyLoadUnroll>(sK + next * Kt::kKVElems, sV + next * Kt::kKVElems, copy_lane,
                                                       src, p, k0 + (kStages - 1) * kBlockN, chunk.end);
    }
    cp_async_commit();

    float s[kMTiles][Kt::kSTiles][4];
    warp_mma_regs_by_rows_t<Element, Rows>(s, q_frag, sK_addr + stage * (Kt::kKVElems * 2) + k_lane);
    if (!key_tile_is_full(min_limit, k0, kBlockN)) mask_scores<Kt>(s, row_limit, k0 + warp_key0, t4);
    softmax.update(s, o, scale_log2);
    accumulate_pv<Kt>(o, s, sV_addr + stage * (Kt::kKVElems * 2) + v_lane);
  }

  // ---- 5. Epilogue.
  if constexpr (Kt::kWarpsSplitKeys) {
    cp_async_wait<0>();  // only empty groups can be left; the barrier frees the K/V buffers for the merge
    __syncthreads();
    merge_warps_and_store<Kt>(softmax, o, scale_log2, reinterpret_cast<float*>(sK), p, blk);
  } else {
    store_rows_of_warps<Kt>(softmax, o, scale_log2, sQ, p, blk);
  }
#else
  // The data path needs sm_80 (cp.async, bf16 mma); the op refuses older devices before the launch.
  __trap();
#endif
}

}  // namespace ism::cuda
