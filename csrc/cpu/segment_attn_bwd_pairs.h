// The backward of bfloat16 inputs on the AVX512_BF16 dot product: segment_attn_bwd.h's per-tile work (delta's
// two products and the main pass's five) with every product on bfloat16 pairs (attend_pairs.h). Only the
// avx512_bf16 build has it; bwd_query_tile and delta_of_query_tile send bfloat16 of even head dim here.
//
// Each product's pairs run along its reduced dimension:
//   S^T = K Q^T, dP^T = V dO^T   over the head dim: K and V rows in place, Q^T and dO^T packed as words;
//   dV += P^T dO, dK += dS^T Q   over the query lanes: P^T and dS^T rows rounded to bfloat16 in place, dO and
//                                Q staged as query pairs (two rows interleaved);
//   dQ += dS K                   over keys: dS^T's key pairs, K staged as key pairs.
// P and dS are rounded to bfloat16 for the last three (as FlashAttention's kernels do); the softmax, delta, dS
// itself and every accumulator stay float32.
#pragma once

namespace ism::cpu::ISM_ISA_NS {

// The query side on pairs: w.qt and w.dot hold Q^T and dO^T as words (d / 2 rows of ld), s.q and s.dout the query
// pairs of q and dout rows (ceil(m / 2) rows of padded_ld(d) words). The softmax scale is not folded into q: the
// S^T product applies it (ScaleThen).
inline QuerySide load_query_side_pairs(const SegmentAttnBwdParams& p, const float* delta, int h, int q0, int m,
                                       int max_limit, BwdScratch& w) {
  const int d = p.head_dim;
  auto [q_rows, do_rows, s] = query_rows<c10::BFloat16>(p, h, q0, m, max_limit);
  pack_pairs_transposed(q_rows, m, d, w.qt.data(), s.ld);
  pack_pairs_transposed(do_rows, m, d, w.dot.data(), s.ld);
  s.q = stage_pairs(q_rows, 0, m, d, w.q.data(), padded_ld(d));
  s.dout = stage_pairs(do_rows, 0, m, d, w.dout.data(), padded_ld(d));
  load_lane_state(p, delta, h, s, w);
  return s;
}

// The K and V rows of a key tile as words (A of S^T and dP^T): in place, or copied into w.v (kTileK x d floats holds
// both copies, n x d / 2 words each).
inline std::pair<FloatTile, FloatTile> stage_kv_words(const StridedRows<const c10::BFloat16>& k,
                                                      const StridedRows<const c10::BFloat16>& v, int k0, int n, int d,
                                                      BwdScratch& w) {
  float* copies = w.v.data();
  return {stage_pair_rows(k, k0, n, d, copies), stage_pair_rows(v, k0, n, d, copies + kTileK * d / 2)};
}

// probs_and_dprobs on pairs: P^T in w.pt and dP^T in w.dpt (float32) of lanes [c0, m_pad) against key rows
// [k0, k0 + n); kr and vr are the K and V rows (words) from key k0.
inline void probs_and_dprobs_pairs(const QuerySide& s, int c0, int k0, int n, int d, float softmax_scale,
                                   const FloatTile& kr, const FloatTile& vr, BwdScratch& w) {
  const int cols = s.m_pad - c0, words = d / 2;
  gemm_ops(n, cols, words, PairOperands{kr.p, kr.ld, 1, w.qt.data() + c0, s.ld}, w.pt.data() + c0, s.ld,
           CMode::kSet, nullptr, ScaleThen<NoEpilogue>{softmax_scale * kLog2e, {}});
  probs_from_lse_cols(w.pt.data() + c0, n, s.ld, cols, k0, !key_tile_is_full(s.min_limit, k0, n),
                      w.limit.data() + c0, w.lse2.data() + c0);
  gemm_ops(n, cols, words, PairOperands{vr.p, vr.ld, 1, w.dot.data() + c0, s.ld}, w.dpt.data() + c0, s.ld,
           CMode::kSet);
}

// delta_of_query_tile (segment_attn_bwd.h) on pairs.
inline void delta_of_query_tile_pairs(const SegmentAttnBwdParams& p, int seq, int h, int q0, int m, int max_limit,
                                      float* delta, BwdScratch& w) {
  const int d = p.head_dim;
  const QuerySide s = load_query_side_pairs(p, nullptr, h, q0, m, max_limit, w);
  const auto [k_rows, v_rows] = kv_rows<c10::BFloat16>(p, seq, h / (p.h_q / p.h_kv));
  std::fill(w.delta.begin(), w.delta.end(), 0.f);
  for (int t = 0; t < key_tiles_to_visit(max_limit, kTileK); ++t) {
    const int k0 = t * kTileK, n = std::min(kTileK, max_limit - k0);
    const auto [kr, vr] = stage_kv_words(k_rows, v_rows, k0, n, d, w);
    probs_and_dprobs_pairs(s, 0, k0, n, d, p.softmax_scale, kr, vr, w);
    add_col_dot(w.pt.data(), w.dpt.data(), n, s.ld, s.m_pad, w.delta.data());
  }
  store_delta(p, h, q0, m, delta, w);
}

// bwd_query_tile (segment_attn_bwd.h) on pairs.
inline void bwd_query_tile_pairs(const SegmentAttnBwdParams& p, const float* delta, int seq, int h, int q0, int m,
                                 int max_limit, float* dkv, BwdScratch& w) {
  using T = c10::BFloat16;
  const int d = p.head_dim, h_kv = h / (p.h_q / p.h_kv);
  const QuerySide s = load_query_side_pairs(p, delta, h, q0, m, max_limit, w);
  const auto [k_rows, v_rows] = kv_rows<T>(p, seq, h_kv);
  AccRows dq_rows;
  const int n_tiles = key_tiles_to_visit(max_limit, kTileK);
  for (int t = 0; t < n_tiles; ++t) {
    const int k0 = t * kTileK, n = std::min(kTileK, max_limit - k0);
    const auto [kr, vr] = stage_kv_words(k_rows, v_rows, k0, n, d, w);
    const FloatTile kp = stage_pairs(k_rows, k0, n, d, w.k.data(), padded_ld(d));  // B of dQ += dS K
    const int step = key_tile_is_full(s.min_limit, k0, n) ? n : kSubTileK;  // kSubTileK is even: whole key pairs
    for (int s0 = 0; s0 < n; s0 += step) {
      const int ks = k0 + s0, ns = std::min(step, n - s0);
      const int c0 = first_lanes_seeing(w.limit.data(), m, ks), cols = s.m_pad - c0;
      if (c0 == m) continue;
      const int lane_pairs = (m - c0 + 1) / 2;  // c0 is a multiple of W: pairs start on an even lane
      probs_and_dprobs_pairs(s, c0, ks, ns, d, p.softmax_scale, {kr.p + s0 * kr.ld, kr.ld},
                             {vr.p + s0 * vr.ld, vr.ld}, w);
      score_grad_cols(w.pt.data() + c0, w.dpt.data() + c0, ns, s.ld, cols, w.delta.data() + c0);
      float* dk = dkv + static_cast<int64_t>(ks) * 2 * d;
      float* pt = w.pt.data() + c0;
      float* ds = w.dpt.data() + c0;  // dS^T
      // dV += P^T dout: P^T's rows as bfloat16 words, over lane pairs.
      round_rows_in_place(pt, ns, s.ld, cols);
      gemm_ops(ns, d, lane_pairs, PairOperands{pt, s.ld, 1, s.dout.p + (c0 / 2) * s.dout.ld, s.dout.ld}, dk + d,
               2 * d, CMode::kAdd);
      // dS's key pairs into w.pt (P^T is used up) for dQ, then dS^T's rows as words for dK += dS^T q.
      key_pairs(ds, ns, s.ld, cols, pt);
      round_rows_in_place(ds, ns, s.ld, cols);
      gemm_ops(ns, d, lane_pairs, PairOperands{ds, s.ld, 1, s.q.p + (c0 / 2) * s.q.ld, s.q.ld}, dk, 2 * d,
               CMode::kAdd);
      // dQ += dS K on rows [c0, m).
      float* dq = w.dq.data();
      const CMode mode = dq_rows.before_product(c0, d, dq, CMode::kAdd);
      gemm_ops(m - c0, d, (ns + 1) / 2,
               PairOperands{pt, 1, s.ld, kp.p + (s0 / 2) * kp.ld, kp.ld},
               dq + static_cast<int64_t>(c0) * d, d, mode);
    }
  }
  store_dq<T>(p, h, q0, m, dq_rows, w);
}

}  // namespace ism::cpu::ISM_ISA_NS
