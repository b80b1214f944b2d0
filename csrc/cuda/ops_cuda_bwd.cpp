// CUDA implementation of `ism::segment_attn_bwd`: validation, the dK/dV tile choice, workspace, and
// the launches of the backward kernels (segment_attn_bwd_launch.h) on the current stream.
//
// The index-value contract is the forward's (ops_cuda.cpp): cu_seqlens and kv_limit values are not
// checked on the host (that would sync); the kernels clamp them, so bad values give wrong numbers
// but never an out-of-bounds access. max_seqlen_q and max_seqlen_k size the grids (launch_grids.h),
// checked here against the launch limits; when one is not given and there are several sequences it
// is read from cu_seqlens (one device sync each). Autograd passes the forward's hints along.
//
// The dK/dV tiles depend on the device's shared memory and ISM_EXT_BWD_SMALL_TILES
// (bwd_tiles_choice.h). Workspace: delta [h_q, total_q] and the per-query-tile kv_limit bounds
// [batch, tiles, 2] (both O(N)); in the default mode also the float32 dQ accumulator
// [total_q, h_q, d], zeroed, which the dK/dV kernel adds into with atomics and which is converted to
// the input dtype at the end. With `deterministic` (or torch.use_deterministic_algorithms(True)) dQ
// comes from its own kernel instead, bit-identical from run to run, at about 1.4 times the tile
// products.
#include <ATen/ATen.h>
#include <ATen/Context.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <tuple>

#include "../checks.h"
#include "../params_builder.h"
#include "bwd_kernel_traits.h"
#include "bwd_tiles_choice.h"
#include "cuda_op_utils.h"
#include "launch_grids.h"
#include "segment_attn_bwd.h"
#include "static_switch.h"

namespace ism {
namespace {

cuda::BwdGrid bwd_grid_of(const SegmentAttnFwdParams& p, cuda::BwdTiles tiles) {
  cuda::BwdGrid grid{};
  cuda::dispatch_head_dim(p.head_dim, [&](auto head_dim) {
    cuda::dispatch_bwd_tiles(tiles, [&](auto t) {
      constexpr int kHeadDim = decltype(head_dim)::value;
      grid = cuda::bwd_grid<cuda::BwdDkDvShapeOf<kHeadDim, decltype(t)::value>, cuda::BwdDqShape<kHeadDim>>(p);
    });
  });
  return grid;
}

int64_t dq_kernel_smem_bytes(int head_dim) {
  int64_t bytes = 0;
  cuda::dispatch_head_dim(head_dim, [&](auto d) { bytes = cuda::BwdDqShape<decltype(d)::value>::kSmemBytes; });
  return bytes;
}

void check_bwd_grid(const char* op, const cuda::BwdGrid& grid, bool deterministic) {
  TORCH_CHECK_VALUE(grid.prepass_blocks <= cuda::kMaxGridX, op, ": ", grid.prepass_blocks,
                    " pre-pass thread blocks (query tiles x sequences) exceed one launch; split the batch");
  TORCH_CHECK_VALUE(grid.prepass_heads <= cuda::kMaxGridY, op, ": ", grid.prepass_heads,
                    " query heads exceed the pre-pass grid's limit of ", cuda::kMaxGridY);
  TORCH_CHECK_VALUE(grid.dkdv_blocks <= cuda::kMaxGridX, op, ": ", grid.dkdv_blocks,
                    " dK/dV thread blocks (key tiles x K/V heads x sequences) exceed one launch; split the batch");
  if (deterministic) {
    TORCH_CHECK_VALUE(grid.dq_blocks <= cuda::kMaxGridX, op, ": ", grid.dq_blocks,
                      " dQ thread blocks (query tiles x heads x sequences) exceed one launch; split the batch");
  }
}

cudaError_t launch_bwd(const SegmentAttnBwdParams& p, const cuda::BwdGrid& grid, cuda::BwdTiles tiles,
                       bool deterministic, cudaStream_t stream) {
  cudaError_t err = cudaErrorInvalidValue;
  const bool compiled = cuda::dispatch_kernel_config(p.dtype, p.head_dim, [&](auto config) {
    using Config = decltype(config);
    cuda::dispatch_bwd_tiles(tiles, [&](auto t) {
      constexpr cuda::BwdTiles kTiles = decltype(t)::value;
      err = cuda::run_segment_attn_bwd_dkdv<Config::kDtype, Config::kHeadDim, kTiles>(p, grid, deterministic, stream);
    });
    if (err == cudaSuccess && deterministic) {
      err = cuda::run_segment_attn_bwd_dq<Config::kDtype, Config::kHeadDim>(p, grid, stream);
    }
  });
  TORCH_INTERNAL_ASSERT(compiled, "no CUDA backward kernel for this dtype and head_dim");  // checked before
  return err;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> segment_attn_bwd_cuda(
    const at::Tensor& dout, const std::optional<at::Tensor>& dlse, const at::Tensor& q, const at::Tensor& k,
    const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse, const at::Tensor& kv_limit,
    const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k, std::optional<int64_t> max_seqlen_q,
    std::optional<int64_t> max_seqlen_k, double softmax_scale, bool deterministic) {
  constexpr const char* op = "ism.segment_attn_bwd";
  const AttnShape s = check_bwd_args(op, dout, dlse, q, k, v, out, lse, kv_limit, cu_seqlens_q, cu_seqlens_k,
                                     softmax_scale);
  const c10::cuda::CUDAGuard device_guard(q.device());
  check_cuda_kernel_support(op, q, s.head_dim, max_seqlen_q, max_seqlen_k);
  TORCH_CHECK_VALUE(s.batch > 0 || s.total_q == 0, op, ": cu_seqlens_q has no sequence but q has ", s.total_q,
                    " rows (cu_seqlens_q must end at total_q)");
  deterministic = deterministic || at::globalContext().deterministicAlgorithms();

  at::Tensor dq = at::empty({s.total_q, s.h_q, s.head_dim}, q.options());
  at::Tensor dk = at::empty({s.total_k, s.h_kv, s.head_dim}, k.options());
  at::Tensor dv = at::empty({s.total_k, s.h_kv, s.head_dim}, v.options());
  if (s.total_q == 0 || s.total_k == 0) {  // nothing attends anything: every gradient is zero
    dq.zero_();
    dk.zero_();
    dv.zero_();
    return {dq, dk, dv};
  }

  const int head_dim = static_cast<int>(s.head_dim);
  const cuda::BwdTiles tiles = choose_bwd_tiles(op, head_dim, q.get_device());
  if (deterministic) check_kernel_smem(op, "deterministic dQ kernel", dq_kernel_smem_bytes(head_dim), q.get_device());

  const at::Tensor lim = kv_limit.contiguous(), cu_q = cu_seqlens_q.contiguous(), cu_k = cu_seqlens_k.contiguous();
  const int64_t longest_q = longest_sequence(cu_q, s.batch, s.total_q, max_seqlen_q);
  const int64_t longest_k = longest_sequence(cu_k, s.batch, s.total_k, max_seqlen_k);

  // The kernels read 16-byte vectors; autograd's gradients may be expanded or sliced views.
  const at::Tensor qa = vector_aligned_or_copy(q), ka = vector_aligned_or_copy(k), va = vector_aligned_or_copy(v);
  const at::Tensor outa = vector_aligned_or_copy(out), douta = vector_aligned_or_copy(dout);
  const at::Tensor lse_c = lse.contiguous();
  const at::Tensor dlse_c = dlse.has_value() ? dlse->contiguous() : at::Tensor();
  SegmentAttnBwdParams p = make_bwd_params(
      make_fwd_params(s, qa, ka, va, lim, cu_q, cu_k, longest_q, longest_k, softmax_scale, outa, lse_c), douta,
      dlse_c, dq, dk, dv);
  const cuda::BwdGrid grid = bwd_grid_of(p, tiles);
  check_bwd_grid(op, grid, deterministic);

  const auto f32 = q.options().dtype(at::kFloat);
  at::Tensor delta = at::empty({s.h_q, s.total_q}, f32);
  at::Tensor bounds = at::empty({s.batch, std::max<int64_t>(grid.q_tiles, 1), 2}, q.options().dtype(at::kInt));
  at::Tensor dq_accum = deterministic ? at::Tensor() : at::zeros({s.total_q, s.h_q, s.head_dim}, f32);
  p.softmax_delta = delta.data_ptr<float>();
  p.dq_accum = deterministic ? nullptr : dq_accum.data_ptr<float>();
  p.q_tile_bounds = bounds.data_ptr<int>();
  p.q_tiles_stride = static_cast<int>(grid.q_tiles);

  cudaError_t err;
  {
    const NvtxRange range(op);
    err = launch_bwd(p, grid, tiles, deterministic, c10::cuda::getCurrentCUDAStream().stream());
  }
  C10_CUDA_CHECK(err);
  if (!deterministic) dq.copy_(dq_accum);  // float32 -> input dtype
  return {dq, dk, dv};
}

}  // namespace

TORCH_LIBRARY_IMPL(ism, CUDA, m) { m.impl("segment_attn_bwd", &segment_attn_bwd_cuda); }

}  // namespace ism
