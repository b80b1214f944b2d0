// Compile-time shape of the CUDA forward kernel: tile sizes per head dim, register fragments per
// warp, and the shared-memory layout with its XOR swizzle; and the kernel's traits, the shape plus
// the element type.
//
// Plain C++ (no CUDA types): ops_cuda.cpp includes it to size the grid (launch_grids.h), the kernel
// files to carve shared memory. The element type is a template argument of the traits only, because
// tile sizes depend on the head dim alone (bf16 and fp16 have the same width); host code that needs
// no element type uses the shape.
#pragma once

#include "swizzled_rows.h"

namespace ism::cuda {

// Head dim -> tile shape. One thread block = 4 warps = one query tile of one (sequence, head).
//
// Why 128 query rows for d = 64 but 64 rows for d = 128: every thread keeps, for the whole key loop,
// its Q fragments (rows_per_warp * d / 64 registers of two 16-bit values), its output accumulator
// (rows_per_warp * d / 32 floats) and one tile of scores (rows_per_warp * kBlockN / 32 floats).
//   d =  64, 32 rows per warp (128-row tile): 32 + 64 + 64 = 160 registers of state -> fits in 255.
//   d = 128, 32 rows per warp:                64 + 128 + 64 = 256 -> spills; 16 rows per warp
//            (64-row tile):                   32 + 64 + 32 = 128 -> fits, with room for addresses.
// 32 rows per warp halves the shared-memory traffic per MMA (each K/V fragment loaded by ldmatrix
// feeds two m16 row blocks instead of one), so d = 64 takes it; d = 128 keeps Q in registers (as
// the design asks) and pays one ldmatrix per MMA pair instead. The 64-row tile also gives d = 128
// twice as many blocks, which keeps the GPU busy for short sequences and evens out the ISM/causal
// imbalance between the first and the last query tiles of a sequence.
//
// Key tiles are 64 keys for both: the score tile stays at 32 floats per 16 rows, and the double
// buffered K and V tiles cost 4 * 64 * d * 2 bytes (32 KiB at d = 64, 64 KiB at d = 128).
//
// Every tile (Q, K, V, the output) has rows of d elements: the layout of SwizzledRows<d, 128>, whose
// kNThreads, kChunks, kRowBytes, swizzle() and chunk_pair_xor() the shape inherits.
template <int kHeadDim_>
struct FwdTileShape : SwizzledRows<kHeadDim_, 4 * 32> {
  using Rows = SwizzledRows<kHeadDim_, 4 * 32>;
  using Rows::kChunks;
  using Rows::kNThreads;
  using Rows::kRowBytes;
  static constexpr int kHeadDim = kHeadDim_;
  static constexpr int kNWarps = kNThreads / 32;
  static constexpr int kBlockM = kHeadDim <= 64 ? 128 : 64;  // query rows of a tile (see above)
  static constexpr int kBlockN = 64;                         // keys of a key tile
  static constexpr int kWarpRows = kBlockM / kNWarps;        // 32 or 16
  static constexpr int kMTiles = kWarpRows / 16;             // m16 row blocks per warp: 2 or 1

  // MMA m16n8k16 bookkeeping.
  static constexpr int kQKSteps = kHeadDim / 16;  // k16 steps of S = Q K^T (over d)
  static constexpr int kPVSteps = kBlockN / 16;   // k16 steps of O += P V (over keys)
  static constexpr int kSTiles = kBlockN / 8;     // n8 column tiles of S
  static constexpr int kOTiles = kHeadDim / 8;    // n8 column tiles of O

  // Shared memory, in elements of 2 bytes. A row of a tile is d contiguous elements made of
  // kChunks 16-byte chunks (one cp.async, one ldmatrix row, one vector store each).
  static constexpr int kQElems = kBlockM * kHeadDim;   // Q tile; reused for the output tile
  static constexpr int kKVElems = kBlockN * kHeadDim;  // one K or one V tile
  static constexpr int kSmemQ = 0;
  static constexpr int kSmemK = kSmemQ + kQElems;       // 2 buffers
  static constexpr int kSmemV = kSmemK + 2 * kKVElems;  // 2 buffers
  static constexpr int kSmemTileBytes = (kSmemV + 2 * kKVElems) * 2;
  // Then the clamped kv_limit of each row of the tile and the per-warp min/max of the reduction.
  static constexpr int kSmemLimitBytes = (kBlockM + 2 * kNWarps) * 4;
  // Plus the slack that rounding the base up to kSmemAlign takes (swizzled_rows.h):
  //   d =  64: (128 * 64 + 4 * 64 * 64) * 2 + (128 + 8) * 4 + 256 = 49952 bytes
  //   d = 128: (64 * 128 + 4 * 64 * 128) * 2 + (64 + 8) * 4 + 256 = 82464 bytes
  // Both fit the 99 KiB (101376 bytes) that sm_86, sm_89 and sm_120 allow per block.
  static constexpr int kSmemBytes = kSmemTileBytes + kSmemLimitBytes + kSmemAlign;

  static_assert(kBlockM % (16 * kNWarps) == 0, "each warp owns whole m16 row blocks");
  static_assert(kBlockM <= kNThreads, "one thread per row reads kv_limit");
  static_assert((kBlockM * kChunks) % kNThreads == 0 && (kBlockN * kChunks) % kNThreads == 0,
                "tile loads divide evenly over the threads");
  static_assert(kBlockN % 16 == 0, "P is fed to the PV product in k16 steps");
  static_assert(kChunks * 16 <= kSmemAlign && kRowBytes % 128 == 0,
                "the chunk bits of a row address lie below the tile alignment");
  static_assert((kSmemK * 2) % kSmemAlign == 0 && (kSmemV * 2) % kSmemAlign == 0 && (kKVElems * 2) % kSmemAlign == 0,
                "every tile buffer starts kSmemAlign-aligned");
};

template <int kHeadDim, typename Element_>
struct FwdKernelTraits : FwdTileShape<kHeadDim> {
  using Element = Element_;  // __nv_bfloat16 or __half in the kernel; unused on the host
};

}  // namespace ism::cuda
