// Online softmax of the forward kernel on MMA accumulator fragments, in registers.
//
// A thread holds, for each m16 row block of its warp, two rows (g and g + 8, g = lane / 4) and two
// columns of each n8 tile of those rows. The four lanes of a quad (same g) together hold a whole
// row, so a row reduction is the thread's own columns plus two __shfl_xor_sync steps (xor 1, xor 2).
//
// Scores arrive raw (Q K^T, masked entries at -inf). softmax_scale * log2(e) = `scale_log2` is folded
// into the exponent, exp2(s * scale_log2 - max * scale_log2): one FFMA per score instead of a
// multiply and a subtract. That needs scale_log2 > 0, so that the raw max is the scaled max and
// -inf * scale_log2 stays -inf; positive_scale_log2() below gives it to every kernel (a negative scale
// negates Q instead, a zero scale runs as a tiny positive one). The running max is kept in the raw
// domain.
//
// NaN in, NaN out: fmaxf drops a NaN score from the running max, but its exp2 is NaN, so the row's
// sum and output become NaN and row_normaliser() passes it on to the output and the lse.
#pragma once

#include <cmath>
#include <cstdint>

#include "../attn_constants.h"
#include "mma_utils.cuh"

namespace ism::cuda {

// softmax_scale as the online softmaxes take it (this file, hopper_fwd_kernel.cuh), for every kernel:
// scale_log2 = |softmax_scale| * log2(e), which must be positive. A negative scale calls negate_q(),
// which negates the kernel's Q instead (s * q . k = |s| * (-q) . k; negate_halves() is exact in bf16
// and fp16). A zero (or denormal) scale runs as 1e-30: every visible score times it rounds to 0 next
// to 1, so the probabilities are the same uniform ones, and -inf stays -inf (0 * -inf would be NaN).
template <typename NegateQ>
__device__ __forceinline__ float positive_scale_log2(float softmax_scale, NegateQ&& negate_q) {
  float scale_log2 = softmax_scale * kLog2e;
  if (scale_log2 < 0.f) {
    scale_log2 = -scale_log2;
    negate_q();
  }
  return fmaxf(scale_log2, 1e-30f);
}

// Both 16-bit halves of a register negated: the sign is the top bit of each half in bf16 and fp16.
__device__ __forceinline__ uint32_t negate_halves(uint32_t x) { return x ^ 0x80008000u; }

// Q's A fragments (ldmatrix, [row blocks][k16 steps][4]) negated in registers, for a negative scale.
template <int kRowBlocks, int kSteps>
__device__ __forceinline__ void negate_q_fragments(uint32_t (&q_frag)[kRowBlocks][kSteps][4]) {
#pragma unroll
  for (int mi = 0; mi < kRowBlocks; ++mi)
#pragma unroll
    for (int kk = 0; kk < kSteps; ++kk)
#pragma unroll
      for (int i = 0; i < 4; ++i) q_frag[mi][kk][i] = negate_halves(q_frag[mi][kk][i]);
}

// A finished row: from its raw max and its sum of exp2 terms, the factor that normalises its output
// and its natural-log lse. A row that saw no key has a sum of exactly 0 (every exp2 of -inf is +0):
// factor 0 (output 0, never 0/0) and lse -inf. Any other sum is at least 1 (the max's own term is
// exp2(0)) or NaN, where a NaN reached the scores; 1 / NaN and log2(NaN) then carry it to the output
// and the lse. Hence `sum == 0`, never `sum > 0`, which would turn a NaN row into an empty one.
__device__ __forceinline__ void row_normaliser(float raw_max, float sum, float scale_log2, float& inv_sum,
                                               float& lse) {
  const bool empty = sum == 0.f;
  inv_sum = empty ? 0.f : 1.f / sum;
  lse = empty ? -INFINITY : fmaf(raw_max, scale_log2, log2f(sum)) * kLn2;
}

__device__ __forceinline__ float quad_max(float x) {
  x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 1));
  return fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 2));
}

__device__ __forceinline__ float quad_sum(float x) {
  x += __shfl_xor_sync(0xffffffffu, x, 1);
  return x + __shfl_xor_sync(0xffffffffu, x, 2);
}

template <int kMTiles, int kSTiles, int kOTiles>
struct OnlineSoftmax {
  float row_max[kMTiles][2];  // running max (log2 domain) of rows g, g + 8 of each row block
  float row_sum[kMTiles][2];  // running sum of this thread's columns only; quad-reduced at the end

  __device__ __forceinline__ OnlineSoftmax() {
#pragma unroll
    for (int mi = 0; mi < kMTiles; ++mi) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        row_max[mi][h] = -INFINITY;
        row_sum[mi][h] = 0.f;
      }
    }
  }

  // One key tile: s (raw scores, -inf where masked) becomes the unnormalised probabilities
  // exp2((s - max) * scale_log2), and the output accumulator o is rescaled to the new max.
  __device__ __forceinline__ void update(float (&s)[kMTiles][kSTiles][4], float (&o)[kMTiles][kOTiles][4],
                                         float scale_log2) {
#pragma unroll
    for (int mi = 0; mi < kMTiles; ++mi) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        float tile_max = -INFINITY;
#pragma unroll
        for (int nt = 0; nt < kSTiles; ++nt) tile_max = fmaxf(tile_max, fmaxf(s[mi][nt][2 * h], s[mi][nt][2 * h + 1]));
        tile_max = quad_max(tile_max);
        const float old_max = row_max[mi][h];
        const float new_max = fmaxf(old_max, tile_max);
        // A row that has seen nothing visible yet keeps max = -inf. Subtracting 0 instead keeps every
        // exp2 argument at -inf (-> 0) and never forms (-inf) - (-inf) = NaN; the CPU kernel's
        // softmax_tile_update guards the same case (tile_math.cpp). alpha is then exp2(-inf) = 0,
        // which is also right when old_max = -inf and new_max is finite (o and the sum are still 0).
        const float offset = new_max == -INFINITY ? 0.f : new_max * scale_log2;
        const float alpha = fast_exp2(fmaf(old_max, scale_log2, -offset));
        row_max[mi][h] = new_max;
        float sum = 0.f;
#pragma unroll
        for (int nt = 0; nt < kSTiles; ++nt) {
#pragma unroll
          for (int e = 2 * h; e < 2 * h + 2; ++e) {
            s[mi][nt][e] = fast_exp2(fmaf(s[mi][nt][e], scale_log2, -offset));
            sum += s[mi][nt][e];
          }
        }
        // alpha is the same on the 4 lanes of the quad (the max was quad-reduced), so the partial
        // sums can be rescaled independently and added up once, after the last tile.
        row_sum[mi][h] = row_sum[mi][h] * alpha + sum;
#pragma unroll
        for (int dt = 0; dt < kOTiles; ++dt) {
          o[mi][dt][2 * h] *= alpha;
          o[mi][dt][2 * h + 1] *= alpha;
        }
      }
    }
  }

  // After the last tile: the factor that normalises row (mi, h) and its natural-log lse
  // (row_normaliser: an empty row gets output 0 and lse -inf, a NaN row NaN).
  __device__ __forceinline__ void finish(int mi, int h, float scale_log2, float& inv_sum, float& lse) const {
    row_normaliser(row_max[mi][h], quad_sum(row_sum[mi][h]), scale_log2, inv_sum, lse);
  }

  // The epilogues' walk over this thread's rows: f(mi, h, row, inv_sum, lse) for row block mi, half h,
  // with `row` counted in the tile (the warp's rows start at warp_row0) and the row's finish().
  template <typename F>
  __device__ __forceinline__ void for_each_finished_row(int warp_row0, int lane, float scale_log2, F&& f) const {
#pragma unroll
    for (int mi = 0; mi < kMTiles; ++mi) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        float inv_sum, lse;
        finish(mi, h, scale_log2, inv_sum, lse);
        f(mi, h, warp_row0 + mi * 16 + lane / 4 + 8 * h, inv_sum, lse);
      }
    }
  }
};

}  // namespace ism::cuda
