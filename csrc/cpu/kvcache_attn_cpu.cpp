// CPU attention over a KV cache: append the new keys/values in place, then attend with kv_limit.
//
// The cache is contiguous ([b_cache, capacity, h_kv, d], one row per sequence) or paged
// ([num_pages, page_size, h_kv, d] and a block table). Both are read through row accessors
// (tile_io.h), so the attention itself is the forward's inner loop (attend_tile.h) unchanged.
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "attend_tile.h"
#include "segment_attn_cpu.h"
#include "work_queue.h"

namespace ism::cpu {
namespace {

// Row i of one head of a paged cache: page block_table[i / page_size], slot i % page_size.
template <typename T>
struct PagedRows {
  T* pages;  // cache base already offset to the head
  int64_t page_stride, row_stride;
  const int32_t* table;  // this sequence's block-table row
  int page_size;
  T* operator()(int64_t i) const {
    return pages + table[i / page_size] * page_stride + (i % page_size) * row_stride;
  }
};

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

// Row r of the query heads h0 .. h0 + group - 1 that share one K/V head, head-major: head h0 + r / seqlen,
// position r % seqlen. Decode packs a GQA group into one tile this way, so the group reads each K/V tile
// of the cache once instead of once per query head.
template <typename T>
struct GroupedRows {
  T* base;  // row 0 of head h0
  int64_t row_stride, head_stride;
  int seqlen;
  T* operator()(int64_t r) const { return base + (r % seqlen) * row_stride + (r / seqlen) * head_stride; }
};

struct GroupScratch {
  FwdScratch fwd;
  std::vector<int32_t> limit;  // the rows' kv_limit, repeated for every head of the group
  std::vector<float> lse;
  explicit GroupScratch(int d_pad) : fwd(d_pad), limit(kTileQ), lse(kTileQ) {}
};

// One tile per (sequence, K/V head): the whole group's queries (group * seqlen_q <= kTileQ rows).
template <typename T>
void attend_grouped(const KVCacheAttnParams& p, int group) {
  std::vector<WorkItem> items;
  for (int b = 0; b < p.batch; ++b) {
    const int32_t* lim = p.kv_limit + static_cast<int64_t>(b) * p.seqlen_q;
    const int64_t cost = static_cast<int64_t>(group) * p.seqlen_q * *std::max_element(lim, lim + p.seqlen_q) + 1;
    for (int h = 0; h < p.h_kv; ++h) items.push_back({b, h, 0, cost});
  }
  run_heavy_first(
      items, [&p] { return GroupScratch(round_up_lanes(p.head_dim)); },
      [&p, group](const WorkItem& item, GroupScratch& w) {
        const int b = item.seq, h0 = item.head * group, lq = p.seqlen_q, m = group * lq;
        const int32_t* lim = p.kv_limit + static_cast<int64_t>(b) * lq;
        for (int r = 0; r < m; ++r) w.limit[r] = lim[r % lq];
        const GroupedRows<const T> q{static_cast<const T*>(p.q) + b * p.q_batch_stride + h0 * p.q_head_stride,
                                     p.q_row_stride, p.q_head_stride, lq};
        const GroupedRows<T> out{static_cast<T*>(p.out) + b * p.out_batch_stride + h0 * p.out_head_stride,
                                 p.out_row_stride, p.out_head_stride, lq};
        with_cache_rows<T>(p, b, item.head, [&](auto k_rows, auto v_rows) {
          attend_query_tile(q, m, w.limit.data(), *std::max_element(lim, lim + lq), k_rows, v_rows, p.head_dim,
                            p.softmax_scale, out, w.lse.data(), w.fwd);
        });
        float* lse = p.lse + b * p.lse_batch_stride + h0 * p.lse_head_stride;
        for (int r = 0; r < m; ++r) lse[(r / lq) * p.lse_head_stride + r % lq] = w.lse[r];
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
      items, [&p] { return FwdScratch(round_up_lanes(p.head_dim)); },
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
  if (group > 1 && group * p.seqlen_q <= kTileQ) {
    attend_grouped<T>(p, group);
  } else {
    attend_per_head<T>(p);
  }
}

template <typename T>
void kvcache_impl(const KVCacheAttnParams& p) {
  if (p.seqlen_new > 0) append<T>(p);
  if (p.seqlen_q > 0) attend<T>(p);
}

}  // namespace

void kvcache_attn_cpu(const KVCacheAttnParams& params) {
  switch (params.dtype) {
    case DType::kFloat32: kvcache_impl<float>(params); break;
    case DType::kFloat16: kvcache_impl<c10::Half>(params); break;
    case DType::kBFloat16: kvcache_impl<c10::BFloat16>(params); break;
  }
}

}  // namespace ism::cpu
