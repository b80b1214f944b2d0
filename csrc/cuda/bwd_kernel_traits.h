// Compile-time shape of the CUDA backward kernels: tile sizes per head dim, warp roles, register
// fragments and the shared-memory layout.
//
// Plain C++ (no CUDA types), like fwd_kernel_traits.h: ops_cuda_bwd.cpp includes it to size the
// workspace, the kernel files to carve shared memory.
#pragma once

#include "swizzled_rows.h"

namespace ism::cuda {

// The dK/dV kernel (segment_attn_bwd_dkdv_kernel.cuh): one thread block owns one key tile of
// kBlockN keys of one (sequence, K/V head) and walks the query tiles (kBlockM rows) of every query
// head of its GQA group that can see it. 8 warps; warp w owns keys [16 w, 16 w + 16) of the tile for
// S^T = K Q^T, dP^T = V dO^T, dV += P^T dO and dK += dS^T Q, so P^T and dS^T never leave the
// registers on their way to dV and dK (the accumulator layout of S^T is the A-operand layout).
//
// Registers per thread for the whole loop: dK and dV accumulators, 2 * 16 * d / 32 floats, plus the
// S^T and dP^T tiles of one step, 2 * 16 * kBlockM / 32 floats:
//   d = 128, kBlockM =  64: 128 + 64 = 192
//   d =  64, kBlockM = 128:  64 + 128 = 192 (a 128-row step halves the barriers per FLOP)
// K and V stay in shared memory and are re-read by ldmatrix (64 more registers would spill).
//
// dQ = dS K needs dS with queries as rows: dS^T goes through shared memory (sdS) and the 8 warps
// re-split as kDqWarpsM x kDqWarpsD over (query rows, d columns), each a 16 x 64 block of dQ that
// is added to a float32 dQ accumulator in global memory (one float2 atomic per 2 elements). The
// deterministic mode leaves dQ to segment_attn_bwd_dq_kernel.cuh instead.
template <int kHeadDim_>
struct BwdDkDvShape {
  static constexpr int kHeadDim = kHeadDim_;
  static constexpr int kNWarps = 8;
  static constexpr int kNThreads = kNWarps * 32;
  static constexpr int kBlockN = 128;                        // keys of the block's key tile
  static constexpr int kBlockM = kHeadDim <= 64 ? 128 : 64;  // query rows of one step
  static constexpr int kWarpKeys = kBlockN / kNWarps;        // 16

  static constexpr int kQKSteps = kHeadDim / 16;  // k16 steps of S^T and dP^T (over d)
  static constexpr int kSTiles = kBlockM / 8;     // n8 tiles of S^T (over queries)
  static constexpr int kQSteps = kBlockM / 16;    // k16 steps of dV and dK (over queries)
  static constexpr int kDTiles = kHeadDim / 8;    // n8 tiles of dK and dV (over d)
  static constexpr int kKeySteps = kBlockN / 16;  // k16 steps of dQ (over keys)
  static constexpr int kDqWarpsM = kBlockM / 16;  // warps along the query rows of dQ
  static constexpr int kDqWarpsD = kNWarps / kDqWarpsM;
  static constexpr int kDqCols = kHeadDim / kDqWarpsD;  // d columns of a warp's dQ block
  static constexpr int kDqTiles = kDqCols / 8;

  using KvRows = SwizzledRows<kHeadDim, kNThreads>;  // K, V, Q, dO tiles and the dK/dV staging
  using DsRows = SwizzledRows<kBlockM, kNThreads>;   // dS^T tile: [key][query]

  // Shared memory in bytes. Q, dO and the per-row lse/delta/limit are double buffered (step t + 1
  // is in flight while step t is computed); K and V are loaded once.
  static constexpr int kKvBytes = kBlockN * kHeadDim * 2;
  static constexpr int kQBytes = kBlockM * kHeadDim * 2;
  static constexpr int kSmemK = 0;
  static constexpr int kSmemV = kSmemK + kKvBytes;
  static constexpr int kSmemQ = kSmemV + kKvBytes;   // 2 buffers
  static constexpr int kSmemDo = kSmemQ + 2 * kQBytes;  // 2 buffers
  static constexpr int kSmemDs = kSmemDo + 2 * kQBytes;
  static constexpr int kSmemLse = kSmemDs + kBlockN * kBlockM * 2;  // float [2][kBlockM]
  static constexpr int kSmemDelta = kSmemLse + 2 * kBlockM * 4;     // float [2][kBlockM]
  static constexpr int kSmemLimit = kSmemDelta + 2 * kBlockM * 4;   // int [2][kBlockM]
  static constexpr int kSmemScan = kSmemLimit + 2 * kBlockM * 4;    // int [kNWarps]
  static constexpr int kSmemAlign = 256;
  static constexpr int kSmemBytes = kSmemScan + kNWarps * 4 + kSmemAlign;

  static_assert(kBlockN == 16 * kNWarps, "one m16 block of keys per warp");
  static_assert(kDqWarpsM * kDqWarpsD == kNWarps && kDqCols % 16 == 0, "dQ blocks cover the tile");
  static_assert(2 * kQBytes >= kKvBytes, "the Q buffers can stage the dK tile (and the dO buffers dV)");
  static_assert(kBlockM <= kNThreads, "one thread per query row copies lse, delta and kv_limit");
  static_assert(kSmemQ % kSmemAlign == 0 && kSmemDo % kSmemAlign == 0 && kSmemDs % kSmemAlign == 0 &&
                    kQBytes % kSmemAlign == 0 && kKvBytes % kSmemAlign == 0,
                "every ldmatrix tile starts kSmemAlign-aligned");
};

// The deterministic dQ kernel (segment_attn_bwd_dq_kernel.cuh): the forward's structure. One thread
// block = one query tile of kBlockM rows of one (sequence, query head), 4 warps of 16 rows; Q and dO
// live in registers as A operands, K and V tiles of kBlockN keys stream through shared memory
// double buffered. Per key tile: S = Q K^T, dP = dO V^T, dS = P (dP - delta), dQ += dS K.
// Registers: Q and dO fragments 2 * d / 4, S and dP 2 * 16, dQ d / 2 (d = 128: 64 + 64 + 64).
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
  static constexpr int kSmemAlign = 256;
  static constexpr int kSmemBytes = kSmemReduce + 2 * kNWarps * 4 + kSmemAlign;
  static_assert(kBlockM == 16 * kNWarps, "one m16 block of rows per warp");
  static_assert(kBlockM <= kNThreads, "one thread per row reads kv_limit");
};

// Rows of the query tiles that the pre-pass (delta, per-tile kv_limit bounds) and the dK/dV kernel
// agree on.
template <int kHeadDim>
constexpr int bwd_query_tile_rows() {
  return BwdDkDvShape<kHeadDim>::kBlockM;
}

}  // namespace ism::cuda
