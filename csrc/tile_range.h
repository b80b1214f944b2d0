// Which key tiles a query tile must visit under the `kv_limit` rule, and which need a mask.
//
// One header for every kernel, CPU and CUDA, because this is the part of a masked
// attention kernel that is most easily subtly wrong. A query row r sees keys j < kv_limit[r].
// For a tile of query rows with smallest limit `min_limit` and largest `max_limit`:
//   - key tiles starting at or past `max_limit` are invisible to every row: skipped;
//   - key tiles that end at or before `min_limit` are visible to every row: no per-element mask;
//   - the tiles in between are boundary tiles: each row sees a prefix of `visible_keys` keys.
// The forward walks key tiles for a query tile; the backward walks query tiles for a key tile
// (`query_tile_sees_key_tile`). Nothing here assumes kv_limit is monotone inside the tile.
#pragma once

#if defined(__CUDACC__)
#define ISM_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define ISM_HOST_DEVICE inline
#endif

namespace ism {

// Number of key tiles of width `tile_k` that a query tile with largest limit `max_limit` visits.
ISM_HOST_DEVICE int key_tiles_to_visit(int max_limit, int tile_k) {
  return max_limit <= 0 ? 0 : (max_limit + tile_k - 1) / tile_k;
}

// Keys of the tile [k_start, k_start + tile_len) that a row with `limit` may attend: a prefix.
ISM_HOST_DEVICE int visible_keys(int limit, int k_start, int tile_len) {
  const int n = limit - k_start;
  return n < 0 ? 0 : (n > tile_len ? tile_len : n);
}

// True when every row of the query tile sees every key of [k_start, k_start + tile_len), so the
// tile runs with no per-element mask.
ISM_HOST_DEVICE bool key_tile_is_full(int min_limit, int k_start, int tile_len) {
  return k_start + tile_len <= min_limit;
}

// Backward direction: a query tile contributes to the key tile starting at `k_start` iff some
// row of it sees that key, i.e. its largest limit exceeds `k_start`.
ISM_HOST_DEVICE bool query_tile_sees_key_tile(int max_limit, int k_start) {
  return max_limit > k_start;
}

}  // namespace ism
