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

// The leading dimension (in floats) of a tile buffer with `cols` columns: whole 64-byte lines, an odd number of
// them. A B panel of the micro-kernel is read one row per k step, the same W-column strip of many rows; at a
// power-of-two row stride those rows fall into a few sets of the L1 cache and evict each other (128 rows of 512
// bytes share 8 of a 32 KiB 8-way L1's 64 sets: half the panel misses on every sweep). An odd number of lines
// per row spreads the rows over every set (docs/cpu_kernels.md has the measurements).
inline int padded_ld(int cols) {
  constexpr int kLine = 16;  // floats in a 64-byte cache line
  const int lines = std::max(1, (cols + kLine - 1) / kLine);
  return (lines % 2 == 0 ? lines + 1 : lines) * kLine;
}

// From this many rows of A on, a product copies a B panel it would read in place into a padded buffer
// (stage_panel): the copy costs about 2 / m of the product, the set conflicts of an in-place panel grow with
// the row blocks that sweep it.
constexpr int kCopyPanelMinRows = kTileQ / 4;

// Rows [r0, r0 + n) converted to float32 into buf at leading dimension ld (>= d).
template <typename Rows>
FloatTile copy_rows(const Rows& rows, int64_t r0, int n, int d, float* buf, int64_t ld) {
  for (int i = 0; i < n; ++i) convert_row(rows(r0 + i), d, 1.f, buf + i * ld);
  return {buf, ld};
}

// Rows [r0, r0 + n) as float32: in place when they are float32 and evenly spaced, else converted into buf
// (n x d). For rows read as a product's A operand (one broadcast at a time, so their stride does not matter)
// or by few rows of the other operand; a B panel that many row blocks sweep goes through stage_panel.
template <typename Rows>
FloatTile stage_rows(const Rows& rows, int64_t r0, int n, int d, float* buf) {
  using T = row_element_t<Rows>;
  if constexpr (std::is_same_v<T, float>) {
    if (n > 0 && rows.run(r0, n) == n) return {rows(r0), rows.run_stride()};
  }
  return copy_rows(rows, r0, n, d, buf, d);
}

// Rows [r0, r0 + n) as the B panel of a product with a_rows rows of A: copied at padded_ld(d) when that many
// row blocks sweep it (buf holds n x padded_ld(d)), else staged as stage_rows does.
template <typename Rows>
FloatTile stage_panel(const Rows& rows, int64_t r0, int n, int d, int a_rows, float* buf) {
  return a_rows >= kCopyPanelMinRows ? copy_rows(rows, r0, n, d, buf, padded_ld(d)) : stage_rows(rows, r0, n, d, buf);
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
