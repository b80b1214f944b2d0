// CUDA implementation of `ism::segment_attn_fwd`: validation, output allocation and the launch of
// the forward kernel (segment_attn_fwd_kernel.cuh) on the current stream. The backward is
// ops_cuda_bwd.cpp.
//
// What is checked here and what is the caller's contract:
//   - Shapes, dtypes, devices, strides: check_attn_args (checks.h), the same checks and messages as
//     the CPU op, plus what the kernel supports (float16/bfloat16, head_dim 64 or 128, sm_80+).
//   - Index *values* (cu_seqlens start at 0, never decrease, end at total_q/total_k; kv_limit in
//     [0, seqlen_k]; max_seqlen_q >= the longest query sequence) live on the device: checking them
//     would cost a device sync on every call, so on CUDA they are the caller's contract, as in
//     FlashAttention's varlen API (ism_ext.segment_attention builds them correctly). The kernel
//     clamps cu_seqlens into [0, total] and kv_limit into [0, seqlen_k], so bad values give wrong
//     numbers but never an out-of-bounds access. A max_seqlen_q that is too small leaves the rows
//     past it unwritten.
//   - max_seqlen_q sizes the grid (launch_grids.h), which is checked here against the launch limit.
//     When it is not given and there are several sequences, it is read from cu_seqlens_q: one device
//     sync. Pass it to avoid the sync (and inside CUDA graph capture).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <optional>
#include <tuple>

#include "../checks.h"
#include "../params_builder.h"
#include "cuda_op_utils.h"
#include "fwd_kernel_traits.h"
#include "launch_grids.h"
#include "segment_attn_fwd.h"
#include "static_switch.h"

namespace ism {
namespace {

struct FwdLaunch {
  cuda::FwdGrid grid;
  int64_t smem_bytes;
};

FwdLaunch fwd_launch_shape(const SegmentAttnFwdParams& p) {
  FwdLaunch shape{};
  cuda::dispatch_head_dim(p.head_dim, [&](auto head_dim) {
    constexpr int kHeadDim = decltype(head_dim)::value;
    shape = {cuda::fwd_grid<kHeadDim>(p), cuda::FwdTileShape<kHeadDim>::kSmemBytes};
  });
  return shape;
}

cudaError_t launch(const SegmentAttnFwdParams& p, const cuda::FwdGrid& grid, cudaStream_t stream) {
  cudaError_t err = cudaErrorInvalidValue;
  const bool compiled = cuda::dispatch_kernel_config(p.dtype, p.head_dim, [&](auto config) {
    using Config = decltype(config);
    err = cuda::run_segment_attn_fwd<Config::kDtype, Config::kHeadDim>(p, grid, stream);
  });
  TORCH_INTERNAL_ASSERT(compiled, "no CUDA forward kernel for this dtype and head_dim");  // checked before
  return err;
}

std::tuple<at::Tensor, at::Tensor> segment_attn_fwd_cuda(const at::Tensor& q, const at::Tensor& k,
                                                         const at::Tensor& v, const at::Tensor& kv_limit,
                                                         const at::Tensor& cu_seqlens_q,
                                                         const at::Tensor& cu_seqlens_k,
                                                         std::optional<int64_t> max_seqlen_q,
                                                         std::optional<int64_t> max_seqlen_k, double softmax_scale,
                                                         bool /*deterministic: read by the backward*/) {
  constexpr const char* op = "ism.segment_attn_fwd";
  const AttnShape s = check_attn_args(op, q, k, v, kv_limit, cu_seqlens_q, cu_seqlens_k);
  TORCH_CHECK_VALUE(std::isfinite(softmax_scale), op, ": softmax_scale must be finite, got ", softmax_scale);
  const c10::cuda::CUDAGuard device_guard(q.device());
  check_cuda_kernel_support(op, q, s.head_dim, max_seqlen_q, max_seqlen_k);
  // Known on the host without reading cu_seqlens: with no sequence there can be no rows.
  TORCH_CHECK_VALUE(s.batch > 0 || s.total_q == 0, op, ": cu_seqlens_q has no sequence but q has ", s.total_q,
                    " rows (cu_seqlens_q must end at total_q)");

  at::Tensor out = at::empty({s.total_q, s.h_q, s.head_dim}, q.options());
  at::Tensor lse = at::empty({s.h_q, s.total_q}, q.options().dtype(at::kFloat));
  if (s.total_q == 0) return {out, lse};

  const at::Tensor lim = kv_limit.contiguous(), cu_q = cu_seqlens_q.contiguous(), cu_k = cu_seqlens_k.contiguous();
  const int64_t longest_q = longest_sequence(cu_q, s.batch, s.total_q, max_seqlen_q);
  const int64_t longest_k = max_seqlen_k.has_value() ? std::min(*max_seqlen_k, s.total_k) : s.total_k;

  const at::Tensor qa = vector_aligned_or_copy(q), ka = vector_aligned_or_copy(k), va = vector_aligned_or_copy(v);
  const SegmentAttnFwdParams p =
      make_fwd_params(s, qa, ka, va, lim, cu_q, cu_k, longest_q, longest_k, softmax_scale, out, lse);
  const FwdLaunch shape = fwd_launch_shape(p);
  TORCH_CHECK_VALUE(shape.grid.blocks <= cuda::kMaxGridX, op, ": ", shape.grid.blocks,
                    " thread blocks (query tiles x heads x sequences) exceed one launch; split the batch");
  check_kernel_smem(op, "forward kernel", shape.smem_bytes, q.get_device());

  cudaError_t err;
  {
    const NvtxRange range(op);
    err = launch(p, shape.grid, c10::cuda::getCurrentCUDAStream().stream());
  }
  C10_CUDA_CHECK(err);
  return {out, lse};
}

}  // namespace

TORCH_LIBRARY_IMPL(ism, CUDA, m) { m.impl("segment_attn_fwd", &segment_attn_fwd_cuda); }

}  // namespace ism
