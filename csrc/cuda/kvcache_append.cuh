// The in-place append of the KV-cache attention kernel: this call's new K/V rows copied into the cache
// with 16-byte loads and stores. Every block of the launch copies its share (kvcache_plan.h
// append_rows), so the copy is spread over the grid and no extra launch is needed; the attention itself
// reads the new rows from k_new / v_new (kvcache_key_source.cuh), so the two never wait on each other.
#pragma once

#include <cstdint>

#include "kvcache_key_source.cuh"
#include "kvcache_plan.h"

namespace ism::cuda {

template <typename Kt>
__device__ __forceinline__ void append_new_rows(const KVCacheKernelParams& p, const KVCacheBlock& b,
                                                const KeySource& src) {
  using Element = typename Kt::Element;
  if (p.seqlen_new == 0) return;
  const KeyPointers<Element> ptr = key_pointers<Element>(p, src);
  constexpr int kChunks = Kt::kChunks;
  const KeyChunk share = append_rows(p.seqlen_new, p.row_tiles * p.num_splits, b.row_tile * p.num_splits + b.split);
  const int chunks = (share.end - share.begin) * kChunks;  // of K; as many of V follow
  for (int c = threadIdx.x; c < 2 * chunks; c += Kt::kNThreads) {
    const bool is_v = c >= chunks;
    const int i = is_v ? c - chunks : c;
    const int t = share.begin + i / kChunks, col = (i % kChunks) * 8;
    const int pos = src.cached + t;
    const Element* from = is_v ? ptr.v_new + t * p.v_new_row_stride : ptr.k_new + t * p.k_new_row_stride;
    Element* to =
        is_v ? ptr.v_cache + cache_row_offset(p, ptr.table, pos, p.v_cache_batch_stride, p.v_cache_row_stride)
             : ptr.k_cache + cache_row_offset(p, ptr.table, pos, p.k_cache_batch_stride, p.k_cache_row_stride);
    *reinterpret_cast<uint4*>(to + col) = *reinterpret_cast<const uint4*>(from + col);
  }
}

}  // namespace ism::cuda
