// The Hopper (sm_90a) forward kernel of segment-masked attention: FlashAttention-3's structure on
// the kv_limit rule. One block = one 128-row query tile of one (sequence, query head), three
// warpgroups (hopper_fwd_plan.h has the shape, the register split and the shared memory):
//
//   1. All 384 threads: which tile (heaviest first, hopper_fwd_plan.h tile_of_block), the barriers
//      initialised, each row's kv_limit read and clamped, the tile's smallest and largest limit
//      reduced (query_tile_prologue.cuh, as in the sm_80 kernel) -> the key-tile plan: the tiles
//      below the largest limit, walked from the last to the first, the boundary tiles (masked)
//      first, then the full tiles with no per-element mask at all.
//   2. Warpgroup 0, the producer (setmaxnreg down to 24): one thread issues the TMA loads, Q once,
//      then K and V tiles through kStages-deep pipelines of mbarriers ("full": the TMA's
//      transaction bytes have landed; "empty": all 256 consumer threads are done with the stage), in
//      the order the consumers use them.
//   3. Warpgroups 1 and 2, the consumers (setmaxnreg up to 240), 64 rows each: per key tile
//      S = Q K^T on wgmma (A and B from shared memory), the mask on boundary tiles, the online softmax
//      in registers (exp2 with softmax_scale * log2(e) folded into one FFMA, as in the sm_80 kernel),
//      P converted in registers into the A operand of O += P V (wgmma, A from registers, V as an
//      MN-major B). The GEMMs of tile i + 1 are issued before the softmax of tile i runs
//      (intra-warpgroup overlap) and the two warpgroups take turns on the tensor cores (ping-pong:
//      one's softmax runs under the other's GEMMs).
//   4. Epilogue per consumer warpgroup: O / rowsum staged through its rows of the Q buffer, 16-byte
//      stores of the rows inside the sequence, lse once per row: the same values and the same
//      conventions as the sm_80 kernel (rows with kv_limit 0: output 0, lse -inf).
//
// The caller's contract on index values is the sm_80 kernel's (segment_attn_fwd_kernel.cuh): the
// kernel clamps cu_seqlens and kv_limit, so bad values can give wrong numbers but no bad access. One
// tensor map per tensor covers the whole packed batch: the rows a tile reads past its sequence's end
// belong to the next sequence (or read as zeros past the tensor's end); they are masked (keys: any
// tile that reaches past a sequence's keys is a boundary tile, since kv_limit <= seqlen_k) or never
// stored (query rows past the end: limit 0, not written).
#pragma once

#include <cute/tensor.hpp>
#include <cutlass/arch/barrier.h>
#include <cutlass/arch/reg_reconfig.h>

#include <climits>
#include <cstdint>

#include "../ism_params.h"
#include "../tile_range.h"
#include "hopper_fwd_plan.h"
#include "hopper_fwd_traits.cuh"
#include "mma_utils.cuh"
#include "online_softmax.cuh"
#include "query_tile_prologue.cuh"

namespace ism::cuda::hopper {

// bar.sync / bar.arrive on a named barrier of `threads` threads (a multiple of 32; whole warps).
__device__ __forceinline__ void named_barrier_sync(int id, int threads) {
  asm volatile("bar.sync %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
}
__device__ __forceinline__ void named_barrier_arrive(int id, int threads) {
  asm volatile("bar.arrive %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
}

// Shared-memory accesses by shared address. CuTe's 128-byte swizzle is applied to the absolute
// address of the element (its position-dependent swizzle), which leaves the compiler a generic
// pointer; these keep the accesses LDS/STS instead of generic LD/ST.
__device__ __forceinline__ void st_shared_b32(uint32_t addr, uint32_t x) {
  asm volatile("st.shared.b32 [%0], %1;\n" ::"r"(addr), "r"(x) : "memory");
}
__device__ __forceinline__ uint4 ld_shared_v4(uint32_t addr) {
  uint4 x;
  asm volatile("ld.shared.v4.b32 {%0, %1, %2, %3}, [%4];\n" : "=r"(x.x), "=r"(x.y), "=r"(x.z), "=r"(x.w) : "r"(addr) : "memory");
  return x;
}
__device__ __forceinline__ void st_shared_v4(uint32_t addr, uint4 x) {
  asm volatile("st.shared.v4.b32 [%0], {%1, %2, %3, %4};\n" ::"r"(addr), "r"(x.x), "r"(x.y), "r"(x.z), "r"(x.w) : "memory");
}

// One warpgroup GEMM chain C (+)= A B over the k blocks of A and B, issued and committed as one
// wgmma group, not waited for (the caller's warpgroup_wait<N> does). kZeroInit: the first k block
// overwrites C (S = Q K^T); otherwise C accumulates (O += P V). The fences keep the compiler from
// touching the accumulators, and a register A, while the tensor cores own them.
template <bool kZeroInit, bool kRegisterA, typename TiledMma, typename TA, typename TB, typename TC>
__device__ __forceinline__ void warpgroup_gemm(TiledMma& mma, TA& a, const TB& b, TC& c) {
  if constexpr (kRegisterA) cute::warpgroup_fence_operand(a);
  cute::warpgroup_fence_operand(c);
  cute::warpgroup_arrive();
  if constexpr (kZeroInit) mma.accumulate_ = cute::SM90::GMMA::ScaleOut::Zero;
  CUTE_UNROLL
  for (int kb = 0; kb < cute::size<2>(a); ++kb) {
    cute::gemm(mma, a(cute::_, cute::_, kb), b(cute::_, cute::_, kb), c);
    mma.accumulate_ = cute::SM90::GMMA::ScaleOut::One;
  }
  cute::warpgroup_commit_batch();
  cute::warpgroup_fence_operand(c);
  if constexpr (kRegisterA) cute::warpgroup_fence_operand(a);
}

// The online softmax of one consumer thread on wgmma accumulators (m64 x N atoms). A thread holds
// two rows (h = 0: row r, h = 1: row r + 8) and, for each 8-column block nt of the tile, two
// adjacent columns of each: accumulator element i = 4 nt + 2 h + c (CuTe's CLayout_64xN, the same
// per-warp layout as the m16n8 accumulators of the sm_80 kernel). The four lanes of a quad hold one
// row together, so row reductions are the thread's own columns plus two shuffles.
//
// The arithmetic is online_softmax.cuh's (the sm_80 kernel's), split in two so that the rescale of
// O, which must wait for the previous P V to finish, comes after the exp2 of the new scores:
//   update():  new max, alpha = exp2((old max - new max) * scale_log2), P = exp2(s * c - max * c),
//              running sums; rescale(): O *= alpha.
struct WarpgroupSoftmax {
  float row_max[2];
  float row_sum[2];

  __device__ __forceinline__ WarpgroupSoftmax() {
    row_max[0] = row_max[1] = -INFINITY;
    row_sum[0] = row_sum[1] = 0.f;
  }

  template <typename Frag>
  __device__ __forceinline__ void update(Frag& s, float scale_log2, float (&alpha)[2]) {
    constexpr int kBlocks = decltype(cute::size(s))::value / 4;
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      float tile_max = -INFINITY;
#pragma unroll
      for (int nt = 0; nt < kBlocks; ++nt) tile_max = fmaxf(tile_max, fmaxf(s(4 * nt + 2 * h), s(4 * nt + 2 * h + 1)));
      tile_max = quad_max(tile_max);
      const float old_max = row_max[h];
      const float new_max = fmaxf(old_max, tile_max);
      // A row that has seen nothing visible yet keeps max -inf: subtracting 0 keeps every exp2
      // argument at -inf (-> 0) and never forms -inf - (-inf) (online_softmax.cuh).
      const float offset = new_max == -INFINITY ? 0.f : new_max * scale_log2;
      alpha[h] = fast_exp2(fmaf(old_max, scale_log2, -offset));
      row_max[h] = new_max;
      float sum = 0.f;
#pragma unroll
      for (int nt = 0; nt < kBlocks; ++nt) {
#pragma unroll
        for (int c = 0; c < 2; ++c) {
          const int i = 4 * nt + 2 * h + c;
          s(i) = fast_exp2(fmaf(s(i), scale_log2, -offset));
          sum += s(i);
        }
      }
      // alpha is the same on the 4 lanes of the quad (the max was quad-reduced): the partial sums
      // are rescaled independently and added up once, at the end.
      row_sum[h] = row_sum[h] * alpha[h] + sum;
    }
  }

  template <typename Frag>
  __device__ __forceinline__ static void rescale(Frag& o, const float (&alpha)[2]) {
#pragma unroll
    for (int i = 0; i < decltype(cute::size(o))::value; ++i) o(i) *= alpha[(i / 2) % 2];
  }

  // After the last tile (online_softmax.cuh's row_normaliser): the factor that normalises row h and
  // its natural-log lse; a row that saw nothing gets factor 0 (output 0) and lse -inf, a NaN row NaN.
  __device__ __forceinline__ void finish(int h, float scale_log2, float& inv_sum, float& lse) const {
    row_normaliser(row_max[h], quad_sum(row_sum[h]), scale_log2, inv_sum, lse);
  }
};

// S accumulators -> the 16-bit A operand of O += P V, in registers. Element i of S (4 nt + 2 h + c)
// and element i of the RS A fragment ((2, 2, 2) values x kBlockN / 16 k blocks: column pair, row
// half, column block of 8, then k block) are the same (row, column) of the tile: the conversion is
// elementwise in order (tests/cuda/hopper_gmma_tma_test.cu checks it on a GPU).
template <typename ElementRaw, typename FragS, typename FragP>
__device__ __forceinline__ void scores_to_operand(const FragS& s, FragP& p) {
  static_assert(decltype(cute::size(s))::value == decltype(cute::size(p))::value, "one element each");
  auto p32 = cute::recast<uint32_t>(p);
#pragma unroll
  for (int i = 0; i < decltype(cute::size(p32))::value; ++i) p32(i) = pack_float2<ElementRaw>(s(2 * i), s(2 * i + 1));
}

// The raw CUDA type with the bits of a CuTe element, for the packing helpers of mma_utils.cuh.
template <typename Element>
using RawElement = std::conditional_t<std::is_same_v<Element, cutlass::bfloat16_t>, __nv_bfloat16, __half>;

template <typename Kt>
__global__ void __launch_bounds__(Kt::kNThreads, 1) hopper_fwd_kernel(const __grid_constant__ HopperFwdKernelParams<Kt> kp) {
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using namespace cute;
  using Element = typename Kt::Element;
  using BlockM = typename Kt::BlockM;
  using BlockN = typename Kt::BlockN;
  using HeadDim = typename Kt::HeadDim;
  using Barrier = cutlass::arch::ClusterBarrier;
  using TxBarrier = cutlass::arch::ClusterTransactionBarrier;
  constexpr int kBlockM = Kt::kBlockM, kBlockN = Kt::kBlockN, kHeadDim = Kt::kHeadDim, kStages = Kt::kStages;
  constexpr int kWG = Kt::kWarpGroupThreads, kConsumers = Kt::kConsumerThreads;
  const SegmentAttnFwdParams& p = kp.p;

  // ---- 1. Which tile; the block exits at once past its sequence's end (the grid is sized by the
  // longest sequence).
  const int m_tiles = (p.max_seqlen_q + kBlockM - 1) / kBlockM;
  const TileCoord coord = tile_of_block(static_cast<int>(blockIdx.x), m_tiles, p.h_q, p.batch);
  const Span q_span = clamped_span(p.cu_seqlens_q[coord.seq], p.cu_seqlens_q[coord.seq + 1], p.total_q);
  const int row0 = coord.m_tile * kBlockM;
  if (row0 >= q_span.len) return;
  const QueryTile tile = query_tile_at<kBlockM>(p, QueryTilePos{coord.head, coord.seq, row0, {q_span.begin, q_span.len}});

  extern __shared__ __align__(1024) unsigned char smem_raw[];
  // The 128-byte swizzle repeats every 1024 bytes and TMA and wgmma apply it on the absolute
  // address: the tiles start on a 1024-byte boundary (the launch reserves the slack).
  unsigned char* smem = smem_raw + (Kt::kSmemAlign - smem_u32(smem_raw) % Kt::kSmemAlign) % Kt::kSmemAlign;
  Element* q_smem = reinterpret_cast<Element*>(smem + Kt::kSmemQ);
  Element* k_smem = reinterpret_cast<Element*>(smem + Kt::kSmemK);
  Element* v_smem = reinterpret_cast<Element*>(smem + Kt::kSmemV);
  int* s_limit = reinterpret_cast<int*>(smem + Kt::kSmemLimits);
  int* s_reduce = reinterpret_cast<int*>(smem + Kt::kSmemReduce);
  uint64_t* q_full = reinterpret_cast<uint64_t*>(smem + Kt::kSmemBarriers);
  uint64_t* k_full = q_full + 1;
  uint64_t* k_empty = k_full + kStages;
  uint64_t* v_full = k_empty + kStages;
  uint64_t* v_empty = v_full + kStages;

  if (threadIdx.x == 0) {
    Barrier::init(q_full, 1);
#pragma unroll
    for (int s = 0; s < kStages; ++s) {
      Barrier::init(&k_full[s], 1);  // the producer's arrive_and_expect_tx; then the TMA's bytes
      Barrier::init(&v_full[s], 1);
      Barrier::init(&k_empty[s], kConsumers);  // every consumer thread, after its wgmma read the stage
      Barrier::init(&v_empty[s], kConsumers);
    }
    cutlass::arch::fence_barrier_init();
  }
  // Every thread: the clamped limit of each row to s_limit, the tile's (min, max). Its barrier also
  // publishes the barrier initialisation to the whole block.
  const int2 bounds = load_row_limits<kBlockM, Kt::kNWarps>(p.kv_limit, tile, s_limit, s_reduce);
  const KeyTilePlan plan = key_tile_plan(bounds.x, bounds.y, kBlockN);

  const int warpgroup = static_cast<int>(threadIdx.x) / kWG;
  if (warpgroup == 0) {
    // ---- 2. The producer.
    cutlass::arch::warpgroup_reg_dealloc<Kt::kProducerRegs>();
    if (threadIdx.x != 0 || plan.n_tiles == 0) return;  // no key tile: no load at all (Q included)
    cute::prefetch_tma_descriptor(kp.tma_q.get_tma_descriptor());
    cute::prefetch_tma_descriptor(kp.tma_k.get_tma_descriptor());
    cute::prefetch_tma_descriptor(kp.tma_v.get_tma_descriptor());

    // TMA coordinate tensors: the packed (rows, d, heads) tensors, shifted to the sequence's first
    // row and sliced at the tile's head.
    Tensor mQ = kp.tma_q.get_tma_tensor(make_shape(p.total_q, HeadDim{}, p.h_q));
    Tensor mK = kp.tma_k.get_tma_tensor(make_shape(p.total_k, HeadDim{}, p.h_kv));
    Tensor mV = kp.tma_v.get_tma_tensor(make_shape(p.total_k, HeadDim{}, p.h_kv));
    Tensor gQ = local_tile(domain_offset(make_coord(tile.q_row0, _0{}), mQ(_, _, tile.head)),
                           make_shape(BlockM{}, HeadDim{}), make_coord(_0{}, _0{}));  // (M, d)
    Tensor gK = local_tile(domain_offset(make_coord(tile.k_begin, _0{}), mK(_, _, tile.kv_head)),
                           make_shape(BlockN{}, HeadDim{}), make_coord(_, _0{}));  // (N, d, key tile)
    Tensor gV = local_tile(domain_offset(make_coord(tile.k_begin, _0{}), mV(_, _, tile.kv_head)),
                           make_shape(BlockN{}, HeadDim{}), make_coord(_, _0{}));
    Tensor sQ = make_tensor(make_smem_ptr(q_smem), typename Kt::SmemLayoutQ{});
    Tensor sK = make_tensor(make_smem_ptr(k_smem), typename Kt::SmemLayoutK{});  // (N, d, stage)
    Tensor sV = make_tensor(make_smem_ptr(v_smem), typename Kt::SmemLayoutV{});
    auto tma_q = kp.tma_q.get_slice(_0{});
    auto tma_k = kp.tma_k.get_slice(_0{});
    auto tma_v = kp.tma_v.get_slice(_0{});
    Tensor tQgQ = tma_q.partition_S(gQ);
    Tensor tQsQ = tma_q.partition_D(sQ);
    Tensor tKgK = tma_k.partition_S(gK);  // (TMA, TMA_N, TMA_K, key tile)
    Tensor tKsK = tma_k.partition_D(sK);  // (TMA, TMA_N, TMA_K, stage)
    Tensor tVgV = tma_v.partition_S(gV);
    Tensor tVsV = tma_v.partition_D(sV);

    TxBarrier::arrive_and_expect_tx(q_full, Kt::kQBytes);
    copy(kp.tma_q.with(*q_full), tQgQ, tQsQ);
    for (int j = 0; j < producer_loads(plan.n_tiles); ++j) {
      const LoadStep step = producer_load_step(j, plan.n_tiles);
      const int stage = pipe_stage(step.iteration, kStages);
      const int key_tile = key_tile_of_iteration(plan, step.iteration);
      const uint32_t empty_parity = pipe_empty_parity(step.iteration, kStages);
      if (step.kind == kLoadK) {
        Barrier::wait(&k_empty[stage], empty_parity);
        TxBarrier::arrive_and_expect_tx(&k_full[stage], Kt::kKVBytes);
        copy(kp.tma_k.with(k_full[stage]), tKgK(_, _, _, key_tile), tKsK(_, _, _, stage));
      } else {
        Barrier::wait(&v_empty[stage], empty_parity);
        TxBarrier::arrive_and_expect_tx(&v_full[stage], Kt::kKVBytes);
        copy(kp.tma_v.with(v_full[stage]), tVgV(_, _, _, key_tile), tVsV(_, _, _, stage));
      }
    }
    return;
  }

  // ---- 3. The consumers.
  cutlass::arch::warpgroup_reg_alloc<Kt::kConsumerRegs>();
  const int ctid = static_cast<int>(threadIdx.x) - kWG;  // 0 .. 255 over both consumer warpgroups
  const int wg = ctid / kWG;                              // this consumer warpgroup: rows 64 wg ..
  const int wg_tid = ctid % kWG;

  typename Kt::TiledMmaQK mma_qk;
  typename Kt::TiledMmaPV mma_pv;
  auto thr_qk = mma_qk.get_thread_slice(ctid);
  auto thr_pv = mma_pv.get_thread_slice(ctid);
  Tensor sQ = make_tensor(make_smem_ptr(q_smem), typename Kt::SmemLayoutQ{});
  Tensor sK = make_tensor(make_smem_ptr(k_smem), typename Kt::SmemLayoutK{});
  Tensor sVt = make_tensor(make_smem_ptr(v_smem), typename Kt::SmemLayoutVt{});
  Tensor tSrQ = thr_qk.partition_fragment_A(sQ);   // wgmma descriptors of this warpgroup's Q rows
  Tensor tSrK = thr_qk.partition_fragment_B(sK);   // (MMA, MMA_N, MMA_K, stage)
  Tensor tOrV = thr_pv.partition_fragment_B(sVt);  // (MMA, MMA_N, MMA_K, stage)
  Tensor tSrS = partition_fragment_C(mma_qk, make_shape(BlockM{}, BlockN{}));   // ((2, 2, N / 8), 1, 1)
  Tensor tOrO = partition_fragment_C(mma_pv, make_shape(BlockM{}, HeadDim{}));  // ((2, 2, d / 8), 1, 1)
  Tensor tOrP = make_tensor<Element>(partition_shape_A(mma_pv, make_shape(BlockM{}, BlockN{})));
  static_assert(decltype(size(tSrS))::value == kBlockN / 2 && decltype(size(tOrO))::value == kHeadDim / 2,
                "one m64 atom per warpgroup: a thread holds 2 rows x N / 4 columns");

  // (row, column) in the tile of each accumulator element: the mask's coordinates and this
  // thread's two rows (elements 0 and 2: h = 0 and 1).
  Tensor tScS = thr_qk.partition_C(make_identity_tensor(make_shape(BlockM{}, BlockN{})));
  const int my_row = get<0>(tScS(0));
  const int row_limit[2] = {s_limit[my_row], s_limit[my_row + 8]};

  // softmax_scale * log2(e), folded into the exp2 (needs it positive, like the sm_80 kernel): a
  // negative scale negates Q in shared memory once it has landed (below), a zero one runs as 1e-30.
  bool negate_q = false;
  const float scale_log2 = positive_scale_log2(p.softmax_scale, [&] { negate_q = true; });

  WarpgroupSoftmax softmax;
  clear(tOrO);
  const int n = plan.n_tiles;
  const int n_windows = gemm_windows(n);
  const int bar_mine = Kt::kBarPingPong0 + wg, bar_other = Kt::kBarPingPong0 + (1 - wg);
  if (pingpong_head_start(wg, n_windows)) named_barrier_arrive(Kt::kBarPingPong0, 2 * kWG);

  // Scores of iteration i: the mask on boundary tiles only (a block-uniform branch); keys at or past
  // a row's limit get -inf. Keys past the sequence's end are always past every limit.
  auto mask_scores = [&](int i) {
    if (!iteration_needs_mask(plan, i)) return;
    const int k0 = key_tile_of_iteration(plan, i) * kBlockN;
    const int visible[2] = {row_limit[0] - k0, row_limit[1] - k0};
    CUTE_UNROLL
    for (int e = 0; e < size(tSrS); ++e) {
      if (get<1>(tScS(e)) >= visible[(e / 2) % 2]) tSrS(e) = -INFINITY;
    }
  };

  if (n > 0) {
    Barrier::wait(q_full, 0);
    if (negate_q) {
      // This warpgroup's 64 rows of Q, in 16-byte chunks, then a proxy fence: wgmma reads shared
      // memory through the async proxy, these stores went through the generic one.
      constexpr int kChunks = kHeadDim / 8;
      CUTE_UNROLL
      for (int j = 0; j < 64 * kChunks / kWG; ++j) {
        const int c = wg_tid + j * kWG;
        const uint32_t addr = cast_smem_ptr_to_uint(&sQ(64 * wg + c / kChunks, 8 * (c % kChunks)));
        const uint4 x = ld_shared_v4(addr);
        st_shared_v4(addr,
                     make_uint4(negate_halves(x.x), negate_halves(x.y), negate_halves(x.z), negate_halves(x.w)));
      }
      cutlass::arch::fence_view_async_shared();
      named_barrier_sync(Kt::kBarWarpGroup0 + wg, kWG);
    }

    // Window 0: S_0.
    float alpha[2];
    Barrier::wait(&k_full[pipe_stage(0, kStages)], pipe_full_parity(0, kStages));
    named_barrier_sync(bar_mine, 2 * kWG);
    warpgroup_gemm<true, false>(mma_qk, tSrQ, tSrK(_, _, _, pipe_stage(0, kStages)), tSrS);
    if (pingpong_arrive_after(wg, 0, n_windows)) named_barrier_arrive(bar_other, 2 * kWG);
    warpgroup_wait<0>();
    warpgroup_fence_operand(tSrS);
    Barrier::arrive(&k_empty[pipe_stage(0, kStages)]);
    mask_scores(0);
    softmax.update(tSrS, scale_log2, alpha);  // O is still 0: nothing to rescale
    scores_to_operand<RawElement<Element>>(tSrS, tOrP);

    // Windows 1 .. n - 1: S_i, then P_{i-1} V_{i-1} under the softmax of S_i.
    for (int i = 1; i < n; ++i) {
      const int ks = pipe_stage(i, kStages), vs = pipe_stage(i - 1, kStages);
      Barrier::wait(&k_full[ks], pipe_full_parity(i, kStages));
      named_barrier_sync(bar_mine, 2 * kWG);
      warpgroup_gemm<true, false>(mma_qk, tSrQ, tSrK(_, _, _, ks), tSrS);
      Barrier::wait(&v_full[vs], pipe_full_parity(i - 1, kStages));
      warpgroup_gemm<false, true>(mma_pv, tOrP, tOrV(_, _, _, vs), tOrO);
      if (pingpong_arrive_after(wg, i, n_windows)) named_barrier_arrive(bar_other, 2 * kWG);
      warpgroup_wait<1>();  // S_i is done; P_{i-1} V_{i-1} may still run
      warpgroup_fence_operand(tSrS);
      Barrier::arrive(&k_empty[ks]);
      mask_scores(i);
      softmax.update(tSrS, scale_log2, alpha);
      warpgroup_wait<0>();  // P_{i-1} V_{i-1} is done: O, P and the V stage are free
      // The fences keep O's rescale and P's next values after the wait: the tensor cores read P's
      // registers and accumulate into O's until then.
      warpgroup_fence_operand(tOrO);
      warpgroup_fence_operand(tOrP);
      Barrier::arrive(&v_empty[vs]);
      WarpgroupSoftmax::rescale(tOrO, alpha);
      scores_to_operand<RawElement<Element>>(tSrS, tOrP);
    }

    // Window n: P_{n-1} V_{n-1}.
    const int vs = pipe_stage(n - 1, kStages);
    Barrier::wait(&v_full[vs], pipe_full_parity(n - 1, kStages));
    named_barrier_sync(bar_mine, 2 * kWG);
    warpgroup_gemm<false, true>(mma_pv, tOrP, tOrV(_, _, _, vs), tOrO);
    if (pingpong_arrive_after(wg, n, n_windows)) named_barrier_arrive(bar_other, 2 * kWG);
    warpgroup_wait<0>();
    warpgroup_fence_operand(tOrO);
    warpgroup_fence_operand(tOrP);
    Barrier::arrive(&v_empty[vs]);
  }

  // ---- 4. Epilogue. Every wgmma of this warpgroup has completed (waited above), so its 64 rows of
  // the Q buffer are free: O / rowsum goes there in the tile's swizzled layout, then out with
  // 16-byte stores of whole rows (the rows inside the sequence only).
  float inv_sum[2];
  float* lse_ptr = p.lse + static_cast<int64_t>(tile.head) * p.lse_head_stride + tile.q_row0;
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    float lse;
    softmax.finish(h, scale_log2, inv_sum[h], lse);
    const int row = my_row + 8 * h;
    if (wg_tid % 4 == 0 && row < tile.rows) lse_ptr[row] = lse;
  }
  Tensor tOcO = thr_pv.partition_C(make_identity_tensor(make_shape(BlockM{}, HeadDim{})));
  CUTE_UNROLL
  for (int e = 0; e < size(tOrO); e += 2) {
    const float f = inv_sum[(e / 2) % 2];
    st_shared_b32(cast_smem_ptr_to_uint(&sQ(get<0>(tOcO(e)), get<1>(tOcO(e)))),
                  pack_float2<RawElement<Element>>(tOrO(e) * f, tOrO(e + 1) * f));
  }
  named_barrier_sync(Kt::kBarWarpGroup0 + wg, kWG);
  Element* out = static_cast<Element*>(p.out) + static_cast<int64_t>(tile.q_row0) * p.out_row_stride +
                 static_cast<int64_t>(tile.head) * p.out_head_stride;
  constexpr int kChunks = kHeadDim / 8;
  CUTE_UNROLL
  for (int j = 0; j < 64 * kChunks / kWG; ++j) {
    const int c = wg_tid + j * kWG;
    const int row = 64 * wg + c / kChunks, col = 8 * (c % kChunks);
    if (row < tile.rows) {
      *reinterpret_cast<uint4*>(out + static_cast<int64_t>(row) * p.out_row_stride + col) =
          ld_shared_v4(cast_smem_ptr_to_uint(&sQ(row, col)));
    }
  }
#else
  // wgmma, TMA and setmaxnreg need sm_90a; the host launches this kernel on compute capability 9.0
  // devices only (ops_cuda.cpp).
  __trap();
#endif
}

}  // namespace ism::cuda::hopper
