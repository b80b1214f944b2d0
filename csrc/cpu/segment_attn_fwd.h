// CPU forward of segment-masked attention: blocked online softmax (FlashAttention's algorithm).
//
// A work item is one (sequence, query head, query tile). It walks the key tiles below the tile's
// largest kv_limit (tile_range.h), so keys no row can see are never read, and keeps only
// tile-sized float32 buffers: no Lq x Lk buffer exists at any point.
#pragma once

namespace ism::cpu::ISM_ISA_NS {

template <typename T>
void fwd_tile(const SegmentAttnFwdParams& p, const QueryTiles& tiles, const WorkItem& item, FwdScratch& w) {
  const int q_begin = p.cu_seqlens_q[item.seq], k_begin = p.cu_seqlens_k[item.seq];
  const int q0 = q_begin + item.tile * kTileQ;
  const int m = tile_rows(p.cu_seqlens_q[item.seq + 1] - q_begin, item.tile);
  const int h = item.head, h_kv = h / (p.h_q / p.h_kv);
  const int64_t k_off = static_cast<int64_t>(k_begin) * p.k_row_stride + h_kv * p.k_head_stride;
  const int64_t v_off = static_cast<int64_t>(k_begin) * p.v_row_stride + h_kv * p.v_head_stride;
  const T* q = static_cast<const T*>(p.q) + q0 * p.q_row_stride + h * p.q_head_stride;
  attend_query_tile(strided_rows(q, p.q_row_stride), m, p.kv_limit + q0, tiles.max_limit_of(item.seq, item.tile),
                    strided_rows(static_cast<const T*>(p.k) + k_off, p.k_row_stride),
                    strided_rows(static_cast<const T*>(p.v) + v_off, p.v_row_stride), p.head_dim, p.softmax_scale,
                    strided_rows(static_cast<T*>(p.out) + q0 * p.out_row_stride + h * p.out_head_stride,
                                 p.out_row_stride),
                    p.lse + h * p.lse_head_stride + q0, w);
}

template <typename T>
void fwd_impl(const SegmentAttnFwdParams& p) {
  const QueryTiles tiles(p);
  std::vector<WorkItem> items = tiles.items(p);
  run_by_head_heavy_first(
      items, [&p] { return FwdScratch(p.head_dim); },
      [&p, &tiles](const WorkItem& item, FwdScratch& w) { fwd_tile<T>(p, tiles, item, w); });
}

inline void segment_attn_fwd(const SegmentAttnFwdParams& params) {
  with_element_type(params.dtype, [&](auto zero) { fwd_impl<decltype(zero)>(params); });
}

}  // namespace ism::cpu::ISM_ISA_NS
