// The per-key-tile steps that the forward kernel (segment_attn_fwd_kernel.cuh) and the KV-cache kernel
// (kvcache_attn_kernel.cuh) share, on mma.m16n8k16 accumulator fragments in registers: the kv_limit
// mask on S, and O += P V with P taken straight from S's registers.
//
// Kt: the kernel's traits (kMTiles row blocks of 16, kSTiles n8 tiles of S, kOTiles n8 tiles of O,
// kPVSteps k16 steps over the tile's keys, kRowBytes and chunk_pair_xor of the swizzled V tile).
#pragma once

#include <cmath>
#include <cstdint>

#include "mma_utils.cuh"

namespace ism::cuda {

// Scores of keys at or past a row's limit become -inf. Element e of n-tile nt is row g + 8 (e / 2),
// key key0 + 8 nt + 2 t4 + e % 2 (key0: the first key of the tile that this warp computes).
template <typename Kt>
__device__ __forceinline__ void mask_scores(float (&s)[Kt::kMTiles][Kt::kSTiles][4],
                                            const int (&row_limit)[Kt::kMTiles][2], int key0, int t4) {
#pragma unroll
  for (int mi = 0; mi < Kt::kMTiles; ++mi)
#pragma unroll
    for (int nt = 0; nt < Kt::kSTiles; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        if (key0 + nt * 8 + 2 * t4 + (e % 2) >= row_limit[mi][e / 2]) s[mi][nt][e] = -INFINITY;
      }
}

// O += P V for one key tile. The probabilities of two adjacent n8 tiles of S are exactly one k16
// step's A fragment (accumulator and A fragments share the row / column-pair layout): a0 = tile 2kk
// rows g, a1 = tile 2kk rows g+8, a2 = tile 2kk+1 rows g, a3 = tile 2kk+1 rows g+8; packed first, so
// that the floats die early. V is [key][d] in shared memory, row-major for B[k = key][n = d]:
// ldmatrix.trans gives the column-major fragment. One x4.trans at v_base (this warp's keys, chunk
// pair 0; lane address rows first) covers 16 keys x 16 d: matrix 0 = keys 0-7 / d 0-7 (b0 of d-tile
// 2dp), 1 = keys 8-15 / d 0-7 (b1 of 2dp), 2 = keys 0-7 / d 8-15 (b0 of 2dp+1), 3 = keys 8-15 /
// d 8-15 (b1 of 2dp+1), and feeds every row block.
template <typename Kt>
__device__ __forceinline__ void accumulate_pv(float (&o)[Kt::kMTiles][Kt::kOTiles][4],
                                              const float (&s)[Kt::kMTiles][Kt::kSTiles][4], uint32_t v_base) {
  using Element = typename Kt::Element;
  uint32_t p_frag[Kt::kMTiles][Kt::kPVSteps][4];
#pragma unroll
  for (int mi = 0; mi < Kt::kMTiles; ++mi) {
#pragma unroll
    for (int kk = 0; kk < Kt::kPVSteps; ++kk) {
      p_frag[mi][kk][0] = pack_float2<Element>(s[mi][2 * kk][0], s[mi][2 * kk][1]);
      p_frag[mi][kk][1] = pack_float2<Element>(s[mi][2 * kk][2], s[mi][2 * kk][3]);
      p_frag[mi][kk][2] = pack_float2<Element>(s[mi][2 * kk + 1][0], s[mi][2 * kk + 1][1]);
      p_frag[mi][kk][3] = pack_float2<Element>(s[mi][2 * kk + 1][2], s[mi][2 * kk + 1][3]);
    }
  }
#pragma unroll
  for (int dp = 0; dp < Kt::kOTiles / 2; ++dp) {
    const uint32_t v_addr = v_base ^ Kt::chunk_pair_xor(dp);
#pragma unroll
    for (int kk = 0; kk < Kt::kPVSteps; ++kk) {
      uint32_t b[4];
      ldmatrix_x4_trans(b, v_addr + kk * 16 * Kt::kRowBytes);
#pragma unroll
      for (int mi = 0; mi < Kt::kMTiles; ++mi) {
        mma_m16n8k16<Element>(o[mi][2 * dp], p_frag[mi][kk], b[0], b[1]);
        mma_m16n8k16<Element>(o[mi][2 * dp + 1], p_frag[mi][kk], b[2], b[3]);
      }
    }
  }
}

}  // namespace ism::cuda
