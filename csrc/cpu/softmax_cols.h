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

// One forward step over key rows [k0, k0 + n) of S^T (ld columns, m_pad of them live): masks what each
// lane may not see (only when `masked`), updates max and sum, and overwrites S^T with the unnormalised
// probabilities. A score that is NaN stays NaN in its probability, so NaN inputs give NaN outputs; a lane
// that sees nothing keeps probability 0 (its max stays -inf and the exponent is taken against 0).
inline void softmax_update_cols(float* st, int n, int64_t ld, int m_pad, int k0, bool masked, const int32_t* limit,
                                const SoftmaxState& state) {
  using V = typename Vec::V;
  constexpr int W = Vec::W;
  const V neg_inf = Vec::set1(-__builtin_inff());
  for (int c = 0; c < m_pad; c += W) {
    float* col = st + c;
    V mx0 = neg_inf, mx1 = neg_inf;
    int j = 0;
    if (masked) {
      for (; j < n; ++j) {
        const V x = Vec::keep_visible(Vec::load(col + j * ld), limit + c, k0 + j, neg_inf);
        Vec::store(col + j * ld, x);
        mx0 = Vec::max(x, mx0);
      }
    } else {
      for (; j + 2 <= n; j += 2) {
        mx0 = Vec::max(Vec::load(col + j * ld), mx0);
        mx1 = Vec::max(Vec::load(col + (j + 1) * ld), mx1);
      }
      if (j < n) mx0 = Vec::max(Vec::load(col + j * ld), mx0);
    }
    const V old_max = Vec::load(state.row_max + c);
    const V new_max = Vec::max(Vec::max(mx0, mx1), old_max);
    const V ref = Vec::neg_inf_to_zero(new_max);  // no (-inf) - (-inf) for lanes that saw nothing yet
    V sum0 = Vec::zero(), sum1 = Vec::zero();
    j = 0;
    for (; j + 2 <= n; j += 2) {
      const V p0 = Vec::exp2(Vec::sub(Vec::load(col + j * ld), ref));
      const V p1 = Vec::exp2(Vec::sub(Vec::load(col + (j + 1) * ld), ref));
      Vec::store(col + j * ld, p0);
      Vec::store(col + (j + 1) * ld, p1);
      sum0 = Vec::add(sum0, p0);
      sum1 = Vec::add(sum1, p1);
    }
    if (j < n) {
      const V p0 = Vec::exp2(Vec::sub(Vec::load(col + j * ld), ref));
      Vec::store(col + j * ld, p0);
      sum0 = Vec::add(sum0, p0);
    }
    const V alpha = Vec::exp2(Vec::sub(old_max, ref));
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
      V p = Vec::exp2(Vec::sub(Vec::load(col + j * ld), off));
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
