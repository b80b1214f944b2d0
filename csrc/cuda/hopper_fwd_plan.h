// The plan of the Hopper (sm_90a) forward kernel, as plain C++ that the host can run: the tile shape
// and its warp roles, the register split and the shared-memory arithmetic, which query tile a block
// owns, which key tiles it visits in which order and which of them are masked, the stage and phase
// of every K/V load, the producer's load order, and the arrivals of the two consumer warpgroups'
// ping-pong. The kernel (hopper_fwd_kernel.cuh) takes every one of these decisions from here, and
// the test-only ops `torch.ops.ism._hopper_fwd_plan` / `_hopper_fwd_loads` / `_hopper_fwd_pingpong`
// (tests/cpp/hopper_fwd_plan_op.cpp, compiled by tests/test_hopper_fwd_plan.py) run the same functions.
//
// No CUDA or CUTLASS header: a plain C++ compiler includes it.
#pragma once

#include <cstdint>

#include "../tile_range.h"  // ISM_HOST_DEVICE, key_tiles_to_visit, key_tile_is_full

namespace ism::cuda::hopper {

// One thread block = one 128-row query tile of one (sequence, query head), three warpgroups:
//   warpgroup 0: the producer. One thread issues every TMA load (Q once, then K and V tiles); the
//     warpgroup gives its registers back (setmaxnreg.dec to kProducerRegs) since it holds no data.
//   warpgroups 1, 2: the consumers, 64 query rows each (one wgmma M block). Each holds its S tile
//     (64 x kBlockN fp32) and O tile (64 x d fp32) in registers: kBlockN / 2 + d / 2 floats per
//     thread (128 at d = 128), plus P (kBlockN / 4 registers of bf16/fp16 pairs), which is why they
//     take kConsumerRegs = 240 (setmaxnreg.inc).
// Key tiles of 128 keys: S = Q K^T is one m64n128k16 wgmma chain per warpgroup (d / 16 steps) and
// O += P V one m64n{d}k16 chain (8 steps), the shapes FA3 runs at d = 128. K and V go through
// kStages shared-memory stages each, every stage with a "full" barrier (TMA transaction bytes) and
// an "empty" one (every consumer thread arrives when its warpgroup's wgmma has read the stage).
template <int kHeadDim_>
struct HopperFwdShape {
  static constexpr int kHeadDim = kHeadDim_;
  static constexpr int kBlockM = 128;
  static constexpr int kBlockN = 128;
  static constexpr int kStages = 2;
  static constexpr int kWarpGroupThreads = 128;
  static constexpr int kConsumerWarpGroups = kBlockM / 64;
  static constexpr int kConsumerThreads = kConsumerWarpGroups * kWarpGroupThreads;
  static constexpr int kNThreads = kWarpGroupThreads + kConsumerThreads;  // 384
  static constexpr int kNWarps = kNThreads / 32;

  // Registers. __launch_bounds__(kNThreads, 1) caps the kernel at kEntryRegs per thread (the register
  // file over the block, in the allocation unit of 8), which setmaxnreg needs at entry; the producer
  // then gives back to kProducerRegs and the consumers grow to kConsumerRegs.
  static constexpr int kRegisterFile = 65536;
  static constexpr int kEntryRegs = (kRegisterFile / kNThreads) / 8 * 8;  // 168
  static constexpr int kProducerRegs = 24;
  static constexpr int kConsumerRegs = 240;

  // Shared memory, bytes from a 1024-aligned base (128-byte swizzled tiles repeat every 1024 bytes,
  // and the wgmma descriptors and TMA boxes assume the swizzle pattern starts at the tile's base).
  static constexpr int kElemBytes = 2;
  static constexpr int kQBytes = kBlockM * kHeadDim * kElemBytes;   // also the output's staging tile
  static constexpr int kKVBytes = kBlockN * kHeadDim * kElemBytes;  // one K or V tile: one TMA transaction
  static constexpr int kSmemQ = 0;
  static constexpr int kSmemK = kSmemQ + kQBytes;
  static constexpr int kSmemV = kSmemK + kStages * kKVBytes;
  static constexpr int kSmemLimits = kSmemV + kStages * kKVBytes;  // int[kBlockM]: clamped kv_limit per row
  static constexpr int kSmemReduce = kSmemLimits + kBlockM * 4;    // int[2 * kNWarps]: the min/max reduction
  static constexpr int kSmemBarriers = (kSmemReduce + 2 * kNWarps * 4 + 7) / 8 * 8;
  static constexpr int kNumBarriers = 1 + 4 * kStages;  // Q full; K full/empty; V full/empty
  static constexpr int kSmemUsed = kSmemBarriers + kNumBarriers * 8;
  static constexpr int kSmemAlign = 1024;
  static constexpr int kSmemBytes = kSmemUsed + kSmemAlign;  // slack for rounding the base up
  //   d =  64: 16384 (Q) + 4 * 16384 (K, V) + 512 + 96 + 72 + 1024 = 83624 bytes
  //   d = 128: 32768 (Q) + 4 * 32768 (K, V) + 512 + 96 + 72 + 1024 = 165544 bytes
  // One block per SM either way (384 threads x 168 registers take the whole register file); 3 stages
  // would fit at d = 128 too (230 KB), but FA3 finds 2 enough at these tile sizes.
  static constexpr int kSmemOptinHopper = 232448;  // cudaDevAttrMaxSharedMemoryPerBlockOptin of sm_90

  // Named barriers (bar.sync ids; 0 is __syncthreads): one per consumer warpgroup for its own
  // 128 threads (the negated Q, the output tile), and the two of the ping-pong.
  static constexpr int kBarWarpGroup0 = 1;
  static constexpr int kBarPingPong0 = 1 + kConsumerWarpGroups;

  static_assert(kHeadDim % 64 == 0, "rows are whole 128-byte swizzle atoms (64 bf16/fp16 elements)");
  static_assert(kBlockM == 64 * kConsumerWarpGroups && kConsumerWarpGroups == 2,
                "two consumer warpgroups of 64 rows: the ping-pong pairs exactly two");
  static_assert(kBlockM <= kNThreads, "one thread per row reads kv_limit");
  static_assert(kBlockN % 16 == 0 && kBlockN <= 256, "one wgmma N extent, k16 steps of O += P V");
  static_assert(kSmemK % kSmemAlign == 0 && kSmemV % kSmemAlign == 0 && kKVBytes % kSmemAlign == 0,
                "every tile starts on a 1024-byte swizzle period");
  static_assert(kSmemBytes <= kSmemOptinHopper, "fits one block per SM on sm_90");
  static_assert(kProducerRegs * kWarpGroupThreads + kConsumerRegs * kConsumerThreads <= kRegisterFile,
                "the register split fits the register file");
  static_assert(kProducerRegs <= kEntryRegs && kEntryRegs <= kConsumerRegs && kProducerRegs % 8 == 0 &&
                    kConsumerRegs % 8 == 0,
                "setmaxnreg: decrease the producer, increase the consumers, multiples of 8");
};

// ---- Which query tile a block owns.
//
// The grid is 1-D, one block per (query tile, query head, sequence), in the forward kernel's order
// (query_tile_prologue.cuh): the last query tiles of every sequence first, since under ISM, MAS and
// causal layouts they see the most keys, so the heaviest blocks start first and light ones fill the
// tail; heads vary fastest, so the query heads of one GQA group run side by side and share their
// K/V in L2.
struct TileCoord {
  int m_tile;  // query tile within its sequence (rows m_tile * kBlockM ...)
  int head;    // query head
  int seq;     // sequence
};

ISM_HOST_DEVICE int64_t grid_blocks(int max_seqlen_q, int block_m, int h_q, int batch) {
  return static_cast<int64_t>((max_seqlen_q + block_m - 1) / block_m) * h_q * batch;
}

ISM_HOST_DEVICE TileCoord tile_of_block(int block, int m_tiles, int h_q, int batch) {
  const int heads_x_batch = h_q * batch;
  const int rest = block % heads_x_batch;
  return {m_tiles - 1 - block / heads_x_batch, rest % h_q, rest / h_q};
}

// The rows [begin, begin + len) of a sequence among `total` packed rows from its two cu_seqlens
// entries, clamped as every kernel clamps them (packed_rows.cuh): never outside the tensor.
struct Span {
  int begin, len;
};

ISM_HOST_DEVICE int clamp_to(int x, int lo, int hi) { return x < lo ? lo : (x > hi ? hi : x); }

ISM_HOST_DEVICE Span clamped_span(int cu_begin, int cu_end, int total) {
  const int begin = clamp_to(cu_begin, 0, total);
  return {begin, clamp_to(cu_end, begin, total) - begin};
}

// ---- Which key tiles, in which order, which masked.
//
// A query tile whose rows' clamped limits range over [min_limit, max_limit] visits the key tiles
// below max_limit (tile_range.h). It walks them from the last to the first: the boundary tiles,
// which some row cannot see entirely and so need the per-element mask, are the highest ones
// (kv_limit rule: tile t is full iff (t + 1) * tile_k <= min_limit), so the masked iterations come
// first and every later one runs with no mask at all, and the running max settles on the keys
// nearest the diagonal of causal layouts early.
struct KeyTilePlan {
  int n_tiles;   // key tiles visited: iterations 0 .. n_tiles - 1
  int n_masked;  // iterations 0 .. n_masked - 1 need the mask; the rest are full tiles
};

// min_limit > max_limit (INT_MAX, 0 from the reduction) stands for a tile with no valid row.
ISM_HOST_DEVICE KeyTilePlan key_tile_plan(int min_limit, int max_limit, int tile_k) {
  const int n = key_tiles_to_visit(max_limit, tile_k);
  int full = min_limit > 0 ? min_limit / tile_k : 0;
  full = full < n ? full : n;
  return {n, n - full};
}

ISM_HOST_DEVICE int key_tile_of_iteration(const KeyTilePlan& plan, int i) { return plan.n_tiles - 1 - i; }

ISM_HOST_DEVICE bool iteration_needs_mask(const KeyTilePlan& plan, int i) { return i < plan.n_masked; }

// ---- The K/V pipelines.
//
// Iteration i of the key loop reads its K tile and its V tile from stage i % kStages of their
// pipelines. A consumer waits for the "full" barrier of the stage with parity (i / kStages) & 1 (the
// barrier completes one phase per fill); the producer, before refilling a stage for iteration i,
// waits for its "empty" barrier with the opposite parity: for i < kStages that is parity 1 on a
// fresh barrier, which counts as the completed phase before phase 0 and returns at once.
ISM_HOST_DEVICE int pipe_stage(int i, int stages) { return i % stages; }
ISM_HOST_DEVICE int pipe_full_parity(int i, int stages) { return (i / stages) & 1; }
ISM_HOST_DEVICE int pipe_empty_parity(int i, int stages) { return ((i / stages) & 1) ^ 1; }

// The producer's loads in the order the consumers use them. A consumer's window i >= 1 issues
// S_i = Q K_i^T, then O += P_{i-1} V_{i-1} (FA3's intra-warpgroup overlap: the softmax of tile i runs
// while the tensor cores do PV of tile i - 1), so the loads go K_0, K_1, V_0, K_2, V_1, ...,
// K_{n-1}, V_{n-2}, V_{n-1}: 2 n loads, load j is
//   j = 0: K of iteration 0;  j = 2 n - 1: V of iteration n - 1;
//   other odd j = 2 i - 1: K of iteration i;  other even j = 2 i: V of iteration i - 1.
enum LoadKind : int { kLoadK = 0, kLoadV = 1 };

struct LoadStep {
  int kind;       // kLoadK or kLoadV
  int iteration;  // the key-loop iteration whose tile it is (its stage: pipe_stage(iteration))
};

ISM_HOST_DEVICE int producer_loads(int n_tiles) { return 2 * n_tiles; }

ISM_HOST_DEVICE LoadStep producer_load_step(int j, int n_tiles) {
  if (j == 0) return {kLoadK, 0};
  if (j == 2 * n_tiles - 1) return {kLoadV, n_tiles - 1};
  return j % 2 == 1 ? LoadStep{kLoadK, (j + 1) / 2} : LoadStep{kLoadV, j / 2 - 1};
}

// ---- The ping-pong of the two consumer warpgroups (FA3's inter-warpgroup overlap).
//
// Each warpgroup issues its wgmma in "windows": window 0 is S_0, window i (1 <= i < n) is S_i and
// P_{i-1} V_{i-1}, window n is P_{n-1} V_{n-1}: n + 1 windows when n >= 1 key tiles, none for n = 0.
// Warpgroup w waits on named barrier kBarPingPong0 + w (bar.sync, 256 threads) before a window and
// arrives on the other's (bar.arrive) after it, so the windows alternate 0, 1, 0, 1, ...: while one
// warpgroup's GEMMs run on the tensor cores, the other does its softmax. Warpgroup 1 arrives once
// ahead (warpgroup 0 goes first) and not after its last window, which warpgroup 0 no longer waits
// for; then every bar.sync meets exactly one bar.arrive and no barrier is left half-arrived when
// the block exits.
ISM_HOST_DEVICE int gemm_windows(int n_tiles) { return n_tiles > 0 ? n_tiles + 1 : 0; }

ISM_HOST_DEVICE bool pingpong_head_start(int warpgroup, int n_windows) { return warpgroup == 1 && n_windows > 0; }

ISM_HOST_DEVICE bool pingpong_arrive_after(int warpgroup, int window, int n_windows) {
  return warpgroup == 0 || window + 1 < n_windows;
}

}  // namespace ism::cuda::hopper
