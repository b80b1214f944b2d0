// The backward's pre-pass: delta = rowsum(dout * out) - dlse per query row and head (segment_attn_bwd.h), from
// the output for float32 inputs, from the float32 probabilities for half-precision ones.
#pragma once

namespace ism::cpu::ISM_ISA_NS {

// delta = rowsum(dout * out) - dlse, float32 [h_q, total_q], from the output the forward returned.
template <typename T>
std::vector<float> delta_from_output(const SegmentAttnBwdParams& p) {
  std::vector<float> delta(static_cast<size_t>(p.h_q) * p.total_q);
  at::parallel_for(0, static_cast<int64_t>(p.h_q) * p.total_q, 256, [&](int64_t begin, int64_t end) {
    std::vector<float> o(p.head_dim), g(p.head_dim);
    for (int64_t i = begin; i < end; ++i) {
      const int64_t h = i / p.total_q, row = i % p.total_q;
      convert_row(static_cast<const T*>(p.out) + row * p.out_row_stride + h * p.out_head_stride, p.head_dim, 1.f,
                  o.data());
      convert_row(static_cast<const T*>(p.dout) + row * p.dout_row_stride + h * p.dout_head_stride, p.head_dim, 1.f,
                  g.data());
      float acc = 0.f;
      for (int c = 0; c < p.head_dim; ++c) acc += o[c] * g[c];
      delta[i] = acc - (p.dlse != nullptr ? p.dlse[h * p.lse_head_stride + row] : 0.f);
    }
  });
  return delta;
}

// The query tile's delta (summed into w.delta) less dlse, into delta [h_q, total_q].
inline void store_delta(const SegmentAttnBwdParams& p, int h, int q0, int m, float* delta, const BwdScratch& w) {
  for (int r = 0; r < m; ++r) {
    const int64_t row = q0 + r;
    delta[static_cast<int64_t>(h) * p.total_q + row] =
        w.delta[r] - (p.dlse != nullptr ? p.dlse[h * p.lse_head_stride + row] : 0.f);
  }
}

// delta_of_query_tile's loop on a path's operands (float_path.h).
template <typename Path, typename T>
void delta_of_query_tile_on(const SegmentAttnBwdParams& p, int seq, int h, int q0, int m, int max_limit,
                            float* delta, BwdScratch& w) {
  const int d = p.head_dim;
  const QuerySide s = load_query_side<Path, T>(p, nullptr, h, q0, m, max_limit, w);
  const auto [k_rows, v_rows] = kv_rows<T>(p, seq, h / (p.h_q / p.h_kv));
  std::fill(w.delta.begin(), w.delta.end(), 0.f);
  for (int t = 0; t < key_tiles_to_visit(max_limit, kTileK); ++t) {
    const int k0 = t * kTileK, n = std::min(kTileK, max_limit - k0);
    const BwdKeyTile kt = Path::bwd_key_tile(k_rows, v_rows, k0, n, d, 0, w.k.data(), w.v.data());  // no dQ
    probs_and_dprobs<Path>(s, 0, k0, n, d, p.softmax_scale, kt.k, kt.v, w);
    add_col_dot(w.pt.data(), w.dpt.data(), n, s.ld, s.m_pad, w.delta.data());
  }
  store_delta(p, h, q0, m, delta, w);
}

// delta of one (query head h, query tile of m rows at q0) of sequence seq, into delta [h_q, total_q], on
// choose_path.h's path.
template <typename T>
void delta_of_query_tile(const SegmentAttnBwdParams& p, int seq, int h, int q0, int m, int max_limit, float* delta,
                         BwdScratch& w) {
  with_path<T>(p.head_dim, [&](auto path) {
    delta_of_query_tile_on<decltype(path), T>(p, seq, h, q0, m, max_limit, delta, w);
  });
}

// delta = sum_j P_ij dP_ij - dlse: the same quantity as rowsum(dout * out) in exact arithmetic, but taken
// from the float32 probabilities rather than from an output rounded to half precision. Where one key takes
// nearly all the weight, dP - delta cancels, and the rounding of the output would dominate dS.
template <typename T>
std::vector<float> delta_from_probs(const SegmentAttnBwdParams& p, const QueryTiles& tiles) {
  std::vector<float> delta(static_cast<size_t>(p.h_q) * p.total_q);
  std::vector<WorkItem> items = tiles.items(p);
  run_by_head_heavy_first(
      items, [&p] { return BwdScratch(p.head_dim); },
      [&](const WorkItem& item, BwdScratch& w) {
        const int q0 = p.cu_seqlens_q[item.seq] + item.tile * kTileQ;
        const int m = tile_rows(p.cu_seqlens_q[item.seq + 1] - p.cu_seqlens_q[item.seq], item.tile);
        delta_of_query_tile<T>(p, item.seq, item.head, q0, m, tiles.max_limit_of(item.seq, item.tile),
                               delta.data(), w);
      });
  return delta;
}

}  // namespace ism::cpu::ISM_ISA_NS
