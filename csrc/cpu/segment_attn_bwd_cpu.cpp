// CPU backward of segment-masked attention (FlashAttention-2's algorithm, split in two passes).
//
//   pre-pass  delta[h][i] = rowsum(dout_i * out_i) - dlse_i
//   pass dq   one work item per (sequence, query head, query tile): walks the key tiles it sees
//             (same range as the forward), recomputes P from the saved lse, accumulates dq.
//   pass dkdv one work item per (sequence, kv head, key tile): walks the query tiles of every query
//             head of its group that see the tile, accumulates dk and dv.
// Recomputing P in both passes costs two extra tile products, but every gradient element is
// owned by one item: no atomics, no per-thread copies of dq, and the result is deterministic.
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

#include "../tile_range.h"
#include "segment_attn_cpu.h"
#include "query_tiles.h"
#include "tile_io.h"
#include "tile_math.h"
#include "work_queue.h"

namespace ism::cpu {
namespace {

struct BwdScratch {
  std::vector<float> q, dout, kt, vt, kf, s, dp, dq, dk, dv, lse2, delta;
  std::vector<int> visible;
  explicit BwdScratch(int d_pad)
      : q(kTileQ * d_pad), dout(kTileQ * d_pad), kt(d_pad * kTileK), vt(d_pad * kTileK),
        kf(kTileK * d_pad), s(kTileQ * kTileK), dp(kTileQ * kTileK), dq(kTileQ * d_pad),
        dk(kTileK * d_pad), dv(kTileK * d_pad), lse2(kTileQ), delta(kTileQ), visible(kTileQ) {}
};

// Loads the query-side operands of rows [q0, q0 + m) of head h: q (scaled into the log2 domain),
// dout, lse (log2 domain) and delta.
template <typename T>
void load_query_side(const SegmentAttnBwdParams& p, const float* delta, int q0, int m, int h, BwdScratch& w) {
  const int d = p.head_dim, d_pad = round_up_lanes(d);
  const T* q = static_cast<const T*>(p.q) + q0 * p.q_row_stride + h * p.q_head_stride;
  const T* dout = static_cast<const T*>(p.dout) + q0 * p.dout_row_stride + h * p.dout_head_stride;
  load_tile(strided_rows(q, p.q_row_stride), 0, m, d, p.softmax_scale * kLog2e, w.q.data(), d_pad);
  load_tile(strided_rows(dout, p.dout_row_stride), 0, m, d, 1.f, w.dout.data(), d_pad);
  for (int r = 0; r < m; ++r) {
    w.lse2[r] = p.lse[h * p.lse_head_stride + q0 + r] * kLog2e;
    w.delta[r] = delta[static_cast<int64_t>(h) * p.total_q + q0 + r];
  }
}

// P and dS of a (query tile, key tile) pair: s <- P, dp <- dS. kt/vt hold the key tile transposed.
void probs_and_score_grad(const SegmentAttnBwdParams& p, int m, BwdScratch& w) {
  const int d = p.head_dim, d_pad = round_up_lanes(d);
  gemm_f32(m, kTileK, d, w.q.data(), d_pad, 1, w.kt.data(), kTileK, w.s.data(), kTileK, false);
  probs_from_lse(w.s.data(), m, kTileK, w.visible.data(), w.lse2.data());
  gemm_f32(m, kTileK, d, w.dout.data(), d_pad, 1, w.vt.data(), kTileK, w.dp.data(), kTileK, false);
  score_grad(w.s.data(), w.dp.data(), m, kTileK, w.delta.data());
}

template <typename T>
void dq_tile(const SegmentAttnBwdParams& p, const float* delta, const QueryTiles& tiles, const WorkItem& item,
             BwdScratch& w) {
  const int d = p.head_dim, d_pad = round_up_lanes(d);
  const int q_begin = p.cu_seqlens_q[item.seq], q0 = q_begin + item.tile * kTileQ;
  const int m = tile_rows(p.cu_seqlens_q[item.seq + 1] - q_begin, item.tile);
  const int h = item.head, h_kv = h / (p.h_q / p.h_kv);
  const int32_t* limit = p.kv_limit + q0;
  const int max_limit = tiles.max_limit_of(item.seq, item.tile);

  load_query_side<T>(p, delta, q0, m, h, w);
  float* dq = w.dq.data();
  std::fill(w.dq.begin(), w.dq.end(), 0.f);
  const int64_t k_begin = p.cu_seqlens_k[item.seq];
  const auto k_rows = strided_rows(static_cast<const T*>(p.k) + k_begin * p.k_row_stride + h_kv * p.k_head_stride,
                                   p.k_row_stride);
  const auto v_rows = strided_rows(static_cast<const T*>(p.v) + k_begin * p.v_row_stride + h_kv * p.v_head_stride,
                                   p.v_row_stride);
  const int n_tiles = key_tiles_to_visit(max_limit, kTileK);
  for (int t = 0; t < n_tiles; ++t) {
    const int k0 = t * kTileK, n = std::min(kTileK, max_limit - k0);
    load_tile_transposed(k_rows, k0, n, d, w.kt.data(), kTileK);
    load_tile_transposed(v_rows, k0, n, d, w.vt.data(), kTileK);
    load_tile(k_rows, k0, n, d, 1.f, w.kf.data(), d_pad);
    for (int r = 0; r < m; ++r) w.visible[r] = visible_keys(limit[r], k0, n);
    probs_and_score_grad(p, m, w);
    gemm_f32(m, d_pad, n, w.dp.data(), kTileK, 1, w.kf.data(), d_pad, dq, d_pad, true);
  }
  store_tile(dq, d_pad, m, d, p.softmax_scale,
             strided_rows(static_cast<T*>(p.dq) + q0 * p.dq_row_stride + h * p.dq_head_stride, p.dq_row_stride), 0);
}

template <typename T>
void dkdv_tile(const SegmentAttnBwdParams& p, const float* delta, const QueryTiles& tiles, const WorkItem& item,
               BwdScratch& w) {
  const int d = p.head_dim, d_pad = round_up_lanes(d);
  const int k_begin = p.cu_seqlens_k[item.seq];
  const int k0 = item.tile * kTileK;
  const int n = std::min(kTileK, p.cu_seqlens_k[item.seq + 1] - k_begin - k0);
  const int h_kv = item.head, group = p.h_q / p.h_kv;

  const int64_t k_row = k_begin + k0;
  load_tile_transposed(strided_rows(static_cast<const T*>(p.k) + k_row * p.k_row_stride + h_kv * p.k_head_stride,
                                    p.k_row_stride), 0, n, d, w.kt.data(), kTileK);
  load_tile_transposed(strided_rows(static_cast<const T*>(p.v) + k_row * p.v_row_stride + h_kv * p.v_head_stride,
                                    p.v_row_stride), 0, n, d, w.vt.data(), kTileK);
  float* dk = w.dk.data();
  float* dv = w.dv.data();
  std::fill(w.dk.begin(), w.dk.end(), 0.f);
  std::fill(w.dv.begin(), w.dv.end(), 0.f);

  const int q_begin = p.cu_seqlens_q[item.seq], q_len = p.cu_seqlens_q[item.seq + 1] - q_begin;
  for (int g = 0; g < group; ++g) {
    const int h = h_kv * group + g;
    for (int qt = 0; qt < tiles.count(item.seq); ++qt) {
      if (!query_tile_sees_key_tile(tiles.max_limit_of(item.seq, qt), k0)) continue;
      const int q0 = q_begin + qt * kTileQ, m = tile_rows(q_len, qt);
      load_query_side<T>(p, delta, q0, m, h, w);
      for (int r = 0; r < m; ++r) w.visible[r] = visible_keys(p.kv_limit[q0 + r], k0, n);
      probs_and_score_grad(p, m, w);
      // dv += P^T dout and dk += dS^T q: A is read transposed through its strides (1, kTileK).
      gemm_f32(n, d_pad, m, w.s.data(), 1, kTileK, w.dout.data(), d_pad, dv, d_pad, true);
      gemm_f32(n, d_pad, m, w.dp.data(), 1, kTileK, w.q.data(), d_pad, dk, d_pad, true);
    }
  }
  // q was scaled by softmax_scale * log2(e); dk = softmax_scale * dS^T q, hence the ln 2.
  store_tile(dk, d_pad, n, d, kLn2,
             strided_rows(static_cast<T*>(p.dk) + k_row * p.dk_row_stride + h_kv * p.dk_head_stride, p.dk_row_stride),
             0);
  store_tile(dv, d_pad, n, d, 1.f,
             strided_rows(static_cast<T*>(p.dv) + k_row * p.dv_row_stride + h_kv * p.dv_head_stride, p.dv_row_stride),
             0);
}

// delta = rowsum(dout * out) - dlse, float32 [h_q, total_q].
template <typename T>
std::vector<float> compute_delta(const SegmentAttnBwdParams& p) {
  std::vector<float> delta(static_cast<size_t>(p.h_q) * p.total_q);
  at::parallel_for(0, static_cast<int64_t>(p.h_q) * p.total_q, 1024, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t h = i / p.total_q, row = i % p.total_q;
      const T* o = static_cast<const T*>(p.out) + row * p.out_row_stride + h * p.out_head_stride;
      const T* g = static_cast<const T*>(p.dout) + row * p.dout_row_stride + h * p.dout_head_stride;
      float acc = 0.f;
      for (int c = 0; c < p.head_dim; ++c) acc += static_cast<float>(o[c]) * static_cast<float>(g[c]);
      delta[i] = acc - (p.dlse != nullptr ? p.dlse[h * p.lse_head_stride + row] : 0.f);
    }
  });
  return delta;
}

template <typename T>
void bwd_impl(const SegmentAttnBwdParams& p) {
  const std::vector<float> delta = compute_delta<T>(p);
  const QueryTiles tiles(p);
  const int d_pad = round_up_lanes(p.head_dim);
  auto make_scratch = [d_pad] { return BwdScratch(d_pad); };

  std::vector<WorkItem> items;
  for (int b = 0; b < p.batch; ++b) {
    const int q_len = p.cu_seqlens_q[b + 1] - p.cu_seqlens_q[b];
    for (int t = 0; t < tiles.count(b); ++t) {
      const int64_t cost = static_cast<int64_t>(tile_rows(q_len, t)) * tiles.max_limit_of(b, t) + 1;
      for (int h = 0; h < p.h_q; ++h) items.push_back({b, h, t, cost});
    }
  }
  run_heavy_first(items, make_scratch,
                  [&](const WorkItem& item, BwdScratch& w) { dq_tile<T>(p, delta.data(), tiles, item, w); });

  items.clear();
  for (int b = 0; b < p.batch; ++b) {
    const int k_len = p.cu_seqlens_k[b + 1] - p.cu_seqlens_k[b];
    for (int t = 0; t * kTileK < k_len; ++t) {
      int64_t cost = 1;  // number of query tiles that see this key tile
      for (int qt = tiles.offset[b]; qt < tiles.offset[b + 1]; ++qt)
        cost += query_tile_sees_key_tile(tiles.max_limit[qt], t * kTileK);
      for (int h = 0; h < p.h_kv; ++h) items.push_back({b, h, t, cost});
    }
  }
  run_heavy_first(items, make_scratch,
                  [&](const WorkItem& item, BwdScratch& w) { dkdv_tile<T>(p, delta.data(), tiles, item, w); });
}

}  // namespace

void segment_attn_bwd_cpu(const SegmentAttnBwdParams& params) {
  switch (params.dtype) {
    case DType::kFloat32: bwd_impl<float>(params); break;
    case DType::kFloat16: bwd_impl<c10::Half>(params); break;
    case DType::kBFloat16: bwd_impl<c10::BFloat16>(params); break;
  }
}

}  // namespace ism::cpu
