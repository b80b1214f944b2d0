// Compile-time shape of the CUDA backward kernels: tile sizes per head dim, warp roles, register
// fragments and the shared-memory layout; and each kernel's traits, its shape plus the element type.
//
// Plain C++ (no CUDA types), like fwd_kernel_traits.h: ops_cuda_bwd.cpp includes it to choose the
// dK/dV tiles, size the grids (launch_grids.h) and the workspace, the kernel files to carve shared
// memory.
#pragma once

#include <type_traits>

#include "swizzled_rows.h"

namespace ism::cuda {

// The dK/dV kernel (segment_attn_bwd_dkdv_kernel.cuh): one thread block owns one key tile of
// kBlockN keys of one (sequence, K/V head) and walks the query tiles (kBlockM rows) of every query
// head of its GQA group that can see it. Warp w owns keys [16 w, 16 w + 16) of the tile for
// S^T = K Q^T, dP^T = V dO^T, dV += P^T dO and dK += dS^T Q, so P^T and dS^T never leave the
// registers on their way to dV and dK (the accumulator layout of S^T is the A-operand layout).
//
// Registers per thread for the whole loop: dK and dV accumulators, 2 * 16 * d / 32 floats, plus the
// S^T and dP^T tiles of one step, 2 * 16 * kBlockM / 32 floats. K and V stay in shared memory and
// are re-read by ldmatrix.
//
// dQ = dS K needs dS with queries as rows: dS^T goes through shared memory (sdS) and the warps
// re-split as kDqWarpsM x kDqWarpsD over (query rows, d columns), each a 16 x kDqCols block of dQ
// that is added to a float32 dQ accumulator in global memory (one float2 atomic per 2 elements). The
// deterministic mode leaves dQ to segment_attn_bwd_dq_kernel.cuh instead.
//
// Q, dO and the per-row lse/delta/limit are double buffered: step t + 1 is copied while step t is
// computed. kDsInQ: the dS^T tile of a step has no region of its own but takes the step's Q buffer,
// once every warp is done reading Q (one more barrier per step); that saves kBlockN * kBlockM * 2
// bytes where shared memory is short.
template <int kHeadDim_, int kNWarps_, int kBlockM_, bool kDsInQ_>
struct BwdDkDvTileShape {
  static constexpr int kHeadDim = kHeadDim_;
  static constexpr int kNWarps = kNWarps_;
  static constexpr int kNThreads = kNWarps * 32;
  static constexpr int kBlockN = 16 * kNWarps;  // keys of the block's key tile: 16 per warp
  static constexpr int kBlockM = kBlockM_;      // query rows of one step
  static constexpr bool kDsInQ = kDsInQ_;
  static constexpr int kWarpKeys = kBlockN / kNWarps;  // 16

  static constexpr int kQKSteps = kHeadDim / 16;  // k16 steps of S^T and dP^T (over d)
  static constexpr int kSTiles = kBlockM / 8;     // n8 tiles of S^T (over queries)
  static constexpr int kQSteps = kBlockM / 16;    // k16 steps of dV and dK (over queries)
  static constexpr int kDTiles = kHeadDim / 8;    // n8 tiles of dK and dV (over d)
  static constexpr int kKeySteps = kBlockN / 16;  // k16 steps of dQ (over keys)
  static constexpr int kDqWarpsM = kBlockM / 16;  // warps along the query rows of dQ
  static constexpr int kDqWarpsD = kNWarps / kDqWarpsM;
  static constexpr int kDqCols = kHeadDim / kDqWarpsD;  // d columns of a warp's dQ block
  static constexpr int kDqTiles = kDqCols / 8;
  // A warp's dQ block is computed and added in passes of at most 64 columns (32 floats per thread).
  static constexpr int kDqPassCols = kDqCols < 64 ? kDqCols : 64;
  static constexpr int kDqPasses = kDqCols / kDqPassCols;

  using KvRows = SwizzledRows<kHeadDim, kNThreads>;  // K, V, Q, dO tiles and the dK/dV staging
  using DsRows = SwizzledRows<kBlockM, kNThreads>;   // dS^T tile: [key][query]

  // Shared memory in bytes. K and V are loaded once; Q, dO and the rows come in 2 buffers.
  static constexpr int kKvBytes = kBlockN * kHeadDim * 2;
  static constexpr int kQBytes = kBlockM * kHeadDim * 2;
  static constexpr int kDsBytes = kBlockN * kBlockM * 2;
  static constexpr int kSmemK = 0;
  static constexpr int kSmemV = kSmemK + kKvBytes;
  static constexpr int kSmemQ = kSmemV + kKvBytes;      // 2 buffers
  static constexpr int kSmemDo = kSmemQ + 2 * kQBytes;  // 2 buffers
  static constexpr int kSmemDs = kSmemDo + 2 * kQBytes;  // unless kDsInQ
  static constexpr int kSmemLse = kSmemDs + (kDsInQ ? 0 : kDsBytes);  // float [2][kBlockM]
  static constexpr int kSmemDelta = kSmemLse + 2 * kBlockM * 4;       // float [2][kBlockM]
  static constexpr int kSmemLimit = kSmemDelta + 2 * kBlockM * 4;     // int [2][kBlockM]
  static constexpr int kSmemScan = kSmemLimit + 2 * kBlockM * 4;      // int [kNWarps]
  static constexpr int kSmemBytes = kSmemScan + kNWarps * 4 + kSmemAlign;

  static_assert(!kDsInQ || kDsBytes <= kQBytes, "a Q buffer can hold the dS^T tile");
  static_assert(kBlockM % 16 == 0 && kNWarps % kDqWarpsM == 0, "dQ warps split the query rows evenly");
  static_assert(kDqWarpsM * kDqWarpsD == kNWarps && kDqCols % 16 == 0, "dQ blocks cover the tile");
  static_assert(2 * kQBytes >= kKvBytes, "the Q buffers can stage the dK tile (and the dO buffers dV)");
  static_assert(kBlockM <= kNThreads, "one thread per query row copies lse, delta and kv_limit");
  static_assert(kSmemQ % kSmemAlign == 0 && kSmemDo % kSmemAlign == 0 && kSmemDs % kSmemAlign == 0 &&
                    kQBytes % kSmemAlign == 0 && kKvBytes % kSmemAlign == 0,
                "every ldmatrix tile starts kSmemAlign-aligned");
};

// The tiles the backward was verified with on an H100: 8 warps, a 128-key tile, and the query step
// that puts 192 registers of state in every thread:
//   d = 128, kBlockM =  64: 128 + 64 = 192
//   d =  64, kBlockM = 128:  64 + 128 = 192 (a 128-row step halves the barriers per FLOP)
// (64 more registers for K or V in registers would spill.) Shared memory:
//   d =  64: K, V 2 * 16 KiB, Q, dO 4 * 16 KiB, dS 32 KiB, rows 3 KiB, + 32 + 256 = 134432 bytes
//   d = 128: K, V 2 * 32 KiB, Q, dO 4 * 16 KiB, dS 16 KiB, rows 1.5 KiB, + 32 + 256 = 149280 bytes
// which sm_80/sm_87 (163 KiB) and sm_90/sm_100 (227 KiB) allow, but not sm_86, sm_89 or sm_120 (99 KiB).
template <int kHeadDim>
struct BwdDkDvShape : BwdDkDvTileShape<kHeadDim, 8, (kHeadDim <= 64 ? 128 : 64), false> {};

// The tiles for GPUs with 99 KiB (101376 bytes) of shared memory per block. Not yet run on a GPU:
// selected only by ISM_EXT_BWD_SMALL_TILES=1 (bwd_tiles_choice.h).
//   d =  64: 8 warps, 128 keys, 64-row steps:
//            K, V 2 * 16 KiB, Q, dO 4 * 8 KiB, dS 16 KiB, rows 1.5 KiB, + 32 + 256 = 83744 bytes.
//            It keeps the big tile's K/V reuse, at 64 + 64 = 128 registers of state. The 4-warp,
//            64-key tile with 128-row steps (the big tiles' 192 registers) needs 101648 bytes, 272
//            too many.
//   d = 128: 4 warps, 64 keys, 64-row steps, dS^T in the Q buffer:
//            K, V 2 * 16 KiB, Q, dO 4 * 16 KiB, rows 1.5 KiB, + 16 + 256 = 100112 bytes.
//            The big d = 128 tiles' 192 registers of state per thread. With its own dS^T tile it
//            would need 108304 bytes, and 8 warps (a 128-key tile) 132896. (Single buffered Q and dO
//            would fit as well, but then every shared-memory address of a step is loop-invariant:
//            ptxas keeps them all in registers, and the atomic-dQ kernel spilled up to 132 bytes.)
//            The 4 warps re-split as 4 x 1 for dQ: a
//            warp's atomic dQ block is 16 x 128, added in two passes of 64 columns so that it holds
//            32 floats at a time, as the big tiles do.
template <int kHeadDim>
struct BwdDkDvSmallShape : BwdDkDvTileShape<kHeadDim, (kHeadDim <= 64 ? 8 : 4), 64, (kHeadDim > 64)> {};

// Which dK/dV tiles a backward call runs (chosen on the host, bwd_tiles_choice.h).
enum class BwdTiles : int { kBig = 0, kSmall = 1 };

// Calls f(std::integral_constant<BwdTiles, tiles>{}): the run-time choice as a template argument.
template <typename F>
void dispatch_bwd_tiles(BwdTiles tiles, F&& f) {
  if (tiles == BwdTiles::kSmall) {
    f(std::integral_constant<BwdTiles, BwdTiles::kSmall>{});
  } else {
    f(std::integral_constant<BwdTiles, BwdTiles::kBig>{});
  }
}

template <int kHeadDim, BwdTiles kTiles>
using BwdDkDvShapeOf = std::conditional_t<kTiles == BwdTiles::kSmall, BwdDkDvSmallShape<kHeadDim>,
                                          BwdDkDvShape<kHeadDim>>;

template <int kHeadDim, typename Element_>
struct BwdDkDvTraits : BwdDkDvShape<kHeadDim> {
  using Element = Element_;  // __nv_bfloat16 or __half in the kernel; unused on the host
};

template <int kHeadDim, typename Element_>
struct BwdDkDvSmallTraits : BwdDkDvSmallShape<kHeadDim> {
  using Element = Element_;
};

template <int kHeadDim, typename Element, BwdTiles kTiles>
using BwdDkDvTraitsOf = std::conditional_t<kTiles == BwdTiles::kSmall, BwdDkDvSmallTraits<kHeadDim, Element>,
                                           BwdDkDvTraits<kHeadDim, Element>>;

// The deterministic dQ kernel (segment_attn_bwd_dq_kernel.cuh): the forward's structure. One thread
// block = one query tile of kBlockM rows of one (sequence, query head), 4 warps of 16 rows; Q and dO
// live in registers as A operands, K and V tiles of kBlockN keys stream through shared memory
// double buffered. Per key tile: S = Q K^T, dP = dO V^T, dS = P (dP - delta), dQ += dS K.
// Registers: Q and dO fragments 2 * d / 4, S and dP 2 * 16, dQ d / 2 (d = 128: 64 + 64 + 64).
// Shared memory: Q, dO 2 * 64 * d * 2, K, V 4 * 64 * d * 2, limits 256, reduction 32, + 256:
//   d = 64: 49696 bytes;  d = 128: 98848 bytes, inside the 99 KiB of sm_86, sm_89 and sm_120.
template <int kHeadDim_>
struct BwdDqShape {
  static constexpr int kHeadDim = kHeadDim_;
  static constexpr int kNWarps = 4;
  static constexpr int kNThreads = kNWarps * 32;
  static constexpr int kBlockM = 64;
  static constexpr int kBlockN = 64;
  static constexpr int kQKSteps = kHeadDim / 16;  // k16 steps of S and dP (over d)
  static constexpr int kSTiles = kBlockN / 8;     // n8 tiles of S (over keys)
  static constexpr int kKeySteps = kBlockN / 16;  // k16 steps of dQ (over keys)
  static constexpr int kDTiles = kHeadDim / 8;    // n8 tiles of dQ (over d)

  using Rows = SwizzledRows<kHeadDim, kNThreads>;
  static constexpr int kQBytes = kBlockM * kHeadDim * 2;
  static constexpr int kKvBytes = kBlockN * kHeadDim * 2;
  static constexpr int kSmemQ = 0;
  static constexpr int kSmemDo = kSmemQ + kQBytes;
  static constexpr int kSmemK = kSmemDo + kQBytes;   // 2 buffers
  static constexpr int kSmemV = kSmemK + 2 * kKvBytes;  // 2 buffers
  static constexpr int kSmemLimit = kSmemV + 2 * kKvBytes;  // int [kBlockM]
  static constexpr int kSmemReduce = kSmemLimit + kBlockM * 4;  // int [2 * kNWarps]
  static constexpr int kSmemBytes = kSmemReduce + 2 * kNWarps * 4 + kSmemAlign;
  static_assert(kBlockM == 16 * kNWarps, "one m16 block of rows per warp");
  static_assert(kBlockM <= kNThreads, "one thread per row reads kv_limit");
};

template <int kHeadDim, typename Element_>
struct BwdDqTraits : BwdDqShape<kHeadDim> {
  using Element = Element_;
};

}  // namespace ism::cuda
