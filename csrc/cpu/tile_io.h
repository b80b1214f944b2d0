// Moving tiles between the tensors (float/half/bfloat16 rows anywhere in memory) and the float32
// scratch buffers of the CPU kernels.
//
// Rows are reached through a small accessor, `rows(i)` -> pointer to row i, so one tile routine
// serves strided tensors (StridedRows) and paged KV caches (PagedRows in kvcache_attn_cpu.cpp).
// Padding is always written as zeros so that the vector code of tile_math.cpp can run over whole
// padded rows without reading stale values.
#pragma once

#include <algorithm>
#include <cstdint>
#include <type_traits>

namespace ism::cpu {

// Row i at base + i * stride (elements).
template <typename T>
struct StridedRows {
  T* base;
  int64_t stride;
  T* operator()(int64_t i) const { return base + i * stride; }
};

template <typename T>
StridedRows<T> strided_rows(T* base, int64_t stride) {
  return {base, stride};
}

template <typename Rows>
using row_element_t = std::remove_const_t<std::remove_pointer_t<decltype(std::declval<Rows>()(0))>>;

// dst[i][c] = scale * rows(r0 + i)[c] for i < n, c < cols; zeros in c in [cols, ld).
template <typename Rows>
void load_tile(const Rows& rows, int64_t r0, int n, int cols, float scale, float* dst, int ld) {
  for (int i = 0; i < n; ++i) {
    const auto* s = rows(r0 + i);
    float* d = dst + static_cast<int64_t>(i) * ld;
    for (int c = 0; c < cols; ++c) d[c] = static_cast<float>(s[c]) * scale;
    std::fill(d + cols, d + ld, 0.f);
  }
}

// dst[c][i] = rows(r0 + i)[c] for i < n, c < cols; zeros in i in [n, ld).
template <typename Rows>
void load_tile_transposed(const Rows& rows, int64_t r0, int n, int cols, float* dst, int ld) {
  for (int c = 0; c < cols; ++c) std::fill(dst + static_cast<int64_t>(c) * ld + n, dst + (c + 1) * ld, 0.f);
  for (int i = 0; i < n; ++i) {
    const auto* s = rows(r0 + i);
    for (int c = 0; c < cols; ++c) dst[static_cast<int64_t>(c) * ld + i] = static_cast<float>(s[c]);
  }
}

// rows(r0 + i)[c] = scale * src[i][c] for i < n, c < cols.
template <typename Rows>
void store_tile(const float* src, int ld, int n, int cols, float scale, const Rows& rows, int64_t r0) {
  using T = row_element_t<Rows>;
  for (int i = 0; i < n; ++i) {
    const float* s = src + static_cast<int64_t>(i) * ld;
    T* d = rows(r0 + i);
    for (int c = 0; c < cols; ++c) d[c] = static_cast<T>(s[c] * scale);
  }
}

}  // namespace ism::cpu
