// CPU forward of segment-masked attention: blocked online softmax (FlashAttention's algorithm).
//
// A work item is one (sequence, query head, query tile). It walks the key tiles below the tile's
// largest kv_limit (tile_range.h), so keys no row can see are never read, and keeps only
// tile-sized float32 buffers: no Lq x Lk buffer exists at any point.
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cmath>
#include <limits>
#include <vector>

#include "../tile_range.h"
#include "segment_attn_cpu.h"
#include "query_tiles.h"
#include "tile_io.h"
#include "tile_math.h"
#include "work_queue.h"

namespace ism::cpu {
namespace {

struct FwdScratch {
  std::vector<float> q, kt, v, s, acc, row_max, row_sum;
  std::vector<int> visible;
  explicit FwdScratch(int d_pad)
      : q(kTileQ * d_pad), kt(d_pad * kTileK), v(kTileK * d_pad), s(kTileQ * kTileK),
        acc(kTileQ * d_pad), row_max(kTileQ), row_sum(kTileQ), visible(kTileQ) {}
};

template <typename T>
void fwd_tile(const SegmentAttnFwdParams& p, const QueryTiles& tiles, const WorkItem& item, FwdScratch& w) {
  const int d = p.head_dim, d_pad = round_up_lanes(d);
  const int q_begin = p.cu_seqlens_q[item.seq], k_begin = p.cu_seqlens_k[item.seq];
  const int q0 = q_begin + item.tile * kTileQ;
  const int m = tile_rows(p.cu_seqlens_q[item.seq + 1] - q_begin, item.tile);
  const int h = item.head, h_kv = h / (p.h_q / p.h_kv);
  const int32_t* limit = p.kv_limit + q0;
  const int max_limit = tiles.max_limit_of(item.seq, item.tile);

  // Scores are formed in the log2 domain: fold softmax_scale * log2(e) into q once.
  const T* q = static_cast<const T*>(p.q) + q0 * p.q_row_stride + h * p.q_head_stride;
  load_tile(q, p.q_row_stride, m, d, p.softmax_scale * kLog2e, w.q.data(), d_pad);
  std::fill(w.acc.begin(), w.acc.end(), 0.f);
  std::fill(w.row_max.begin(), w.row_max.end(), -std::numeric_limits<float>::infinity());
  std::fill(w.row_sum.begin(), w.row_sum.end(), 0.f);

  const T* k = static_cast<const T*>(p.k) + static_cast<int64_t>(k_begin) * p.k_row_stride + h_kv * p.k_head_stride;
  const T* v = static_cast<const T*>(p.v) + static_cast<int64_t>(k_begin) * p.v_row_stride + h_kv * p.v_head_stride;
  const int n_tiles = key_tiles_to_visit(max_limit, kTileK);
  for (int t = 0; t < n_tiles; ++t) {
    const int k0 = t * kTileK;
    const int n = std::min(kTileK, max_limit - k0);  // keys past max_limit are invisible to all rows
    load_tile_transposed(k + k0 * p.k_row_stride, p.k_row_stride, n, d, w.kt.data(), kTileK);
    load_tile(v + k0 * p.v_row_stride, p.v_row_stride, n, d, 1.f, w.v.data(), d_pad);
    for (int r = 0; r < m; ++r) w.visible[r] = visible_keys(limit[r], k0, n);

    gemm_f32(m, kTileK, d, w.q.data(), d_pad, 1, w.kt.data(), kTileK, w.s.data(), kTileK, false);
    softmax_tile_update(w.s.data(), m, kTileK, w.visible.data(), w.row_max.data(), w.row_sum.data(),
                        w.acc.data(), d_pad, d_pad);
    gemm_f32(m, d_pad, n, w.s.data(), kTileK, 1, w.v.data(), d_pad, w.acc.data(), d_pad, true);
  }

  T* out = static_cast<T*>(p.out) + q0 * p.out_row_stride + h * p.out_head_stride;
  float* lse = p.lse + h * p.lse_head_stride + q0;
  for (int r = 0; r < m; ++r) {
    const float l = w.row_sum[r];
    // An empty row (kv_limit = 0) has l = 0: output 0 and lse -inf, never 0/0.
    const float inv = l > 0.f ? 1.f / l : 0.f;
    store_tile(w.acc.data() + r * d_pad, d_pad, 1, d, inv, out + r * p.out_row_stride, p.out_row_stride);
    lse[r] = l > 0.f ? (w.row_max[r] + std::log2(l)) * kLn2 : -std::numeric_limits<float>::infinity();
  }
}

template <typename T>
void fwd_impl(const SegmentAttnFwdParams& p) {
  const QueryTiles tiles(p);
  std::vector<WorkItem> items;
  for (int b = 0; b < p.batch; ++b) {
    const int len = p.cu_seqlens_q[b + 1] - p.cu_seqlens_q[b];
    for (int t = 0; t < tiles.count(b); ++t) {
      const int64_t cost = static_cast<int64_t>(tile_rows(len, t)) * tiles.max_limit_of(b, t) + 1;
      for (int h = 0; h < p.h_q; ++h) items.push_back({b, h, t, cost});
    }
  }
  const int d_pad = round_up_lanes(p.head_dim);
  run_heavy_first(
      items, [d_pad] { return FwdScratch(d_pad); },
      [&p, &tiles](const WorkItem& item, FwdScratch& w) { fwd_tile<T>(p, tiles, item, w); });
}

}  // namespace

void segment_attn_fwd_cpu(const SegmentAttnFwdParams& params) {
  switch (params.dtype) {
    case DType::kFloat32: fwd_impl<float>(params); break;
    case DType::kFloat16: fwd_impl<c10::Half>(params); break;
    case DType::kBFloat16: fwd_impl<c10::BFloat16>(params); break;
  }
}

}  // namespace ism::cpu
