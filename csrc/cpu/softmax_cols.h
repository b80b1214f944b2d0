// Online softmax on a transposed score tile S^T (key rows x query columns, log2 domain).
//
// The kernels form S^T = K Q^T rather than S = Q K^T: K is then read as it lies in memory (no per-tile
// transpose of the keys), and every step of the softmax runs down the columns with one query per vector
// lane, so the running max, the running sum and the kv_limit test are plain vector operations.
#pragma once

namespace ism::cpu::ISM_ISA_NS {

// Per query lane state of the forward's online softmax (m_pad lanes, padding lanes have limit 0).
struct SoftmaxState {
  float* row_max;  // running max of the scores seen (log2 domain), -inf before any
  float* row_sum;  // running sum of exp2(score - row_max)
  float* alpha;    // out: factor that rescales the accumulator rows for this tile
};

// The epilogue of the forward's S^T product (micro_gemm.h): on boundary tiles it masks what each lane may
// not see, and it takes each lane's max over the block's keys while the scores are still in registers, so
// the softmax step below makes one pass over S^T instead of two.
struct MaskAndColumnMax {
  const int32_t* limit;  // kv_limit of each query lane (0 on padding lanes)
  int k0;                // key index of S^T's row 0
  bool masked;
  float* col_max;  // per lane, the max so far of this tile (set to -inf before the product)
  template <int MR, int NV, typename V>
  void block(int row0, int col0, V (&acc)[MR][NV]) const {
    const V neg_inf = Vec::set1(-__builtin_inff());
    for (int v = 0; v < NV; ++v) {
      const int col = col0 + v * Vec::W;
      V mx = Vec::load(col_max + col);
      for (int i = 0; i < MR; ++i) {
        if (masked) acc[i][v] = Vec::keep_visible(acc[i][v], limit + col, k0 + row0 + i, neg_inf);
        mx = Vec::max(acc[i][v], mx);  // a NaN score never becomes the max (NaN is the first operand)
      }
      Vec::store(col_max + col, mx);
    }
  }
};

// Where the forward's softmax step puts the probabilities of key rows j and j + 1 of S^T (one vector of lanes,
// `col` is row 0 of that vector): back in place as float32. pair_path.h stores them as bfloat16 pairs instead.
struct ProbsInPlace {
  static void two(float* col, int j, int64_t ld, typename Vec::V p0, typename Vec::V p1) {
    Vec::store(col + j * ld, p0);
    Vec::store(col + (j + 1) * ld, p1);
  }
  static void one(float* col, int j, int64_t ld, typename Vec::V p0) { Vec::store(col + j * ld, p0); }
};

// One forward step over the key rows of S^T (n rows, ld columns, m_pad of them live), already masked and
// with each lane's max in tile_max (MaskAndColumnMax): updates max and sum and hands the unnormalised
// probabilities to Store (by default over S^T). A NaN score stays NaN in its probability, so NaN inputs give
// NaN outputs; a lane that sees nothing keeps probability 0 (its max stays -inf and the exponent is taken
// against 0).
template <typename Store = ProbsInPlace>
inline void softmax_update_cols(float* st, int n, int64_t ld, int m_pad, const float* tile_max,
                                const SoftmaxState& state) {
  using V = typename Vec::V;
  constexpr int W = Vec::W;
  for (int c = 0; c < m_pad; c += W) {
    float* col = st + c;
    const V old_max = Vec::load(state.row_max + c);
    const V new_max = Vec::max(Vec::load(tile_max + c), old_max);
    const V ref = Vec::neg_inf_to_zero(new_max);  // no (-inf) - (-inf) for lanes that saw nothing yet
    V sum0 = Vec::zero(), sum1 = Vec::zero();
    int j = 0;
    for (; j + 2 <= n; j += 2) {
      const V p0 = exp2v(Vec::sub(Vec::load(col + j * ld), ref));
      const V p1 = exp2v(Vec::sub(Vec::load(col + (j + 1) * ld), ref));
      Store::two(col, j, ld, p0, p1);
      sum0 = Vec::add(sum0, p0);
      sum1 = Vec::add(sum1, p1);
    }
    if (j < n) {
      const V p0 = exp2v(Vec::sub(Vec::load(col + j * ld), ref));
      Store::one(col, j, ld, p0);
      sum0 = Vec::add(sum0, p0);
    }
    const V alpha = exp2v(Vec::sub(old_max, ref));
    Vec::store(state.alpha + c, alpha);
    Vec::store(state.row_sum + c, Vec::fma(Vec::load(state.row_sum + c), alpha, Vec::add(sum0, sum1)));
    Vec::store(state.row_max + c, new_max);
  }
}

// Backward: P^T = exp2(S^T - lse2[lane]) over key rows [k0, k0 + n), 0 where the lane may not see the key
// (only tested when `masked`). Lanes that see nothing have lse2 = -inf; they are masked for every key.
inline void probs_from_lse_cols(float* st, int n, int64_t ld, int m_pad, int k0, bool masked, const int32_t* limit,
                                const float* lse2) {
  using V = typename Vec::V;
  constexpr int W = Vec::W;
  for (int c = 0; c < m_pad; c += W) {
    const V off = Vec::neg_inf_to_zero(Vec::load(lse2 + c));
    float* col = st + c;
    for (int j = 0; j < n; ++j) {
      V p = exp2v(Vec::sub(Vec::load(col + j * ld), off));
      if (masked) p = Vec::keep_visible(p, limit + c, k0 + j, Vec::zero());
      Vec::store(col + j * ld, p);
    }
  }
}

// Backward: dS^T = P^T * (dP^T - delta[lane]), in place in dpt.
inline void score_grad_cols(const float* pt, float* dpt, int n, int64_t ld, int m_pad, const float* delta) {
  constexpr int W = Vec::W;
  for (int c = 0; c < m_pad; c += W) {
    const auto dl = Vec::load(delta + c);
    for (int j = 0; j < n; ++j) {
      const int64_t o = j * ld + c;
      Vec::store(dpt + o, Vec::mul(Vec::load(pt + o), Vec::sub(Vec::load(dpt + o), dl)));
    }
  }
}

// Column sums of P^T * dP^T added into acc[lane]: delta's first term computed from the probabilities
// (backward of half-precision inputs, where the rounded output would not cancel dP exactly).
inline void add_col_dot(const float* pt, const float* dpt, int n, int64_t ld, int m_pad, float* acc) {
  constexpr int W = Vec::W;
  for (int c = 0; c < m_pad; c += W) {
    auto s = Vec::load(acc + c);
    for (int j = 0; j < n; ++j) s = Vec::fma(Vec::load(pt + j * ld + c), Vec::load(dpt + j * ld + c), s);
    Vec::store(acc + c, s);
  }
}

}  // namespace ism::cpu::ISM_ISA_NS
