// The launch plan of the CUDA kernel of `ism::attn_with_kvcache`: the tiling, how many chunks the keys
// are split into, which keys each chunk owns, and the grid sizes. Plain C++ (no CUDA types, no torch):
// the op file plans with it on the host, the kernel reads key_chunk on the device, and the CPU test
// suite compiles it with the system compiler (tests/test_kvcache_dispatch.py).
#pragma once

#include <cstdint>

#include "../tile_range.h"  // ISM_HOST_DEVICE
#include "kvcache_kernel_traits.h"

namespace ism::cuda {

// FlashDecoding's split of the keys. When the (row tile, K/V head, sequence) work units do not fill the
// GPU's resident block slots (SMs x blocks per SM), each unit's keys are cut into chunks, one thread block
// each, and the chunks' normalised outputs and log-sum-exps are combined afterwards
// (kvcache_combine_kernel.cuh). Decode is bandwidth-bound: what matters is that every SM holds enough
// blocks to keep its loads in flight, so the split fills one wave of slots and never starts a second (a
// second wave of equal blocks would double the time for a few stragglers).
inline constexpr int kMaxKeySplits = 128;    // bounds the workspace and the combine's loop
inline constexpr int kMinTilesPerSplit = 2;  // 128 keys per chunk at least: a chunk's fixed costs stay small

constexpr int64_t ceil_div64(int64_t a, int64_t b) { return (a + b - 1) / b; }

// The number of chunks per work unit: the most that fit the slots in one wave (slots / work_units), at
// most kMaxKeySplits and with at least kMinTilesPerSplit tiles each; then the fewest chunks that keep the
// same tiles per chunk (the same time, fewer partials to combine). key_tiles: tiles of the longest row's
// keys. 1 when the units alone fill the slots.
constexpr int choose_key_splits(int64_t work_units, int64_t key_tiles, int sm_count, int blocks_per_sm) {
  if (work_units <= 0 || key_tiles <= 0 || sm_count <= 0) return 1;
  const int64_t slots = static_cast<int64_t>(sm_count) * (blocks_per_sm > 0 ? blocks_per_sm : 1);
  int64_t most = slots / work_units;
  most = most < key_tiles / kMinTilesPerSplit ? most : key_tiles / kMinTilesPerSplit;
  most = most < kMaxKeySplits ? most : kMaxKeySplits;
  if (most <= 1) return 1;
  const int64_t per_chunk = ceil_div64(key_tiles, most);
  return static_cast<int>(ceil_div64(key_tiles, per_chunk));
}

// The keys [begin, end) of chunk `split` of `splits` over a row tile whose largest kv_limit is `keys`:
// whole tiles of `tile_keys`, the same count per chunk (the last ones shorter or empty), so only the
// chunk holding `keys` has a partial tile. Every key below `keys` belongs to exactly one chunk.
struct KeyChunk {
  int begin, end;
};

ISM_HOST_DEVICE constexpr KeyChunk key_chunk(int keys, int splits, int split, int tile_keys) {
  const int64_t tiles = ceil_div64(keys, tile_keys);
  const int64_t per = ceil_div64(tiles, splits);
  const int64_t begin = split * per * tile_keys < keys ? split * per * tile_keys : keys;
  const int64_t end = begin + per * tile_keys < keys ? begin + per * tile_keys : keys;
  return {static_cast<int>(begin), static_cast<int>(end)};
}

// Which new rows [begin, end) of one (sequence, K/V head) block `unit` of `units` (its row tile x
// num_splits + split) appends to the cache: consecutive equal shares, so every new row is written by
// exactly one block of the grid.
ISM_HOST_DEVICE constexpr KeyChunk append_rows(int n_new, int units, int unit) {
  const int64_t per = ceil_div64(n_new, units);
  const int64_t begin = unit * per < n_new ? unit * per : n_new;
  const int64_t end = begin + per < n_new ? begin + per : n_new;
  return {static_cast<int>(begin), static_cast<int>(end)};
}

// Grid sizes of one call. The attention grid is 1-D, (row tile, split, K/V head, sequence) with the row
// tile fastest: the row tiles of one chunk run side by side and share its K/V in L2.
struct KVCacheGrid {
  KVCacheTiles tiles;
  int64_t row_tiles;       // packed-row tiles per (sequence, K/V head)
  int splits;              // key chunks per row tile
  int64_t attn_blocks;     // row_tiles x splits x h_kv x batch
  int64_t combine_blocks;  // 0 without splits
};

// The tiling of a call and its grids for `splits` key chunks (1 to size the work units before the choice).
template <int kHeadDim>
constexpr KVCacheGrid kvcache_grid(int64_t batch, int64_t h_q, int64_t h_kv, int64_t seqlen_q, int splits) {
  const int64_t group = h_q / h_kv, packed = group * seqlen_q;
  const KVCacheTiles tiles = choose_kvcache_tiles(group, seqlen_q);
  const int64_t block_m = tiles == KVCacheTiles::kGroup ? KVCacheTileShape<kHeadDim, KVCacheTiles::kGroup>::kBlockM
                                                        : KVCacheTileShape<kHeadDim, KVCacheTiles::kRows>::kBlockM;
  const int64_t row_tiles = ceil_div64(packed, block_m);
  const int64_t rows = batch * h_q * seqlen_q;
  return {tiles, row_tiles, splits, row_tiles * splits * h_kv * batch,
          splits > 1 ? ceil_div64(rows, KVCacheCombineShape<kHeadDim>::kRowsPerBlock) : 0};
}

}  // namespace ism::cuda
