// Moving rows between the tensors (float32, float16 or bfloat16, anywhere in memory) and the float32 tiles
// the micro-kernel reads. float32 rows that are evenly spaced are read in place; everything else is
// converted once per tile (vector conversions), so half-precision inputs run at the float32 rate.
#pragma once

namespace ism::cpu::ISM_ISA_NS {

// A tile of float32 rows: row i at p + i * ld.
struct FloatTile {
  const float* p;
  int64_t ld;
};

// W elements of a row as float32 (converted from half precision).
template <typename T>
inline typename Vec::V load_as_float(const T* p) {
  if constexpr (std::is_same_v<T, float>) {
    return Vec::load(p);
  } else {
    return Vec::load_cvt(p);
  }
}

// dst[c] = scale * src[c] for c < d.
template <typename T>
inline void convert_row(const T* src, int d, float scale, float* dst) {
  constexpr int W = Vec::W;
  const auto s = Vec::set1(scale);
  int c = 0;
  for (; c + W <= d; c += W) Vec::store(dst + c, Vec::mul(load_as_float(src + c), s));
  for (; c < d; ++c) dst[c] = static_cast<float>(src[c]) * scale;
}

// Rows [r0, r0 + n) as float32: in place when they are float32 and evenly spaced, else converted into buf
// (n x d).
template <typename Rows>
FloatTile stage_rows(const Rows& rows, int64_t r0, int n, int d, float* buf) {
  using T = row_element_t<Rows>;
  if constexpr (std::is_same_v<T, float>) {
    if (n > 0 && rows.run(r0, n) == n) return {rows(r0), rows.run_stride()};
  }
  for (int i = 0; i < n; ++i) convert_row(rows(r0 + i), d, 1.f, buf + static_cast<int64_t>(i) * d);
  return {buf, d};
}

// dst[c][i] = scale * rows(r0 + i)[c] for i < m, c < d; zeros for i in [m, ld). The transposed query-side
// tile (once per query tile, reused against every key tile). Blocks of W rows x W columns are transposed in
// registers (Vec::transpose); the leftover rows and columns go element by element, reading strided and
// writing contiguous (a column-wise write would allocate a cache line per element). m <= kTileQ.
template <typename Rows>
void pack_transposed(const Rows& rows, int64_t r0, int m, int d, float scale, float* dst, int ld) {
  using V = typename Vec::V;
  constexpr int W = Vec::W;
  const row_element_t<Rows>* src[kTileQ];
  for (int i = 0; i < m; ++i) src[i] = rows(r0 + i);
  const V s = Vec::set1(scale);
  const int m_full = m / W * W, d_full = d / W * W;
  for (int i0 = 0; i0 < m_full; i0 += W) {
    for (int c0 = 0; c0 < d_full; c0 += W) {
      V block[W];
      for (int i = 0; i < W; ++i) block[i] = Vec::mul(load_as_float(src[i0 + i] + c0), s);
      Vec::transpose(block);
      for (int c = 0; c < W; ++c) Vec::store(dst + static_cast<int64_t>(c0 + c) * ld + i0, block[c]);
    }
  }
  for (int c = 0; c < d; ++c) {
    float* out = dst + static_cast<int64_t>(c) * ld;
    for (int i = c < d_full ? m_full : 0; i < m; ++i) out[i] = static_cast<float>(src[i][c]) * scale;
    std::fill(out + m, out + ld, 0.f);
  }
}

// rows(r0 + i)[c] = row_scale[i] * src[i][c] for i < n, c < d (converted to the rows' type).
template <typename Rows>
void store_rows(const float* src, int64_t ld, int n, int d, const float* row_scale, const Rows& rows, int64_t r0) {
  using T = row_element_t<Rows>;
  for (int i = 0; i < n; ++i) {
    const float* s = src + i * ld;
    T* dst = rows(r0 + i);
    if constexpr (std::is_same_v<T, float>) {
      convert_row(s, d, row_scale[i], dst);
    } else {
      for (int c = 0; c < d; ++c) dst[c] = static_cast<T>(s[c] * row_scale[i]);
    }
  }
}

}  // namespace ism::cpu::ISM_ISA_NS
