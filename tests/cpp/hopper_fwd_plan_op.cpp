// Test-only: the Hopper forward kernel's plan (csrc/cuda/hopper_fwd_plan.h) as ops, so that the tests run
// the same decisions the kernel takes, on the CPU of any build. tests/test_hopper_fwd_plan.py compiles this
// file on first use (torch.utils.cpp_extension.load); it is not part of the product:
//   ism::_hopper_fwd_plan(Tensor kv_limit, Tensor cu_seqlens_q, Tensor cu_seqlens_k, int h_q, int h_kv,
//                         int max_seqlen_q, int head_dim) -> Tensor
//       one int64 row per block of the launch, in launch order (blockIdx.x): block, m_tile, head, seq,
//       kv_head, q_row0 (first packed row), rows, min_limit, max_limit, n_tiles, n_masked, past_end
//       (1: the block exits at once; the other fields after seq are then 0), from the CPU tensors
//       of a call, each row's kv_limit clamped into [0, seqlen_k] as the kernel clamps it (total_q is
//       kv_limit's length, total_k the last entry of cu_seqlens_k);
//   ism::_hopper_fwd_loads(int n_tiles) -> Tensor
//       the producer's 2 n loads in issue order: kind (0 K, 1 V), iteration, stage, the parity it
//       waits for on the stage's empty barrier, the parity the consumers wait for on its full one;
//   ism::_hopper_fwd_pingpong(int n_tiles) -> Tensor
//       [2, 1 + windows] per consumer warpgroup: its head-start arrive, then whether it arrives on
//       the other warpgroup's barrier after each of its wgmma windows.
// The head dim selects the tile shape (HopperFwdShape); the stage count is the kernel's.
#include <ATen/ATen.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <climits>
#include <cstdint>
#include <vector>

#include "hopper_fwd_plan.h"

namespace ism {
namespace {

using cuda::hopper::HopperFwdShape;

// The stage count and tile sizes of the kernel; equal for both head dims (static_assert below), so
// the ops that take no head dim use d = 128's.
using Shape128 = HopperFwdShape<128>;
// The shared memory docs/cuda_kernels.md quotes (the kernel's launch asks for exactly this).
static_assert(HopperFwdShape<64>::kSmemBytes == 83624 && Shape128::kSmemBytes == 165544);
static_assert(HopperFwdShape<64>::kStages == Shape128::kStages && HopperFwdShape<64>::kBlockM == Shape128::kBlockM &&
              HopperFwdShape<64>::kBlockN == Shape128::kBlockN);

at::Tensor hopper_fwd_plan_op(const at::Tensor& kv_limit, const at::Tensor& cu_seqlens_q,
                              const at::Tensor& cu_seqlens_k, int64_t h_q, int64_t h_kv, int64_t max_seqlen_q,
                              int64_t head_dim) {
  constexpr const char* op = "ism._hopper_fwd_plan";
  TORCH_CHECK_VALUE(head_dim == 64 || head_dim == 128, op, ": head_dim must be 64 or 128, got ", head_dim);
  TORCH_CHECK_VALUE(h_q > 0 && h_kv > 0 && h_q % h_kv == 0, op, ": h_q must be a positive multiple of h_kv");
  TORCH_CHECK_VALUE(max_seqlen_q >= 0, op, ": max_seqlen_q must be >= 0");
  for (const at::Tensor* t : {&kv_limit, &cu_seqlens_q, &cu_seqlens_k}) {
    TORCH_CHECK_VALUE(t->dim() == 1 && t->scalar_type() == at::kInt && t->device().is_cpu(), op,
                      ": kv_limit and cu_seqlens must be 1-D int32 CPU tensors");
  }
  TORCH_CHECK_VALUE(cu_seqlens_q.numel() >= 1 && cu_seqlens_q.numel() == cu_seqlens_k.numel(), op,
                    ": cu_seqlens_q and cu_seqlens_k must have batch + 1 entries each");
  const int block_m = head_dim == 64 ? HopperFwdShape<64>::kBlockM : Shape128::kBlockM;
  const int block_n = head_dim == 64 ? HopperFwdShape<64>::kBlockN : Shape128::kBlockN;
  const at::Tensor lim = kv_limit.contiguous(), cu_q = cu_seqlens_q.contiguous(), cu_k = cu_seqlens_k.contiguous();
  const int32_t* lim_p = lim.data_ptr<int32_t>();
  const int32_t* cq = cu_q.data_ptr<int32_t>();
  const int32_t* ck = cu_k.data_ptr<int32_t>();
  const int batch = static_cast<int>(cu_q.numel() - 1);
  const int total_q = static_cast<int>(lim.numel());
  const int total_k = ck[batch];
  const int hq = static_cast<int>(h_q), group = static_cast<int>(h_q / h_kv);
  const int64_t blocks = batch == 0 ? 0 : cuda::hopper::grid_blocks(static_cast<int>(max_seqlen_q), block_m, hq, batch);
  const int m_tiles = static_cast<int>((max_seqlen_q + block_m - 1) / block_m);

  constexpr int kFields = 12;
  at::Tensor out = at::zeros({blocks, kFields}, at::kLong);
  int64_t* o = out.data_ptr<int64_t>();
  for (int64_t b = 0; b < blocks; ++b, o += kFields) {
    const cuda::hopper::TileCoord c = cuda::hopper::tile_of_block(static_cast<int>(b), m_tiles, hq, batch);
    o[0] = b, o[1] = c.m_tile, o[2] = c.head, o[3] = c.seq;
    const cuda::hopper::Span qs = cuda::hopper::clamped_span(cq[c.seq], cq[c.seq + 1], total_q);
    const cuda::hopper::Span ks = cuda::hopper::clamped_span(ck[c.seq], ck[c.seq + 1], total_k);
    const int row0 = c.m_tile * block_m;
    if (row0 >= qs.len) {
      o[11] = 1;
      continue;
    }
    const int rows = std::min(block_m, qs.len - row0);
    int lo = INT_MAX, hi = 0;
    for (int r = 0; r < rows; ++r) {
      const int l = cuda::hopper::clamp_to(lim_p[qs.begin + row0 + r], 0, ks.len);
      lo = std::min(lo, l);
      hi = std::max(hi, l);
    }
    const cuda::hopper::KeyTilePlan plan = cuda::hopper::key_tile_plan(lo, hi, block_n);
    o[4] = c.head / group, o[5] = qs.begin + row0, o[6] = rows, o[7] = lo, o[8] = hi;
    o[9] = plan.n_tiles, o[10] = plan.n_masked;
  }
  return out;
}

at::Tensor hopper_fwd_loads_op(int64_t n_tiles) {
  TORCH_CHECK_VALUE(n_tiles >= 0 && n_tiles <= (1 << 20), "ism._hopper_fwd_loads: n_tiles must be in [0, 2^20]");
  const int n = static_cast<int>(n_tiles), stages = Shape128::kStages;
  const int loads = cuda::hopper::producer_loads(n);
  at::Tensor out = at::zeros({loads, 5}, at::kLong);
  int64_t* o = out.data_ptr<int64_t>();
  for (int j = 0; j < loads; ++j, o += 5) {
    const cuda::hopper::LoadStep step = cuda::hopper::producer_load_step(j, n);
    o[0] = step.kind, o[1] = step.iteration, o[2] = cuda::hopper::pipe_stage(step.iteration, stages);
    o[3] = cuda::hopper::pipe_empty_parity(step.iteration, stages);
    o[4] = cuda::hopper::pipe_full_parity(step.iteration, stages);
  }
  return out;
}

at::Tensor hopper_fwd_pingpong_op(int64_t n_tiles) {
  TORCH_CHECK_VALUE(n_tiles >= 0 && n_tiles <= (1 << 20), "ism._hopper_fwd_pingpong: n_tiles must be in [0, 2^20]");
  const int windows = cuda::hopper::gemm_windows(static_cast<int>(n_tiles));
  at::Tensor out = at::zeros({2, 1 + windows}, at::kLong);
  for (int wg = 0; wg < 2; ++wg) {
    int64_t* o = out.data_ptr<int64_t>() + wg * (1 + windows);
    o[0] = cuda::hopper::pingpong_head_start(wg, windows);
    for (int w = 0; w < windows; ++w) o[1 + w] = cuda::hopper::pingpong_arrive_after(wg, w, windows);
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(ism, m) {
  m.def(
      "_hopper_fwd_plan(Tensor kv_limit, Tensor cu_seqlens_q, Tensor cu_seqlens_k, int h_q, int h_kv, "
      "int max_seqlen_q, int head_dim) -> Tensor",
      &hopper_fwd_plan_op);
  m.def("_hopper_fwd_loads(int n_tiles) -> Tensor", &hopper_fwd_loads_op);
  m.def("_hopper_fwd_pingpong(int n_tiles) -> Tensor", &hopper_fwd_pingpong_op);
}

}  // namespace ism
