// Warp-level tile products of the kernels on mma.sync m16n8k16 (float accumulation): one warp
// computes 16 rows of the result (or kMBlocks blocks of 16 rows), reading its operands from
// registers or from swizzled row tiles in shared memory (swizzled_rows.h) by ldmatrix.
//
// Lane addresses are formed once by the caller for chunk pair 0 (mma_utils.cuh
// ldmatrix_lane_rows_first / _chunks_first, plus the tile's shared-memory address); a k16 step or an
// n16 block is then 16 rows further, a d chunk pair one Rows::chunk_pair_xor away.
#pragma once

#include <cstdint>

#include "mma_utils.cuh"

namespace ism::cuda {

// acc += A B. A: 16 x 16 kKSteps in A-operand fragments (registers, one per k16 step). B: a
// [k][n] row tile (16 kKSteps rows of n = 8 kNTiles columns) at `b_lane` (rows first), read with
// ldmatrix.trans. Examples: dV += P^T dO, dK += dS^T Q, dQ += dS K.
template <typename Element, typename Rows, int kKSteps, int kNTiles>
__device__ __forceinline__ void warp_mma_regs_by_rows(float (&acc)[kNTiles][4], const uint32_t (&a)[kKSteps][4],
                                                      uint32_t b_lane) {
  static_assert(kNTiles % 2 == 0, "one ldmatrix x4 feeds two n8 tiles");
#pragma unroll
  for (int np = 0; np < kNTiles / 2; ++np) {
#pragma unroll
    for (int kk = 0; kk < kKSteps; ++kk) {
      uint32_t b[4];
      ldmatrix_x4_trans(b, (b_lane ^ Rows::chunk_pair_xor(np)) + kk * 16 * Rows::kRowBytes);
      mma_m16n8k16<Element>(acc[2 * np], a[kk], b[0], b[1]);
      mma_m16n8k16<Element>(acc[2 * np + 1], a[kk], b[2], b[3]);
    }
  }
}

// acc = A B^T. A: this warp's 16 rows of a [m][k] row tile at `a_lane` (rows first, the warp's
// first row included). B: a [n][k] row tile of n = 8 kNTiles rows at `b_lane` (chunks first).
// k = 16 kKSteps. Examples: S^T = K Q^T, dP^T = V dO^T.
template <typename Element, typename Rows, int kKSteps, int kNTiles>
__device__ __forceinline__ void warp_mma_rows_by_rows_t(float (&acc)[kNTiles][4], uint32_t a_lane, uint32_t b_lane) {
  static_assert(kNTiles % 2 == 0, "one ldmatrix x4 feeds two n8 tiles");
#pragma unroll
  for (int nt = 0; nt < kNTiles; ++nt)
#pragma unroll
    for (int e = 0; e < 4; ++e) acc[nt][e] = 0.f;
#pragma unroll
  for (int kk = 0; kk < kKSteps; ++kk) {
    uint32_t a[4];
    ldmatrix_x4(a, a_lane ^ Rows::chunk_pair_xor(kk));
#pragma unroll
    for (int np = 0; np < kNTiles / 2; ++np) {
      uint32_t b[4];
      ldmatrix_x4(b, (b_lane ^ Rows::chunk_pair_xor(kk)) + np * 16 * Rows::kRowBytes);
      mma_m16n8k16<Element>(acc[2 * np], a, b[0], b[1]);
      mma_m16n8k16<Element>(acc[2 * np + 1], a, b[2], b[3]);
    }
  }
}

// acc = A B^T for kMBlocks row blocks of 16 at once. A: each block's 16 x 16 kKSteps in A-operand
// fragments (registers, one per k16 step). B: a [n][k] row tile of n = 8 kNTiles rows at `b_lane`
// (chunks first), read with plain ldmatrix: a [key][d] tile is exactly the column-major B operand of
// m16n8k16 (B[k = d][n = key]). One x4 covers 16 rows x 16 k: matrix 0 = rows 0-7 / k 0-7 (b0 of
// n-tile 2np), 1 = rows 0-7 / k 8-15 (b1 of 2np), 2 = rows 8-15 / k 0-7 (b0 of 2np+1), 3 = rows 8-15
// / k 8-15 (b1 of 2np+1), and feeds every row block. Example: S = Q K^T of the forward.
template <typename Element, typename Rows, int kMBlocks, int kKSteps, int kNTiles>
__device__ __forceinline__ void warp_mma_regs_by_rows_t(float (&acc)[kMBlocks][kNTiles][4],
                                                        const uint32_t (&a)[kMBlocks][kKSteps][4], uint32_t b_lane) {
  static_assert(kNTiles % 2 == 0, "one ldmatrix x4 feeds two n8 tiles");
#pragma unroll
  for (int mi = 0; mi < kMBlocks; ++mi)
#pragma unroll
    for (int nt = 0; nt < kNTiles; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[mi][nt][e] = 0.f;
#pragma unroll
  for (int kk = 0; kk < kKSteps; ++kk) {
    const uint32_t b_addr = b_lane ^ Rows::chunk_pair_xor(kk);
#pragma unroll
    for (int np = 0; np < kNTiles / 2; ++np) {
      uint32_t b[4];
      ldmatrix_x4(b, b_addr + np * 16 * Rows::kRowBytes);
#pragma unroll
      for (int mi = 0; mi < kMBlocks; ++mi) {
        mma_m16n8k16<Element>(acc[mi][2 * np], a[mi][kk], b[0], b[1]);
        mma_m16n8k16<Element>(acc[mi][2 * np + 1], a[mi][kk], b[2], b[3]);
      }
    }
  }
}

}  // namespace ism::cuda
