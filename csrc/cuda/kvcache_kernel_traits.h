// Compile-time shapes of the CUDA kernels of `ism::attn_with_kvcache`: the attention over the cache
// (kvcache_attn_kernel.cuh) in its two tilings, and the combine of split keys
// (kvcache_combine_kernel.cuh). Plain C++ (no CUDA types): the op file sizes grids and workspace with
// them (kvcache_plan.h), the kernels carve shared memory.
//
// A block owns a tile of the *packed query rows* of one (sequence, K/V head): the rows of all the query
// heads of its GQA group, head-major (packed row r = head h0 + r / seqlen_q, position r % seqlen_q), so
// the group's heads read each K/V tile of the cache once, together.
#pragma once

#include "swizzled_rows.h"

namespace ism::cuda {

// kGroup: decode. group * seqlen_q <= 16 packed rows fit one m16 row block; the 4 warps split every
//   64-key tile (16 keys each, one online softmax per warp) and merge their states at the end, so a
//   block streams K/V at the rate of 4 warps while holding a single row block of state.
// kRows: new segments (more packed rows). The prefill forward's tile: the warps split 64 or 128 rows
//   (fwd_kernel_traits.h explains the sizes) and each walks every key of the tile.
enum class KVCacheTiles : int { kGroup = 0, kRows = 1 };

inline constexpr int kGroupTileRows = 16;

// Which tiling a call runs: decided by the packed rows of one (sequence, K/V head).
constexpr KVCacheTiles choose_kvcache_tiles(long long group, long long seqlen_q) {
  return group * seqlen_q <= kGroupTileRows ? KVCacheTiles::kGroup : KVCacheTiles::kRows;
}

template <int kHeadDim_, KVCacheTiles kTiles_>
struct KVCacheTileShape : SwizzledRows<kHeadDim_, 4 * 32> {
  using Rows = SwizzledRows<kHeadDim_, 4 * 32>;
  using Rows::kChunks;
  using Rows::kNThreads;
  using Rows::kRowBytes;
  static constexpr int kHeadDim = kHeadDim_;
  static constexpr KVCacheTiles kTiles = kTiles_;
  static constexpr bool kWarpsSplitKeys = kTiles == KVCacheTiles::kGroup;
  static constexpr int kNWarps = kNThreads / 32;
  static constexpr int kBlockN = 64;  // keys of a key tile (one pipeline stage)
  static constexpr int kBlockM = kWarpsSplitKeys ? kGroupTileRows : (kHeadDim <= 64 ? 128 : 64);
  static constexpr int kWarpRows = kWarpsSplitKeys ? kBlockM : kBlockM / kNWarps;  // rows a warp computes
  static constexpr int kWarpKeys = kWarpsSplitKeys ? kBlockN / kNWarps : kBlockN;  // keys a warp computes
  static constexpr int kMTiles = kWarpRows / 16;

  // K/V stages in flight. Decode is bandwidth-bound: 64 KiB of K/V buffers per block at both head dims
  // (d 128: 2 stages of 32 KiB; d 64: 3 of 16 KiB, 2 tiles in flight while the third is computed), about
  // 70 and 52 KB per block, so an H100/H200 holds 3 and 4 blocks per SM. kRows keeps the forward's 2.
  static constexpr int kStages = kWarpsSplitKeys && kHeadDim <= 64 ? 3 : 2;
  // Unrolled passes of a K/V tile's copy (kvcache_key_source.cuh). kRows at d = 64 holds 2 row blocks of
  // state, as the forward, which uses all 255 registers: its copy runs one pass at a time (it is
  // compute-bound, and the rolled copy costs no spill); every other tile unrolls the copy.
  static constexpr int kKeyLoadUnroll = !kWarpsSplitKeys && kHeadDim <= 64 ? 1 : kBlockN / (kNThreads / kChunks);

  // MMA m16n8k16 bookkeeping of one warp.
  static constexpr int kQKSteps = kHeadDim / 16;  // k16 steps of S = Q K^T (over d)
  static constexpr int kPVSteps = kWarpKeys / 16;  // k16 steps of O += P V (over the warp's keys)
  static constexpr int kSTiles = kWarpKeys / 8;   // n8 tiles of S
  static constexpr int kOTiles = kHeadDim / 8;    // n8 tiles of O

  // Shared memory in elements of 2 bytes: Q, then kStages K tiles, then kStages V tiles.
  static constexpr int kQElems = kBlockM * kHeadDim;
  static constexpr int kKVElems = kBlockN * kHeadDim;
  static constexpr int kSmemQ = 0;
  static constexpr int kSmemK = kSmemQ + kQElems;
  static constexpr int kSmemV = kSmemK + kStages * kKVElems;
  static constexpr int kSmemTileBytes = (kSmemV + kStages * kKVElems) * 2;
  // Then each row's clamped kv_limit and the block reduction's 2 ints per warp.
  static constexpr int kSmemLimitBytes = (kBlockM + 2 * kNWarps) * 4;
  static constexpr int kSmemBytes = kSmemTileBytes + kSmemLimitBytes + kSmemAlign;

  // kGroup's merge of the warps' states, after the key loop, in the K/V buffers: each warp's unnormalised
  // 16 x d output in floats (rows padded by 8 floats: the float2 writes of a half warp hit 32 banks),
  // then its rows' max and sum.
  static constexpr int kMergeRowFloats = kHeadDim + 8;
  static constexpr int kMergeOFloats = kNWarps * kBlockM * kMergeRowFloats;
  static constexpr int kMergeBytes = (kMergeOFloats + 2 * kNWarps * kBlockM) * 4;
  // The merged row is written by 8 threads, each 4 floats at columns 4 t + 32 k: one float4 read of the
  // 8 threads covers 128 contiguous bytes of the row (no bank conflict).
  static constexpr int kMergeThreadsPerRow = kNThreads / kBlockM;
  static constexpr int kMergeQuads = kHeadDim / (4 * kMergeThreadsPerRow);

  static_assert(kBlockM % 16 == 0 && kWarpRows % 16 == 0 && kWarpKeys % 16 == 0, "whole m16 blocks, k16 steps");
  static_assert(kBlockM <= kNThreads, "one thread per row reads kv_limit");
  static_assert((kBlockN * kChunks) % kNThreads == 0, "K/V tile loads divide evenly over the threads");
  static_assert((kSmemK * 2) % kSmemAlign == 0 && (kKVElems * 2) % kSmemAlign == 0 && (kSmemV * 2) % kSmemAlign == 0,
                "every tile buffer starts kSmemAlign-aligned");
  static_assert(!kWarpsSplitKeys || kMergeBytes <= 2 * kStages * kKVElems * 2, "the merge fits in the K/V buffers");
  static_assert(!kWarpsSplitKeys || (kNThreads % kBlockM == 0 && kMergeQuads * 4 * kMergeThreadsPerRow == kHeadDim),
                "the merged rows divide evenly over the threads");
  static_assert(kStages >= 2, "at least double buffered");
};

template <int kHeadDim, KVCacheTiles kTiles, typename Element_>
struct KVCacheKernelTraits : KVCacheTileShape<kHeadDim, kTiles> {
  using Element = Element_;  // __nv_bfloat16 or __half in the kernel; unused on the host
};

// The combine of split keys: kThreadsPerRow threads own one output row, 4 columns each (float4 reads of
// the partial outputs); a block of 128 threads owns kRowsPerBlock rows.
template <int kHeadDim_>
struct KVCacheCombineShape {
  static constexpr int kHeadDim = kHeadDim_;
  static constexpr int kNThreads = 128;
  static constexpr int kThreadsPerRow = kHeadDim / 4;
  static constexpr int kRowsPerBlock = kNThreads / kThreadsPerRow;
  static_assert(kHeadDim % 4 == 0 && kNThreads % kThreadsPerRow == 0, "whole rows per block");
};

}  // namespace ism::cuda
