// The backward's work on one (query head, query tile) against the key tiles it sees (segment_attn_bwd.h has the
// whole pass): the tile buffers, the query side (q, dout, lse, delta, limits), P^T and dP^T, and the main pass's
// five products into dq and the work item's dK/dV rows. Written once over a path (float_path.h): float32
// operands, or bfloat16 pairs on the AVX512_BF16 dot product (pair_path.h).
#pragma once

namespace ism::cpu::ISM_ISA_NS {

// Per-thread tile buffers of the backward (not zeroed: scratch_buffer.h).
struct BwdScratch {
  ScratchBuffer<float> qt, dot, q, dout, pt, dpt, dq, k, v, lse2, delta, row_scale;
  ScratchBuffer<int32_t> limit;
  explicit BwdScratch(int d)
      : qt(static_cast<size_t>(d) * padded_ld(kTileQ)), dot(static_cast<size_t>(d) * padded_ld(kTileQ)),
        q(static_cast<size_t>(kTileQ) * padded_ld(d)), dout(static_cast<size_t>(kTileQ) * padded_ld(d)),
        pt(static_cast<size_t>(kTileK) * padded_ld(kTileQ)), dpt(static_cast<size_t>(kTileK) * padded_ld(kTileQ)),
        dq(static_cast<size_t>(kTileQ) * d), k(static_cast<size_t>(kTileK) * padded_ld(d)),
        v(static_cast<size_t>(kTileK) * d),
        lse2(kTileQ), delta(kTileQ), row_scale(kTileQ), limit(kTileQ) {}
};

// The query side of one (query head, query tile): transposed q and dout, q and dout rows as the path's B panels
// of dV and dK (float32 rows or query pairs, copied at a padded stride), lse in the log2 domain, delta and the
// limits (padding lanes see nothing). The transposed tiles, P^T and dP^T hold m_pad live lanes in rows of ld.
struct QuerySide {
  int q0, m, m_pad, ld, min_limit, max_limit;
  FloatTile q, dout;
};

// The per-lane state of a query tile: limits (padding lanes see nothing, and min_limit), lse in the log2 domain,
// delta.
inline void load_lane_state(const SegmentAttnBwdParams& p, const float* delta, int h, QuerySide& s, BwdScratch& w) {
  const int q0 = s.q0, m = s.m;
  for (int r = 0; r < s.m_pad; ++r) {
    const bool live = r < m;
    w.limit[r] = live ? p.kv_limit[q0 + r] : 0;
    w.lse2[r] = live ? p.lse[h * p.lse_head_stride + q0 + r] * kLog2e : 0.f;
    w.delta[r] = live && delta != nullptr ? delta[static_cast<int64_t>(h) * p.total_q + q0 + r] : 0.f;
    if (live) s.min_limit = std::min(s.min_limit, w.limit[r]);
  }
}

// The q and dout rows of query head h from row q0, and the shape of that query tile's side (rows filled in later).
template <typename T>
std::tuple<StridedRows<const T>, StridedRows<const T>, QuerySide> query_rows(const SegmentAttnBwdParams& p, int h,
                                                                             int q0, int m, int max_limit) {
  return {strided_rows(static_cast<const T*>(p.q) + q0 * p.q_row_stride + h * p.q_head_stride, p.q_row_stride),
          strided_rows(static_cast<const T*>(p.dout) + q0 * p.dout_row_stride + h * p.dout_head_stride,
                       p.dout_row_stride),
          QuerySide{q0, m, pad_lanes(m), padded_ld(pad_lanes(m)), max_limit, max_limit, {}, {}}};
}

// The query side of query head h's tile of m rows at q0, staged as the path's operands (q in the log2 domain where
// the path folds the scale into it).
template <typename Path, typename T>
QuerySide load_query_side(const SegmentAttnBwdParams& p, const float* delta, int h, int q0, int m, int max_limit,
                          BwdScratch& w) {
  const int d = p.head_dim;
  auto [q_rows, do_rows, s] = query_rows<T>(p, h, q0, m, max_limit);
  Path::pack_queries(q_rows, m, d, p.softmax_scale * kLog2e, w.qt.data(), s.ld);
  Path::pack_queries(do_rows, m, d, 1.f, w.dot.data(), s.ld);
  // B panels of dV and dK, reused against every key tile: always copied (as if all kTileK keys swept them).
  s.q = Path::panel_operand(q_rows, 0, m, d, kTileK, w.q.data());
  s.dout = Path::panel_operand(do_rows, 0, m, d, kTileK, w.dout.data());
  load_lane_state(p, delta, h, s, w);
  return s;
}

// P^T (in w.pt) and dP^T (in w.dpt) of a query tile's lanes [c0, m_pad) against key rows [k0, k0 + n); kr and
// vr are the K and V rows from key k0 (the path's row operands). Rows of pt/dpt are the n keys, at the query
// tile's stride ld.
template <typename Path>
void probs_and_dprobs(const QuerySide& s, int c0, int k0, int n, int d, float softmax_scale, const FloatTile& kr,
                      const FloatTile& vr, BwdScratch& w) {
  using Ops = typename Path::Operands;
  const int cols = s.m_pad - c0;
  gemm_ops(n, cols, Path::depth(d), Ops{kr.p, kr.ld, 1, w.qt.data() + c0, s.ld}, w.pt.data() + c0, s.ld,
           CMode::kSet, nullptr, Path::score_epilogue(softmax_scale * kLog2e, NoEpilogue{}));
  probs_from_lse_cols(w.pt.data() + c0, n, s.ld, cols, k0, !key_tile_is_full(s.min_limit, k0, n),
                      w.limit.data() + c0, w.lse2.data() + c0);
  gemm_ops(n, cols, Path::depth(d), Ops{vr.p, vr.ld, 1, w.dot.data() + c0, s.ld}, w.dpt.data() + c0, s.ld,
           CMode::kSet);
}

// The K/V rows of head h_kv of a sequence.
template <typename T>
std::pair<StridedRows<const T>, StridedRows<const T>> kv_rows(const SegmentAttnBwdParams& p, int seq, int h_kv) {
  const int64_t k_begin = p.cu_seqlens_k[seq];
  return {strided_rows(static_cast<const T*>(p.k) + k_begin * p.k_row_stride + h_kv * p.k_head_stride, p.k_row_stride),
          strided_rows(static_cast<const T*>(p.v) + k_begin * p.v_row_stride + h_kv * p.v_head_stride, p.v_row_stride)};
}

// dq of a query tile: softmax_scale times the accumulated rows (0 for rows that saw no key), into the gradient.
template <typename T>
void store_dq(const SegmentAttnBwdParams& p, int h, int q0, int m, const AccRows& dq_rows, BwdScratch& w) {
  const int d = p.head_dim;
  dq_rows.zero_unwritten(m, d, w.dq.data());
  std::fill(w.row_scale.begin(), w.row_scale.end(), p.softmax_scale);
  store_rows(w.dq.data(), d, m, d, w.row_scale.data(),
             strided_rows(static_cast<T*>(p.dq) + q0 * p.dq_row_stride + h * p.dq_head_stride, p.dq_row_stride), 0);
}

// bwd_query_tile's loop on a path's operands (float_path.h).
template <typename Path, typename T>
void bwd_query_tile_on(const SegmentAttnBwdParams& p, const float* delta, int seq, int h, int q0, int m,
                       int max_limit, float* dkv, BwdScratch& w) {
  using Ops = typename Path::Operands;
  const int d = p.head_dim, h_kv = h / (p.h_q / p.h_kv);
  const QuerySide s = load_query_side<Path, T>(p, delta, h, q0, m, max_limit, w);
  const auto [k_rows, v_rows] = kv_rows<T>(p, seq, h_kv);
  AccRows dq_rows;
  const int n_tiles = key_tiles_to_visit(max_limit, kTileK);
  for (int t = 0; t < n_tiles; ++t) {
    const int k0 = t * kTileK, n = std::min(kTileK, max_limit - k0);
    const BwdKeyTile kt = Path::bwd_key_tile(k_rows, v_rows, k0, n, d, m, w.k.data(), w.v.data());
    // Boundary tiles in sub-tiles that skip the query lanes seeing none of their keys, as in the forward
    // (kSubTileK is even: a sub-tile starts on a whole pair of keys).
    const int step = key_tile_is_full(s.min_limit, k0, n) ? n : kSubTileK;
    for (int s0 = 0; s0 < n; s0 += step) {
      const int ks = k0 + s0, ns = std::min(step, n - s0);
      const int c0 = first_lanes_seeing(w.limit.data(), m, ks), cols = s.m_pad - c0;
      if (c0 == m) continue;
      const int lanes = Path::depth(m - c0);  // c0 is a multiple of W: lane pairs start on an even lane
      probs_and_dprobs<Path>(s, c0, ks, ns, d, p.softmax_scale, {kt.k.p + s0 * kt.k.ld, kt.k.ld},
                             {kt.v.p + s0 * kt.v.ld, kt.v.ld}, w);
      float* pt = w.pt.data() + c0;
      float* ds = w.dpt.data() + c0;  // dS^T, over dP^T
      score_grad_cols(pt, ds, ns, s.ld, cols, w.delta.data() + c0);
      float* dk = dkv + static_cast<int64_t>(ks) * 2 * d;
      // dV += P^T dout and dK += dS^T q over the lanes' queries: A is S^T's rows.
      Path::prepare_lanes(pt, ns, s.ld, cols);
      gemm_ops(ns, d, lanes, Ops{pt, s.ld, 1, s.dout.p + Path::depth(c0) * s.dout.ld, s.dout.ld}, dk + d, 2 * d,
               CMode::kAdd);
      const float* ds_by_keys = Path::dscores_by_keys(ds, ns, s.ld, cols, pt);  // P^T is used up
      Path::prepare_lanes(ds, ns, s.ld, cols);
      gemm_ops(ns, d, lanes, Ops{ds, s.ld, 1, s.q.p + Path::depth(c0) * s.q.ld, s.q.ld}, dk, 2 * d, CMode::kAdd);
      // dQ += dS K on rows [c0, m): A is dS^T read transposed.
      float* dq = w.dq.data();
      const CMode mode = dq_rows.before_product(c0, d, dq, CMode::kAdd);
      const Ops ds_k{ds_by_keys, 1, s.ld, kt.k_panel.p + Path::depth(s0) * kt.k_panel.ld, kt.k_panel.ld};
      gemm_ops(m - c0, d, Path::depth(ns), ds_k, dq + static_cast<int64_t>(c0) * d, d, mode);
    }
  }
  store_dq<T>(p, h, q0, m, dq_rows, w);
}

// One (query head, query tile) of a work item: dq of the tile, and its share of dK/dV added into dkv
// (float32 [len_k, 2, d]: dK row then dV row of each key), on choose_path.h's path.
template <typename T>
void bwd_query_tile(const SegmentAttnBwdParams& p, const float* delta, int seq, int h, int q0, int m, int max_limit,
                    float* dkv, BwdScratch& w) {
  with_path<T>(p.head_dim, [&](auto path) {
    bwd_query_tile_on<decltype(path), T>(p, delta, seq, h, q0, m, max_limit, dkv, w);
  });
}

}  // namespace ism::cpu::ISM_ISA_NS
