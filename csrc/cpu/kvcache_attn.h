// CPU attention over a KV cache: append the new keys/values in place, then attend with kv_limit.
//
// The cache is contiguous ([b_cache, capacity, h_kv, d], one row per sequence) or paged
// ([num_pages, page_size, h_kv, d] and a block table). Both are read through row accessors
// (row_access.h), so the attention itself is the forward's inner loop (attend_tile.h) unchanged.
#pragma once

namespace ism::cpu::ISM_ISA_NS {

// Calls fn(k_rows, v_rows) with the accessors of head h_kv of sequence `seq`.
template <typename T, typename Fn>
void with_cache_rows(const KVCacheAttnParams& p, int seq, int h_kv, Fn fn) {
  T* k = static_cast<T*>(p.k_cache) + h_kv * p.k_cache_head_stride;
  T* v = static_cast<T*>(p.v_cache) + h_kv * p.v_cache_head_stride;
  if (p.page_size > 0) {
    const int32_t* table = p.block_table + seq * p.block_table_batch_stride;
    fn(PagedRows<T>{k, p.k_cache_batch_stride, p.k_cache_row_stride, table, p.page_size},
       PagedRows<T>{v, p.v_cache_batch_stride, p.v_cache_row_stride, table, p.page_size});
  } else {
    const int64_t row = p.cache_batch_idx != nullptr ? p.cache_batch_idx[seq] : seq;
    fn(strided_rows(k + row * p.k_cache_batch_stride, p.k_cache_row_stride),
       strided_rows(v + row * p.v_cache_batch_stride, p.v_cache_row_stride));
  }
}

template <typename T>
void append(const KVCacheAttnParams& p) {
  const int64_t row_bytes = static_cast<int64_t>(p.head_dim) * sizeof(T);
  at::parallel_for(0, static_cast<int64_t>(p.batch) * p.seqlen_new, 16, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int seq = static_cast<int>(i / p.seqlen_new), t = static_cast<int>(i % p.seqlen_new);
      const int64_t pos = p.cache_seqlens[seq] + t;
      for (int h = 0; h < p.h_kv; ++h) {
        const T* kn = static_cast<const T*>(p.k_new) + seq * p.k_new_batch_stride + t * p.k_new_row_stride +
                      h * p.k_new_head_stride;
        const T* vn = static_cast<const T*>(p.v_new) + seq * p.v_new_batch_stride + t * p.v_new_row_stride +
                      h * p.v_new_head_stride;
        with_cache_rows<T>(p, seq, h, [&](auto k_rows, auto v_rows) {
          std::memcpy(k_rows(pos), kn, row_bytes);
          std::memcpy(v_rows(pos), vn, row_bytes);
        });
      }
    }
  });
}

struct GroupScratch {
  FwdScratch fwd;
  ScratchBuffer<int32_t> limit;  // the rows' kv_limit inside the chunk, repeated for every head of the group
  explicit GroupScratch(int d) : fwd(d), limit(kTileQ) {}
};

// Key chunks per (sequence, K/V head) for decode: FlashDecoding's split over the keys, so that a batch
// with fewer (sequence, K/V head) pairs than threads still keeps every thread busy. A chunk is at least
// kMinChunkKeys long, so the combine stays negligible next to the attention.
constexpr int kMinChunkKeys = 256;

inline int key_splits(const KVCacheAttnParams& p, int longest) {
  const int64_t threads = at::get_num_threads();
  if (threads == 1) return 1;  // nothing to balance: a split would only add its combine
  const int64_t pairs = static_cast<int64_t>(p.batch) * p.h_kv;
  const int64_t wanted = (4 * threads + pairs - 1) / pairs;
  const int64_t possible = std::max(1, (longest + kMinChunkKeys - 1) / kMinChunkKeys);
  return static_cast<int>(std::clamp<int64_t>(wanted, 1, possible));
}

// The group's rows against keys [c0, c1) of the cache: normalised partial output and lse in float32.
template <typename T>
void attend_chunk(const KVCacheAttnParams& p, int b, int h_kv, int group, int c0, int c1, float* out, float* lse,
                  GroupScratch& w) {
  const int lq = p.seqlen_q, m = group * lq, h0 = h_kv * group;
  const int32_t* lim = p.kv_limit + static_cast<int64_t>(b) * lq;
  int chunk_max = 0;
  for (int r = 0; r < m; ++r) {
    w.limit[r] = std::clamp(lim[r % lq] - c0, 0, c1 - c0);
    chunk_max = std::max(chunk_max, w.limit[r]);
  }
  const GroupedRows<const T> q{static_cast<const T*>(p.q) + b * p.q_batch_stride + h0 * p.q_head_stride,
                               p.q_row_stride, p.q_head_stride, lq};
  with_cache_rows<T>(p, b, h_kv, [&](auto k_rows, auto v_rows) {
    attend_rows(q, m, w.limit.data(), chunk_max, OffsetRows<decltype(k_rows)>{k_rows, c0},
                OffsetRows<decltype(v_rows)>{v_rows, c0}, p.head_dim, p.softmax_scale, strided_rows(out, p.head_dim),
                lse, w.fwd);
  });
}

// out = sum over chunks of exp(lse_c - lse) * out_c, lse = logsumexp of the chunks' lse: the group's rows of
// one (sequence, K/V head) from its `splits` partial results.
template <typename T>
void combine_chunks(const KVCacheAttnParams& p, int b, int h_kv, int group, int splits, const float* out_parts,
                    const float* lse_parts) {
  const int lq = p.seqlen_q, m = group * lq, d = p.head_dim, h0 = h_kv * group;
  std::vector<float> weight(splits);  // exp(lse_c - lse_max) of each chunk, once per row
  for (int r = 0; r < m; ++r) {
    float top = -std::numeric_limits<float>::infinity();
    bool nan = false;  // a chunk whose scores were NaN makes the whole row NaN, as one unsplit pass would
    for (int c = 0; c < splits; ++c) {
      nan = nan || std::isnan(lse_parts[c * m + r]);
      top = std::max(top, lse_parts[c * m + r]);
    }
    const int h = h0 + r / lq, i = r % lq;
    T* dst = static_cast<T*>(p.out) + b * p.out_batch_stride + i * p.out_row_stride + h * p.out_head_stride;
    float* lse = p.lse + b * p.lse_batch_stride + h * p.lse_head_stride + i;
    if (nan) {
      for (int c = 0; c < d; ++c) dst[c] = static_cast<T>(std::numeric_limits<float>::quiet_NaN());
      *lse = std::numeric_limits<float>::quiet_NaN();
      continue;
    }
    if (top == -std::numeric_limits<float>::infinity()) {  // the row sees nothing: 0 and -inf
      for (int c = 0; c < d; ++c) dst[c] = static_cast<T>(0.f);
      *lse = top;
      continue;
    }
    float total = 0.f;
    for (int c = 0; c < splits; ++c) total += weight[c] = std::exp(lse_parts[c * m + r] - top);
    for (int col = 0; col < d; ++col) {
      float acc = 0.f;
      for (int c = 0; c < splits; ++c) acc += weight[c] * out_parts[(static_cast<int64_t>(c) * m + r) * d + col];
      dst[col] = static_cast<T>(acc / total);
    }
    *lse = top + std::log(total);
  }
}

// Decode and short new segments: one tile per (sequence, K/V head, key chunk) holding the whole group's
// queries (group * seqlen_q <= kTileQ rows), then the chunks combined.
template <typename T>
void attend_grouped(const KVCacheAttnParams& p, int group) {
  const int lq = p.seqlen_q, m = group * lq, d = p.head_dim;
  std::vector<int> longest(p.batch);
  for (int b = 0; b < p.batch; ++b) {
    const int32_t* lim = p.kv_limit + static_cast<int64_t>(b) * lq;
    longest[b] = *std::max_element(lim, lim + lq);
  }
  const int splits = key_splits(p, *std::max_element(longest.begin(), longest.end()));
  const int64_t parts = static_cast<int64_t>(p.batch) * p.h_kv * splits;
  std::vector<float> out_parts(parts * m * d), lse_parts(parts * m);
  std::vector<WorkItem> items;
  for (int b = 0; b < p.batch; ++b) {
    for (int h = 0; h < p.h_kv; ++h) {
      for (int c = 0; c < splits; ++c) items.push_back({b, h, c, static_cast<int64_t>(m) * longest[b] / splits + 1});
    }
  }
  run_heavy_first(
      items, [&p] { return GroupScratch(p.head_dim); },
      [&](const WorkItem& item, GroupScratch& w) {
        const int chunk = (longest[item.seq] + splits - 1) / splits;
        const int c0 = std::min(item.tile * chunk, longest[item.seq]);
        const int c1 = std::min(c0 + chunk, longest[item.seq]);
        const int64_t part = (static_cast<int64_t>(item.seq) * p.h_kv + item.head) * splits + item.tile;
        attend_chunk<T>(p, item.seq, item.head, group, c0, c1, out_parts.data() + part * m * d,
                        lse_parts.data() + part * m, w);
      });
  // The combine reads m * d * splits floats per pair: small next to the attention, so a decode batch runs it
  // on the calling thread instead of opening a second parallel region (each region waits for every thread).
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 16) / (static_cast<int64_t>(m) * d * splits));
  at::parallel_for(0, static_cast<int64_t>(p.batch) * p.h_kv, grain, [&](int64_t begin, int64_t end) {
    for (int64_t pair = begin; pair < end; ++pair) {
      combine_chunks<T>(p, static_cast<int>(pair / p.h_kv), static_cast<int>(pair % p.h_kv), group, splits,
                        out_parts.data() + pair * splits * m * d, lse_parts.data() + pair * splits * m);
    }
  });
}

// One tile per (sequence, query head, kTileQ rows): new segments, and groups too tall for one tile.
template <typename T>
void attend_per_head(const KVCacheAttnParams& p) {
  const int q_tiles = (p.seqlen_q + kTileQ - 1) / kTileQ;
  std::vector<WorkItem> items;
  for (int b = 0; b < p.batch; ++b) {
    for (int t = 0; t < q_tiles; ++t) {
      const int32_t* lim = p.kv_limit + static_cast<int64_t>(b) * p.seqlen_q + t * kTileQ;
      const int m = std::min(kTileQ, p.seqlen_q - t * kTileQ);
      const int64_t cost = static_cast<int64_t>(m) * *std::max_element(lim, lim + m) + 1;
      for (int h = 0; h < p.h_q; ++h) items.push_back({b, h, t, cost});
    }
  }
  const int group = p.h_q / p.h_kv;
  run_heavy_first(
      items, [&p] { return FwdScratch(p.head_dim); },
      [&p, group](const WorkItem& item, FwdScratch& w) {
        const int b = item.seq, h = item.head, r0 = item.tile * kTileQ;
        const int m = std::min(kTileQ, p.seqlen_q - r0);
        const int32_t* lim = p.kv_limit + static_cast<int64_t>(b) * p.seqlen_q + r0;
        const T* q = static_cast<const T*>(p.q) + b * p.q_batch_stride + r0 * p.q_row_stride + h * p.q_head_stride;
        T* out = static_cast<T*>(p.out) + b * p.out_batch_stride + r0 * p.out_row_stride + h * p.out_head_stride;
        float* lse = p.lse + b * p.lse_batch_stride + h * p.lse_head_stride + r0;
        with_cache_rows<T>(p, b, h / group, [&](auto k_rows, auto v_rows) {
          attend_query_tile(strided_rows(q, p.q_row_stride), m, lim, *std::max_element(lim, lim + m), k_rows, v_rows,
                            p.head_dim, p.softmax_scale, strided_rows(out, p.out_row_stride), lse, w);
        });
      });
}

template <typename T>
void attend(const KVCacheAttnParams& p) {
  const int group = p.h_q / p.h_kv;
  if (group * p.seqlen_q <= kTileQ) {
    attend_grouped<T>(p, group);
  } else {
    attend_per_head<T>(p);
  }
}

template <typename T>
void kvcache_impl(const KVCacheAttnParams& p) {
  if (p.batch == 0) return;  // an empty batch: nothing to write or attend
  if (p.seqlen_new > 0) append<T>(p);
  if (p.seqlen_q > 0) attend<T>(p);
}

inline void kvcache_attn(const KVCacheAttnParams& params) {
  with_element_type(params.dtype, [&](auto zero) { kvcache_impl<decltype(zero)>(params); });
}

}  // namespace ism::cpu::ISM_ISA_NS
