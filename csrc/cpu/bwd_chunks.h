// How the backward splits its work (segment_attn_bwd.h): chunks of a (sequence, K/V head)'s query tiles, each with
// its own float32 dK/dV rows, and the reduction of those rows, in chunk order, into the gradients.
#pragma once

namespace ism::cpu::ISM_ISA_NS {

// The backward splits a (sequence, K/V head) into chunks of query tiles until there are this many work items,
// so that a batch with few K/V heads still keeps a machine's threads busy (each chunk costs one float32 copy
// of the sequence's dK/dV rows).
constexpr int kBwdMinItems = 16;

// The (query head, query tile) pairs of one (sequence, K/V head), split into runs of about equal cost.
struct BwdChunk {
  int seq, h_kv;
  std::vector<std::pair<int, int>> tiles;  // (query head, query tile index)
  int64_t cost = 0;
};

// Chunks in (sequence, K/V head) order; those of one pair are adjacent. A pair with no query tile has none.
inline std::vector<BwdChunk> plan_bwd_chunks(const SegmentAttnBwdParams& p, const QueryTiles& tiles) {
  const int group = p.h_q / p.h_kv;
  const int64_t kv_pairs = std::max<int64_t>(1, static_cast<int64_t>(p.batch) * p.h_kv);
  const int64_t want = (kBwdMinItems + kv_pairs - 1) / kv_pairs;
  std::vector<BwdChunk> chunks;
  for (int b = 0; b < p.batch; ++b) {
    const int len = p.cu_seqlens_q[b + 1] - p.cu_seqlens_q[b];
    for (int hk = 0; hk < p.h_kv; ++hk) {
      int64_t total = 0;
      for (int t = 0; t < tiles.count(b); ++t) {
        total += group * (static_cast<int64_t>(tile_rows(len, t)) * tiles.max_limit_of(b, t) + 1);
      }
      const int64_t n_chunks = std::clamp<int64_t>(want, 1, std::max(1, group * tiles.count(b)));
      const size_t first = chunks.size();
      int64_t before = 0;  // cost of the pairs already placed: a pair goes to chunk before * n_chunks / total
      for (int g = 0; g < group; ++g) {
        for (int t = 0; t < tiles.count(b); ++t) {
          const int64_t cost = static_cast<int64_t>(tile_rows(len, t)) * tiles.max_limit_of(b, t) + 1;
          const size_t c = first + static_cast<size_t>(std::min(n_chunks - 1, before * n_chunks / total));
          while (chunks.size() <= c) chunks.push_back({b, hk, {}, 0});
          chunks[c].tiles.push_back({hk * group + g, t});
          chunks[c].cost += cost;
          before += cost;
        }
      }
    }
  }
  return chunks;
}

// dK = softmax_scale * (sum of the chunks' dK rows), dV = sum of their dV rows, added in chunk order, converted
// into the gradient tensors; zeros for the K/V heads of sequences with no query.
template <typename T>
void reduce_and_store_dkv(const SegmentAttnBwdParams& p, const std::vector<BwdChunk>& chunks,
                          const std::vector<std::vector<float>>& partial) {
  const int d = p.head_dim;
  // chunk range [first[i], first[i + 1]) of (sequence, K/V head) i.
  std::vector<size_t> first(static_cast<size_t>(p.batch) * p.h_kv + 1, 0);
  for (const BwdChunk& c : chunks) ++first[static_cast<size_t>(c.seq) * p.h_kv + c.h_kv + 1];
  for (size_t i = 1; i < first.size(); ++i) first[i] += first[i - 1];
  at::parallel_for(0, static_cast<int64_t>(p.batch) * p.h_kv, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> sum(2 * static_cast<size_t>(d));
    const float scales[2] = {p.softmax_scale, 1.f};
    for (int64_t pair = begin; pair < end; ++pair) {
      const int seq = static_cast<int>(pair / p.h_kv), h_kv = static_cast<int>(pair % p.h_kv);
      const int64_t k_begin = p.cu_seqlens_k[seq];
      const int len_k = p.cu_seqlens_k[seq + 1] - static_cast<int>(k_begin);
      const auto dk =
          strided_rows(static_cast<T*>(p.dk) + k_begin * p.dk_row_stride + h_kv * p.dk_head_stride, p.dk_row_stride);
      const auto dv =
          strided_rows(static_cast<T*>(p.dv) + k_begin * p.dv_row_stride + h_kv * p.dv_head_stride, p.dv_row_stride);
      for (int r = 0; r < len_k; ++r) {
        std::fill(sum.begin(), sum.end(), 0.f);
        for (size_t c = first[pair]; c < first[pair + 1]; ++c) {
          if (partial[c].empty()) continue;  // a chunk that got no query tile
          const float* row = partial[c].data() + static_cast<int64_t>(r) * 2 * d;
          for (int i = 0; i < 2 * d; ++i) sum[i] += row[i];
        }
        store_rows(sum.data(), d, 1, d, scales, dk, r);
        store_rows(sum.data() + d, d, 1, d, scales + 1, dv, r);
      }
    }
  });
}

}  // namespace ism::cpu::ISM_ISA_NS
