// The forward inner loop of the CPU kernels: one query tile against the key tiles it can see, with blocked
// online softmax (FlashAttention's algorithm) on transposed score tiles (softmax_cols.h). Shared by the
// packed varlen forward and the KV-cache attention, which differ only in where the rows live
// (row_access.h). The loop is written once over a path (float_path.h): float32 operands, or bfloat16 pairs on
// the AVX512_BF16 dot product (pair_path.h).
#pragma once

namespace ism::cpu::ISM_ISA_NS {

// Per-thread tile buffers of the forward (float32; none grows with the sequence; not zeroed: scratch_buffer.h).
struct FwdScratch {
  ScratchBuffer<float> qt, st, acc, k, v, row_max, row_sum, alpha, out_scale, tile_max;
  ScratchBuffer<int32_t> limit;
  explicit FwdScratch(int d)
      : qt(static_cast<size_t>(d) * padded_ld(kTileQ)), st(static_cast<size_t>(kTileK) * padded_ld(kTileQ)),
        acc(static_cast<size_t>(kTileQ) * d), k(static_cast<size_t>(kTileK) * d),
        v(static_cast<size_t>(kTileK) * padded_ld(d)), row_max(kTileQ), row_sum(kTileQ),
        alpha(kTileQ), out_scale(kTileQ), tile_max(kTileQ), limit(kTileQ) {}
};

inline int pad_lanes(int m) { return (m + Vec::W - 1) / Vec::W * Vec::W; }

// The end of a query tile: out = acc / row_sum and lse in natural log, from the final softmax state in w.
template <typename ORows>
void finish_rows(int m, int d, const ORows& out, float* lse, FwdScratch& w) {
  for (int r = 0; r < m; ++r) {
    const float l = w.row_sum[r];
    // A row that sees nothing has l = 0: output 0 and lse -inf, never 0/0. NaN passes through both.
    w.out_scale[r] = l == 0.f ? 0.f : 1.f / l;
    lse[r] = l == 0.f ? -std::numeric_limits<float>::infinity() : (w.row_max[r] + std::log2(l)) * kLn2;
  }
  store_rows(w.acc.data(), d, m, d, w.out_scale.data(), out, 0);
}

// Boundary key tiles (some row sees only part of them) go in sub-tiles of this many keys: a sub-tile skips the
// leading query lanes that see none of its keys, so a causal diagonal tile computes about 5/8 of its pairs
// instead of all of them, and the boundary tiles of a segment layout shrink the same way.
constexpr int kSubTileK = 32;

// Which rows of a query tile's accumulator (acc = P V in the forward, dQ in the backward) a product over
// rows [c0, m) has written: rows [acc_from, m) have been, the rows above have not (they have seen no key yet).
struct AccRows {
  static constexpr int kNone = 1 << 30;
  int acc_from = kNone;

  // The mode of the next product into rows [c0, m): the first one overwrites; rows entering later start from
  // zero, then the product runs in `later` mode (the forward's rescale leaves them zero: alpha is 0 while a
  // row has seen nothing).
  CMode before_product(int c0, int d, float* acc, CMode later) {
    if (acc_from == kNone) {
      acc_from = c0;
      return CMode::kSet;
    }
    if (c0 < acc_from) {
      std::fill(acc + static_cast<int64_t>(c0) * d, acc + static_cast<int64_t>(acc_from) * d, 0.f);
      acc_from = c0;
    }
    return later;
  }

  // Rows that no product wrote (they saw no key): zero, as the tile's result requires.
  void zero_unwritten(int m, int d, float* acc) const {
    std::fill(acc, acc + static_cast<int64_t>(std::min(acc_from, m)) * d, 0.f);
  }
};

// The first vector of query lanes (a multiple of W) that sees any key from `key` on: the lanes before it see
// none of them (limit[r] <= key), so a sub-tile starting at `key` skips them. m when no row sees it.
inline int first_lanes_seeing(const int32_t* limit, int m, int key) {
  int first = 0;
  while (first < m && limit[first] <= key) ++first;
  return first == m ? m : first / Vec::W * Vec::W;
}

// The softmax state of a query tile's lanes before its first key tile, and their limits (0 on padding lanes, which
// see nothing); returns the smallest limit of the m rows (max_limit if it is larger).
inline int start_lanes(const int32_t* limit, int m, int max_limit, FwdScratch& w) {
  int min_limit = max_limit;
  for (int r = 0; r < pad_lanes(m); ++r) {
    w.limit[r] = r < m ? limit[r] : 0;
    if (r < m) min_limit = std::min(min_limit, limit[r]);
    w.row_max[r] = -std::numeric_limits<float>::infinity();
    w.row_sum[r] = 0.f;
  }
  return min_limit;
}

// attend_query_tile's loop on a path's operands (float_path.h).
template <typename Path, typename QRows, typename KRows, typename VRows, typename ORows>
void attend_query_tile_on(const QRows& q, int m, const int32_t* limit, int max_limit, const KRows& k, const VRows& v,
                          int d, float softmax_scale, const ORows& out, float* lse, FwdScratch& w) {
  const int m_pad = pad_lanes(m), ld = padded_ld(m_pad);  // q^T and S^T: m_pad live lanes in rows of ld
  // Scores are formed in the log2 domain: softmax_scale * log2(e), in q or on the sums as the path does it.
  const float log2_scale = softmax_scale * kLog2e;
  Path::pack_queries(q, m, d, log2_scale, w.qt.data(), ld);
  const int min_limit = start_lanes(limit, m, max_limit, w);
  AccRows acc_rows;
  const int n_tiles = key_tiles_to_visit(max_limit, kTileK);
  for (int t = 0; t < n_tiles; ++t) {
    const int k0 = t * kTileK;
    const int n = std::min(kTileK, max_limit - k0);  // keys past max_limit are invisible to all rows
    const FloatTile kt = Path::row_operand(k, k0, n, d, w.k.data());
    const FloatTile vt = Path::panel_operand(v, k0, n, d, m, w.v.data());  // P V's B panel
    const bool masked = !key_tile_is_full(min_limit, k0, n);
    const int step = masked ? kSubTileK : n;  // kSubTileK is even: a sub-tile starts on a whole pair of keys
    for (int s0 = 0; s0 < n; s0 += step) {
      const int ks = k0 + s0, ns = std::min(step, n - s0);
      const int c0 = first_lanes_seeing(w.limit.data(), m, ks), cols = m_pad - c0;
      if (c0 == m) continue;
      std::fill(w.tile_max.begin() + c0, w.tile_max.begin() + m_pad, -std::numeric_limits<float>::infinity());
      const MaskAndColumnMax mask_max{w.limit.data() + c0, ks, masked, w.tile_max.data() + c0};
      gemm_ops(ns, cols, Path::depth(d), typename Path::Operands{kt.p + s0 * kt.ld, kt.ld, 1, w.qt.data() + c0, ld},
               w.st.data() + c0, ld, CMode::kSet, nullptr, Path::score_epilogue(log2_scale, mask_max));
      softmax_update_cols<typename Path::ProbStore>(
          w.st.data() + c0, ns, ld, cols, w.tile_max.data() + c0,
          SoftmaxState{w.row_max.data() + c0, w.row_sum.data() + c0, w.alpha.data() + c0});
      // acc = diag(alpha) acc + P V on rows [c0, m), P read from S^T through its strides.
      float* acc = w.acc.data();
      const CMode mode = acc_rows.before_product(c0, d, acc, CMode::kScaleAdd);
      const typename Path::Operands pv{w.st.data() + c0, 1, ld, vt.p + Path::depth(s0) * vt.ld, vt.ld};
      gemm_ops(m - c0, d, Path::depth(ns), pv, acc + static_cast<int64_t>(c0) * d, d, mode, w.alpha.data() + c0);
    }
  }
  acc_rows.zero_unwritten(m, d, w.acc.data());  // rows that saw no key: 0 before the 1 / row_sum of 0
  finish_rows(m, d, out, lse, w);
}

// Attends rows q(0..m) to keys/values k(j), v(j) for j < limit[r] (row r); writes out(0..m) and lse[0..m)
// (natural log; a zero output and -inf for rows that see nothing, NaN for rows whose scores are NaN).
// `max_limit` is the largest limit of the m rows: key tiles at or past it are never read. The path is
// choose_path.h's.
template <typename QRows, typename KRows, typename VRows, typename ORows>
void attend_query_tile(const QRows& q, int m, const int32_t* limit, int max_limit, const KRows& k, const VRows& v,
                       int d, float softmax_scale, const ORows& out, float* lse, FwdScratch& w) {
  with_path<row_element_t<KRows>>(d, [&](auto path) {
    attend_query_tile_on<decltype(path)>(q, m, limit, max_limit, k, v, d, softmax_scale, out, lse, w);
  });
}

}  // namespace ism::cpu::ISM_ISA_NS
