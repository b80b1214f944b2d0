// GEMM for the attention tiles: C[m x n] (=, +=, or row-scaled +=) A[m x k] * B[k x n], C in float32.
//
// A is read through strides, A(i, p) = a[i * a_rs + p * a_cs], so the same kernel takes K or V rows as
// they lie in the tensor (a_cs = 1) and a transposed score tile (a_rs = 1); B is row-major (ldb), C too.
// Nothing is packed: the attention kernels arrange their tiles so that B is always a row-major panel that
// stays in L1 across the row blocks. The MR x (NV * W) block of C lives in registers for the whole k loop
// (MR and NV per instruction set, Vec::kMR / kNV); a column tail of n is handled with masked loads and
// stores, so B and C need no padding.
#pragma once

// GCC propagates the null row_scale of the kSet/kAdd calls into the kScaleAdd branch it cannot prove dead
// and warns about a read that never runs.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Warray-bounds"

namespace ism::cpu::ISM_ISA_NS {

// What happens to C: overwritten, accumulated into, or scaled row by row first (C = diag(s) C + A B, the
// rescale of online softmax folded into the product).
enum class CMode { kSet, kAdd, kScaleAdd };

// Runs on each register block of C before it is stored: `block<MR, NV>(row0, col0, acc)` may change acc
// (rows row0.., columns col0.. of C). The forward masks and takes the column max of S^T here, while the scores
// are still in registers (attend_tile.h).
struct NoEpilogue {
  template <int MR, int NV, typename V>
  void block(int, int, V (&)[MR][NV]) const {}
};

// The A and B of a product: A(i, p) at a + i * a_rs + p * a_cs, B row p at b + p * ldb. An operand type says how a
// register block's k loop reads them (accumulate) and where a block of rows and columns starts (at); the loops
// below are written once over it. `Madd` says what one k step multiplies: Vec::fma of a broadcast float here
// (FloatOperands), the bfloat16 pair dot product in pair_path.h.
template <typename Madd>
struct StridedOperands {
  using BElem = typename Madd::BElem;
  const float* a;
  int64_t a_rs, a_cs;
  const BElem* b;
  int64_t ldb;

  StridedOperands at(int row, int col) const { return {a + row * a_rs, a_rs, a_cs, b + col, ldb}; }

  // acc[i][v] += sum over p < k of A(i, p) * B(p, v * W ..): the micro-kernel's inner loop, MR x NV in registers.
  template <int MR, int NV, bool kTail>
  __attribute__((always_inline)) void accumulate(int k, typename Vec::V (&acc)[MR][NV], int tail) const {
    using V = typename Vec::V;
    constexpr int W = Vec::W;
    const float* a_rows[MR];
#pragma GCC unroll 16
    for (int i = 0; i < MR; ++i) a_rows[i] = a + i * a_rs;
    for (int p = 0; p < k; ++p) {
      V bp[NV];
      const BElem* bk = b + p * ldb;
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) {
        bp[v] = (kTail && v == NV - 1) ? Madd::load_b_part(bk + v * W, tail) : Madd::load_b(bk + v * W);
      }
      const int64_t ap = p * a_cs;
#pragma GCC unroll 16
      for (int i = 0; i < MR; ++i) {
        const V ai = Madd::broadcast(a_rows[i] + ap);
#pragma GCC unroll 8
        for (int v = 0; v < NV; ++v) acc[i][v] = Madd::madd(acc[i][v], ai, bp[v]);
      }
    }
  }
};

// float32 operands: acc += a * b, one FMA per element of A.
struct FloatMadd {
  using BElem = float;
  static typename Vec::V load_b(const float* p) { return Vec::load(p); }
  static typename Vec::V load_b_part(const float* p, int n) { return Vec::load_part(p, n); }
  static typename Vec::V broadcast(const float* p) { return Vec::set1(*p); }
  static typename Vec::V madd(typename Vec::V acc, typename Vec::V a, typename Vec::V b) { return Vec::fma(a, b, acc); }
};
using FloatOperands = StridedOperands<FloatMadd>;

// float32 A and half-precision B rows converted in registers: the product of a few rows of probabilities with V
// as it lies in a cache, where staging V as float32 would cost about as much as the product.
template <typename T>
struct ConvertBMadd : FloatMadd {
  using BElem = T;
  static typename Vec::V load_b(const T* p) { return Vec::load_cvt(p); }
  static typename Vec::V load_b_part(const T* p, int n) {  // a column tail (callers avoid it: whole vectors of d)
    float part[Vec::W] = {};
    for (int i = 0; i < n; ++i) part[i] = static_cast<float>(p[i]);
    return Vec::load(part);
  }
};

// One register block: rows [0, MR) of C, NV vectors of columns. With kTail the last vector holds only
// `tail` (< W) valid columns.
template <int MR, int NV, bool kTail, typename Ops, typename Epi>
__attribute__((always_inline)) inline void micro_tile(int k, const Ops& ops, float* c, int64_t ldc, CMode mode,
                                                      const float* row_scale, int tail, int row0, int col0,
                                                      const Epi& epi) {
  using V = typename Vec::V;
  constexpr int W = Vec::W;
  V acc[MR][NV];
#pragma GCC unroll 16
  for (int i = 0; i < MR; ++i) {
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) {
      if (mode == CMode::kSet) {
        acc[i][v] = Vec::zero();
      } else {
        const float* ci = c + i * ldc + v * W;
        acc[i][v] = (kTail && v == NV - 1) ? Vec::load_part(ci, tail) : Vec::load(ci);
        if (mode == CMode::kScaleAdd) acc[i][v] = Vec::mul(acc[i][v], Vec::set1(row_scale[i]));
      }
    }
  }
  ops.template accumulate<MR, NV, kTail>(k, acc, tail);
  epi.template block<MR, NV>(row0, col0, acc);
#pragma GCC unroll 16
  for (int i = 0; i < MR; ++i) {
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) {
      float* ci = c + i * ldc + v * W;
      if (kTail && v == NV - 1) {
        Vec::store_part(ci, acc[i][v], tail);
      } else {
        Vec::store(ci, acc[i][v]);
      }
    }
  }
}

// One block of `rows` (1..MR) rows starting at row i of a panel.
template <int NV, bool kTail, typename Ops, typename Epi>
__attribute__((always_inline)) inline void row_block(int rows, int i, int k, const Ops& ops, float* c, int64_t ldc,
                                                     CMode mode, const float* row_scale, int tail, int col0,
                                                     const Epi& epi) {
  const Ops oi = ops.at(i, 0);
  float* ci = c + i * ldc;
  const float* si = row_scale ? row_scale + i : nullptr;
  // MR is at most 6 on every instruction set (simd_*.h); the switch names each height.
  static_assert(Vec::kMR <= 6, "extend the height switch");
  switch (rows) {
    case 1: micro_tile<1, NV, kTail>(k, oi, ci, ldc, mode, si, tail, i, col0, epi); break;
    case 2: micro_tile<2, NV, kTail>(k, oi, ci, ldc, mode, si, tail, i, col0, epi); break;
    case 3: micro_tile<3, NV, kTail>(k, oi, ci, ldc, mode, si, tail, i, col0, epi); break;
    case 4: micro_tile<4, NV, kTail>(k, oi, ci, ldc, mode, si, tail, i, col0, epi); break;
    case 5: micro_tile<5, NV, kTail>(k, oi, ci, ldc, mode, si, tail, i, col0, epi); break;
    default: micro_tile<Vec::kMR, NV, kTail>(k, oi, ci, ldc, mode, si, tail, i, col0, epi); break;
  }
}

// A column panel of `nv` vectors (the last with `tail` columns when tail < W) swept by MR-row blocks. The rows
// past the last whole block are not left to a short block of their own: a block of 1-2 rows keeps too few
// accumulators to cover the FMA latency and runs at half the rate or less. The last whole block and the
// leftover share the rows instead, in two blocks of about equal height (128 rows = 20 x 6 + 4 + 4, not
// 21 x 6 + 2).
template <int NV, bool kTail, typename Ops, typename Epi>
void panel(int m, int k, const Ops& ops, float* c, int64_t ldc, CMode mode, const float* row_scale, int tail,
           int col0, const Epi& epi) {
  constexpr int MR = Vec::kMR;
  const int whole = m / MR, left = m % MR;
  const int split_from = (left > 0 && whole > 0 ? whole - 1 : whole) * MR;
  int i = 0;
  for (; i < split_from; i += MR) {
    micro_tile<MR, NV, kTail>(k, ops.at(i, 0), c + i * ldc, ldc, mode, row_scale ? row_scale + i : nullptr, tail,
                              i, col0, epi);
  }
  const int rest = m - i;  // 0, a short matrix's rows (< MR), or MR + left rows to split
  if (rest == 0) return;
  if (rest <= MR) {
    row_block<NV, kTail>(rest, i, k, ops, c, ldc, mode, row_scale, tail, col0, epi);
    return;
  }
  const int first = (rest + 1) / 2;
  row_block<NV, kTail>(first, i, k, ops, c, ldc, mode, row_scale, tail, col0, epi);
  row_block<NV, kTail>(rest - first, i + first, k, ops, c, ldc, mode, row_scale, tail, col0, epi);
}

// The panel of the last `cols` (< kNV * W) columns: nv vectors, the last one partial when cols % W != 0.
template <int NV, typename Ops, typename Epi>
void last_panel(int nv, int m, int k, const Ops& ops, float* c, int64_t ldc, CMode mode, const float* row_scale,
                int tail, int col0, const Epi& epi) {
  if constexpr (NV >= 1) {
    if (nv == NV) {
      if (tail == Vec::W) {
        panel<NV, false>(m, k, ops, c, ldc, mode, row_scale, tail, col0, epi);
      } else {
        panel<NV, true>(m, k, ops, c, ldc, mode, row_scale, tail, col0, epi);
      }
    } else {
      last_panel<NV - 1>(nv, m, k, ops, c, ldc, mode, row_scale, tail, col0, epi);
    }
  }
}

// C[m x n] (mode) A[m x k] * B[k x n] for any operand type (k counts the operands' steps). row_scale (m floats)
// is read only with CMode::kScaleAdd; `epi` sees every block of C before it is stored. NV, the vectors of a
// column panel, is the instruction set's square block unless a caller with few rows asks for a wider one.
template <int NV = Vec::kNV, typename Ops, typename Epi = NoEpilogue>
void gemm_ops(int m, int n, int k, const Ops& ops, float* c, int64_t ldc, CMode mode,
              const float* row_scale = nullptr, const Epi& epi = Epi{}) {
  if (m <= 0 || n <= 0) return;
  constexpr int W = Vec::W, kPanel = NV * W;
  int j = 0;
  for (; j + kPanel <= n; j += kPanel) {
    panel<NV, false>(m, k, ops.at(0, j), c + j, ldc, mode, row_scale, W, j, epi);
  }
  const int cols = n - j;
  if (cols > 0) {
    const int nv = (cols + W - 1) / W;
    last_panel<NV>(nv, m, k, ops.at(0, j), c + j, ldc, mode, row_scale, cols - (nv - 1) * W, j, epi);
  }
}

// The float32 product (attend_rows.h asks for a wider panel NV when it has few rows).
template <int NV = Vec::kNV, typename Epi = NoEpilogue>
void gemm(int m, int n, int k, const float* a, int64_t a_rs, int64_t a_cs, const float* b, int64_t ldb, float* c,
          int64_t ldc, CMode mode, const float* row_scale = nullptr, const Epi& epi = Epi{}) {
  gemm_ops<NV>(m, n, k, FloatOperands{a, a_rs, a_cs, b, ldb}, c, ldc, mode, row_scale, epi);
}

}  // namespace ism::cpu::ISM_ISA_NS

#pragma GCC diagnostic pop
