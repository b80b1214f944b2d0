// Float32 tile routines of the CPU kernels: a small GEMM and the softmax steps.
//
// The attention kernels convert every tile to float32 first, so these routines see only float
// buffers and are compiled once for each x86-64 level (see tile_math.cpp); the per-dtype kernels
// stay plain templates. Column counts passed as `n_pad`/`n` are multiples of kLanes: buffers are
// padded with zeros so that the vector code needs no tail loop.
#pragma once

#include <cstdint>

namespace ism::cpu {

constexpr int kLanes = 16;  // floats per vector of the tile routines (one AVX-512 / two AVX2 registers)

inline int round_up_lanes(int x) { return (x + kLanes - 1) / kLanes * kLanes; }

// C[m x n] = A[m x k] * B[k x n]  (or += when `accumulate`).
// A's element (i, p) is a[i * a_row_stride + p * a_col_stride], so A may be a transposed view;
// B is row-major with leading dimension ldb; C row-major with ldc; n % kLanes == 0.
void gemm_f32(int m, int n, int k, const float* a, int64_t a_row_stride, int64_t a_col_stride,
              const float* b, int64_t ldb, float* c, int64_t ldc, bool accumulate);

// One online-softmax step of the forward pass on a tile of scores already in the log2 domain.
// Row r sees the first visible[r] columns (the rest are masked). Updates row_max / row_sum,
// rescales acc row r (d_pad columns) by exp2(old_max - new_max), and overwrites s with the
// unnormalised probabilities exp2(s - new_max) (0 where masked).
void softmax_tile_update(float* s, int m, int n_pad, const int* visible, float* row_max,
                         float* row_sum, float* acc, int64_t ld_acc, int d_pad);

// Backward: s[r][j] = exp2(s[r][j] - lse2[r]) for j < visible[r], else 0 (in place).
void probs_from_lse(float* s, int m, int n_pad, const int* visible, const float* lse2);

// Backward: dp[r][j] = p[r][j] * (dp[r][j] - delta[r]) (in place): the score gradient.
void score_grad(const float* p, float* dp, int m, int n_pad, const float* delta);

}  // namespace ism::cpu
