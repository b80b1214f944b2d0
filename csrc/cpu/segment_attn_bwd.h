// CPU backward of segment-masked attention: FlashAttention-2's fused backward (five tile products per
// visible (query tile, key tile) pair) on transposed score tiles.
//
//   pre-pass  delta[h][i] = rowsum(dout_i * out_i) - dlse_i           (float32 inputs)
//             delta[h][i] = sum_j P_ij dP_ij - dlse_i                 (float16 / bfloat16 inputs: bwd_delta.h)
//   main      one work item per (sequence, K/V head, chunk of the group's query tiles): for each query tile
//             of the chunk and each key tile it sees, P^T, dP^T and dS^T, then dV += P^T dO, dK += dS^T Q
//             (into the item's float32 dK/dV rows) and dQ += dS K (the query tile's own accumulator).
//   reduce    dK, dV = the chunks' partial sums, added in chunk order.
// Every gradient element has one writer and a fixed order of additions, and the chunking depends only on the
// shapes and kv_limit, never on the thread count: results are bitwise identical for any number of threads.
// bwd_delta.h is the pre-pass, bwd_tile.h a query tile's work in the main pass, bwd_chunks.h the chunks and the
// reduction; this file runs them.
#pragma once

namespace ism::cpu::ISM_ISA_NS {

template <typename T>
void bwd_impl(const SegmentAttnBwdParams& p) {
  const QueryTiles tiles(p);
  const std::vector<float> delta = std::is_same_v<T, float> ? delta_from_output<T>(p) : delta_from_probs<T>(p, tiles);
  const std::vector<BwdChunk> chunks = plan_bwd_chunks(p, tiles);
  const int d = p.head_dim;
  std::vector<std::vector<float>> partial(chunks.size());  // per chunk: float32 [len_k, 2, d]
  std::vector<WorkItem> items;
  for (size_t c = 0; c < chunks.size(); ++c) {
    if (!chunks[c].tiles.empty()) items.push_back({static_cast<int32_t>(c), 0, 0, chunks[c].cost});
  }
  run_heavy_first(
      items, [d] { return BwdScratch(d); },
      [&](const WorkItem& item, BwdScratch& w) {
        const BwdChunk& chunk = chunks[item.seq];
        const int len_k = p.cu_seqlens_k[chunk.seq + 1] - p.cu_seqlens_k[chunk.seq];
        const int q_begin = p.cu_seqlens_q[chunk.seq], len_q = p.cu_seqlens_q[chunk.seq + 1] - q_begin;
        std::vector<float>& dkv = partial[item.seq];
        dkv.assign(static_cast<size_t>(len_k) * 2 * d, 0.f);
        for (const auto& [h, t] : chunk.tiles) {
          bwd_query_tile<T>(p, delta.data(), chunk.seq, h, q_begin + t * kTileQ, tile_rows(len_q, t),
                            tiles.max_limit_of(chunk.seq, t), dkv.data(), w);
        }
      });
  reduce_and_store_dkv<T>(p, chunks, partial);
}

inline void segment_attn_bwd(const SegmentAttnBwdParams& params) {
  with_element_type(params.dtype, [&](auto zero) { bwd_impl<decltype(zero)>(params); });
}

}  // namespace ism::cpu::ISM_ISA_NS
