// The key side of the KV-cache attention kernel: where key position j of one (sequence, K/V head)
// lives, and the cp.async copy of a K/V tile from there into shared memory.
//
// Positions below `cached` are in the cache: a contiguous cache row (cache_batch_idx[s], or s) or a page
// of the block table. Positions from `cached` on are this call's new rows, read from k_new / v_new
// directly: the same launch appends them to the cache (kvcache_append.cuh), and no block ever reads a
// cache row that another block of the launch writes (the op's checks rule out shared written rows and
// pages).
#pragma once

#include <cstdint>

#include "kvcache_params.h"
#include "kvcache_rows.cuh"
#include "mma_utils.cuh"
#include "tile_io.cuh"

namespace ism::cuda {

// The block's (sequence, K/V head) as the key loop carries it: four ints. The pointers are formed from
// the kernel parameters at each use (key_pointers), which costs a few integer multiply-adds per tile but
// no registers across the loop (the kRows tile at d = 64 has none to spare).
struct KeySource {
  int seq, kv_head;
  int cache_row;  // contiguous caches: the sequence's row (cache_batch_idx[seq], or seq)
  int cached;     // positions below come from the cache, the rest from k_new / v_new
};

__device__ __forceinline__ KeySource key_source(const KVCacheKernelParams& p, const KVCacheBlock& b) {
  const int row = p.page_size == 0 && p.cache_batch_idx != nullptr ? p.cache_batch_idx[b.seq] : b.seq;
  return {b.seq, b.kv_head, row, b.cached};
}

template <typename Element>
struct KeyPointers {
  Element* k_cache;  // head kv_head; contiguous caches: of the sequence's row too
  Element* v_cache;
  const Element* k_new;  // row 0 of the sequence's new keys in head kv_head (unused without new rows)
  const Element* v_new;
  const int32_t* table;  // paged caches: the sequence's block-table row
};

template <typename Element>
__device__ __forceinline__ KeyPointers<Element> key_pointers(const KVCacheKernelParams& p, const KeySource& s) {
  KeyPointers<Element> ptr;
  int64_t k_base = s.kv_head * p.k_cache_head_stride, v_base = s.kv_head * p.v_cache_head_stride;
  if (p.page_size == 0) {
    k_base += s.cache_row * p.k_cache_batch_stride;
    v_base += s.cache_row * p.v_cache_batch_stride;
  }
  ptr.k_cache = static_cast<Element*>(p.k_cache) + k_base;
  ptr.v_cache = static_cast<Element*>(p.v_cache) + v_base;
  ptr.k_new = static_cast<const Element*>(p.k_new) + s.seq * p.k_new_batch_stride + s.kv_head * p.k_new_head_stride;
  ptr.v_new = static_cast<const Element*>(p.v_new) + s.seq * p.v_new_batch_stride + s.kv_head * p.v_new_head_stride;
  ptr.table = p.block_table + s.seq * p.block_table_batch_stride;
  return ptr;
}

// Element offset of cache position j (j < cached) from KeyPointers::k_cache / v_cache, for a cache with
// the given page (or row) and row strides.
__device__ __forceinline__ int64_t cache_row_offset(const KVCacheKernelParams& p, const int32_t* table, int j,
                                                    int64_t page_stride, int64_t row_stride) {
  if (p.page_size > 0) {
    const int page = j / p.page_size;
    return static_cast<int64_t>(table[page]) * page_stride + static_cast<int64_t>(j - page * p.page_size) * row_stride;
  }
  return static_cast<int64_t>(j) * row_stride;
}

// Issues the cp.async copies of the K and V tiles of keys [k0, k0 + kBlockN) into sK / sV (one stage);
// keys at or past k_end are zero-filled and read nothing. A thread's rows of the tile are j0, j0 + R,
// j0 + 2R, ... (R = rows per pass <= 16 <= page size), so a paged cache costs one division per tile and
// then a step of at most one page per pass. kUnroll: passes unrolled (all of them, or 1 where the
// kernel has no registers to spare for the unrolled address arithmetic). The caller commits the group.
template <typename Rows, int kBlockN, int kUnroll, typename Element>
__device__ __forceinline__ void load_key_tile(Element* sK, Element* sV, const TileCopyLane<Rows>& lane,
                                              const KeySource& src, const KVCacheKernelParams& p, int k0, int k_end) {
  constexpr int kRowsPerPass = TileCopyLane<Rows>::kRowsPerPass;
  static_assert(kBlockN % kRowsPerPass == 0 && kRowsPerPass <= 16, "whole passes, at most one page per pass");
  const uint32_t k_dst = smem_u32(sK + Rows::swizzle(lane.row, lane.chunk));
  const uint32_t v_dst = smem_u32(sV + Rows::swizzle(lane.row, lane.chunk));
  const KeyPointers<Element> ptr = key_pointers<Element>(p, src);
  const bool paged = p.page_size > 0;
  const int j0 = k0 + lane.row;
  int page = 0, slot = 0;
  if (paged) {
    page = j0 / p.page_size;
    slot = j0 - page * p.page_size;
  }
#pragma unroll(kUnroll)
  for (int pass = 0; pass < kBlockN / kRowsPerPass; ++pass) {
    const int j = j0 + pass * kRowsPerPass;
    const bool valid = j < k_end;
    const Element* ks = static_cast<const Element*>(p.k_cache);  // zero-filled rows still need a valid address
    const Element* vs = static_cast<const Element*>(p.v_cache);
    if (valid && j < src.cached) {
      int64_t k_off = static_cast<int64_t>(j) * p.k_cache_row_stride;
      int64_t v_off = static_cast<int64_t>(j) * p.v_cache_row_stride;
      if (paged) {
        const int64_t pg = __ldg(ptr.table + page);
        k_off = pg * p.k_cache_batch_stride + slot * p.k_cache_row_stride;
        v_off = pg * p.v_cache_batch_stride + slot * p.v_cache_row_stride;
      }
      ks = ptr.k_cache + k_off + lane.chunk * 8;
      vs = ptr.v_cache + v_off + lane.chunk * 8;
    } else if (valid) {
      const int t = j - src.cached;
      ks = ptr.k_new + t * p.k_new_row_stride + lane.chunk * 8;
      vs = ptr.v_new + t * p.v_new_row_stride + lane.chunk * 8;
    }
    cp_async_16(k_dst + pass * kRowsPerPass * Rows::kRowBytes, ks, valid);
    cp_async_16(v_dst + pass * kRowsPerPass * Rows::kRowBytes, vs, valid);
    if (paged) {
      slot += kRowsPerPass;
      if (slot >= p.page_size) {
        slot -= p.page_size;
        ++page;
      }
    }
  }
}

}  // namespace ism::cuda
