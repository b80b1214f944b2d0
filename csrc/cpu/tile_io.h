// Moving tiles between the tensors (any of float/half/bfloat16, strided rows) and the float32
// scratch buffers of the CPU kernels. Padding is always written as zeros so that the vector code of
// tile_math.cpp can run over whole padded rows without reading stale values.
#pragma once

#include <algorithm>
#include <cstdint>

namespace ism::cpu {

// dst[r][c] = scale * src[r * row_stride + c] for r < rows, c < cols; zeros in c in [cols, ld).
template <typename T>
void load_tile(const T* src, int64_t row_stride, int rows, int cols, float scale, float* dst, int ld) {
  for (int r = 0; r < rows; ++r) {
    const T* s = src + r * row_stride;
    float* d = dst + static_cast<int64_t>(r) * ld;
    for (int c = 0; c < cols; ++c) d[c] = static_cast<float>(s[c]) * scale;
    std::fill(d + cols, d + ld, 0.f);
  }
}

// dst[c][r] = src[r * row_stride + c] for r < rows, c < cols; zeros in r in [rows, ld).
template <typename T>
void load_tile_transposed(const T* src, int64_t row_stride, int rows, int cols, float* dst, int ld) {
  for (int c = 0; c < cols; ++c) std::fill(dst + static_cast<int64_t>(c) * ld + rows, dst + (c + 1) * ld, 0.f);
  for (int r = 0; r < rows; ++r) {
    const T* s = src + r * row_stride;
    for (int c = 0; c < cols; ++c) dst[static_cast<int64_t>(c) * ld + r] = static_cast<float>(s[c]);
  }
}

// dst[r * row_stride + c] = scale * src[r][c] for r < rows, c < cols.
template <typename T>
void store_tile(const float* src, int ld, int rows, int cols, float scale, T* dst, int64_t row_stride) {
  for (int r = 0; r < rows; ++r) {
    const float* s = src + static_cast<int64_t>(r) * ld;
    T* d = dst + r * row_stride;
    for (int c = 0; c < cols; ++c) d[c] = static_cast<T>(s[c] * scale);
  }
}

}  // namespace ism::cpu
