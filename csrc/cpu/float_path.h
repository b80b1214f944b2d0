// How the kernels' products take their operands: a path. The loops of the forward (attend_tile.h, attend_rows.h)
// and of the backward (bwd_tile.h, bwd_delta.h) are written once over a path, which says what a k step of a
// product multiplies, how rows are staged as a product's operands, and where the softmax scale goes.
//
// FloatPath: every product in float32, half-precision inputs converted on load (tile_stage.h), the softmax scale
// times log2(e) folded into q once. pair_path.h has the other path (bfloat16 pairs on the AVX512_BF16 dot
// product), which only the avx512_bf16 build has.
//
// A path P provides
//   Madd, Operands       a k step of a product (micro_gemm.h) and its strided A and B
//   depth(n)             the k steps of a product reducing over n elements (n floats; n / 2 rounded up for pairs)
//   pack_queries         q or dout rows transposed, A^T of S^T = K Q^T (one query per lane)
//   copy_queries         q rows as they are, the row path's queries (attend_rows.h)
//   row_operand          rows reduced over the head dim (K or V as A of S^T, dP^T; K in the row path)
//   panel_operand        rows as a B panel, reduced over those rows (V of P V, q and dout of dK and dV)
//   bwd_key_tile         a key tile's K and V for the backward (bwd_key_tile's comment has the buffers)
//   score_scale(s)       what multiplies the products' sums for a scale s of the scores (1 where q holds it)
//   score_epilogue(s, e) the S^T product's epilogue: e, after the scale where the path applies it to sums
//   ProbStore            where the softmax step puts P (softmax_cols.h)
//   prepare_lanes        a float32 tile of rows over query lanes made A of a product reducing over the lanes
//   dscores_by_keys      dS^T as A of dQ += dS K (reducing over keys), before prepare_lanes changes it
#pragma once

namespace ism::cpu::ISM_ISA_NS {

// A backward key tile's operands: K and V rows reduced over the head dim (A of S^T and dP^T) and, for
// dQ += dS K, K as a B panel (k_panel; empty when no such product follows).
struct BwdKeyTile {
  FloatTile k, v, k_panel;
};

struct FloatPath {
  using Madd = FloatMadd;
  using Operands = FloatOperands;
  using ProbStore = ProbsInPlace;

  static int depth(int n) { return n; }

  // dst[c * ld + i] = scale * rows(i)[c] for i < m (zeros for lanes [m, ld)).
  template <typename Rows>
  static void pack_queries(const Rows& rows, int m, int d, float scale, float* dst, int ld) {
    pack_transposed(rows, 0, m, d, scale, dst, ld);
  }

  // dst row r = scale * rows(r), m rows of d.
  template <typename Rows>
  static void copy_queries(const Rows& rows, int m, int d, float scale, float* dst) {
    for (int r = 0; r < m; ++r) convert_row(rows(r), d, scale, dst + static_cast<int64_t>(r) * d);
  }

  template <typename Rows>
  static FloatTile row_operand(const Rows& rows, int64_t r0, int n, int d, float* buf) {
    return stage_rows(rows, r0, n, d, buf);
  }

  // a_rows: the rows of A that sweep the panel (tile_stage.h: a panel swept by many row blocks is copied).
  template <typename Rows>
  static FloatTile panel_operand(const Rows& rows, int64_t r0, int n, int d, int a_rows, float* buf) {
    return stage_panel(rows, r0, n, d, a_rows, buf);
  }

  // One staging of K serves S^T's A and dQ's B (a_rows of dQ sweep it; 0: no dQ product, K only as A). k_buf
  // holds kTileK x padded_ld(d) floats, v_buf kTileK x d.
  template <typename Rows>
  static BwdKeyTile bwd_key_tile(const Rows& k, const Rows& v, int64_t k0, int n, int d, int a_rows, float* k_buf,
                                 float* v_buf) {
    const FloatTile kt = stage_panel(k, k0, n, d, a_rows, k_buf);
    return {kt, stage_rows(v, k0, n, d, v_buf), kt};
  }

  static float score_scale(float) { return 1.f; }  // q is scaled when packed

  template <typename Epi>
  static Epi score_epilogue(float, const Epi& then) {
    return then;
  }

  static void prepare_lanes(float*, int, int64_t, int) {}

  static const float* dscores_by_keys(const float* ds, int, int64_t, int, float*) { return ds; }
};

}  // namespace ism::cpu::ISM_ISA_NS
