// CUDA implementation of `ism::segment_attn_bwd`: validation, workspace, and the launches of the
// backward kernels (segment_attn_bwd_launch.h) on the current stream.
//
// The index-value contract is the forward's (ops_cuda.cpp): cu_seqlens and kv_limit values are not
// checked on the host (that would sync); the kernels clamp them, so bad values give wrong numbers
// but never an out-of-bounds access. max_seqlen_q and max_seqlen_k size the grids; when one is not
// given and there are several sequences it is read from cu_seqlens (one device sync each). Autograd
// passes the forward's hints along.
//
// Workspace: delta [h_q, total_q] and the per-query-tile kv_limit bounds [batch, tiles, 2] (both
// O(N)); in the default mode also the float32 dQ accumulator [total_q, h_q, d], zeroed, which the
// dK/dV kernel adds into with atomics and which is converted to the input dtype at the end. With
// `deterministic` (or torch.use_deterministic_algorithms(True)) dQ comes from its own kernel
// instead, bit-identical from run to run, at about 1.4 times the tile products.
#include <ATen/ATen.h>
#include <ATen/Context.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>
#include <torch/library.h>

#include <cstdint>
#include <limits>
#include <optional>
#include <tuple>

#include "../checks.h"
#include "../params_builder.h"
#include "bwd_kernel_traits.h"
#include "cuda_op_utils.h"
#include "segment_attn_bwd.h"

namespace ism {
namespace {

cudaError_t launch_bwd(const SegmentAttnBwdParams& p, bool deterministic, cudaStream_t stream) {
  const bool bf16 = p.dtype == DType::kBFloat16;
  if (p.head_dim == 64) {
    return bf16 ? cuda::run_segment_attn_bwd<DType::kBFloat16, 64>(p, deterministic, stream)
                : cuda::run_segment_attn_bwd<DType::kFloat16, 64>(p, deterministic, stream);
  }
  return bf16 ? cuda::run_segment_attn_bwd<DType::kBFloat16, 128>(p, deterministic, stream)
              : cuda::run_segment_attn_bwd<DType::kFloat16, 128>(p, deterministic, stream);
}

int64_t bwd_query_tile_rows(int64_t head_dim) {
  return head_dim == 64 ? cuda::bwd_query_tile_rows<64>() : cuda::bwd_query_tile_rows<128>();
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

  const at::Tensor lim = kv_limit.contiguous(), cu_q = cu_seqlens_q.contiguous(), cu_k = cu_seqlens_k.contiguous();
  const int64_t longest_q = longest_sequence(cu_q, s.batch, s.total_q, max_seqlen_q);
  const int64_t longest_k = longest_sequence(cu_k, s.batch, s.total_k, max_seqlen_k);
  const int64_t tile_m = bwd_query_tile_rows(s.head_dim);
  const int64_t q_tiles = (longest_q + tile_m - 1) / tile_m;
  TORCH_CHECK_VALUE(q_tiles * s.batch <= std::numeric_limits<int32_t>::max() && s.h_q <= 65535, op,
                    ": too many query tiles x sequences (", q_tiles * s.batch, ") or query heads (", s.h_q,
                    ") for one launch; split the batch");

  // The kernels read 16-byte vectors; autograd's gradients may be expanded or sliced views.
  const at::Tensor qa = vector_aligned_or_copy(q), ka = vector_aligned_or_copy(k), va = vector_aligned_or_copy(v);
  const at::Tensor outa = vector_aligned_or_copy(out), douta = vector_aligned_or_copy(dout);
  const at::Tensor lse_c = lse.contiguous();
  const at::Tensor dlse_c = dlse.has_value() ? dlse->contiguous() : at::Tensor();

  const auto f32 = q.options().dtype(at::kFloat);
  at::Tensor delta = at::empty({s.h_q, s.total_q}, f32);
  at::Tensor bounds = at::empty({s.batch, std::max<int64_t>(q_tiles, 1), 2}, q.options().dtype(at::kInt));
  at::Tensor dq_accum = deterministic ? at::Tensor() : at::zeros({s.total_q, s.h_q, s.head_dim}, f32);

  SegmentAttnBwdParams p = make_bwd_params(
      make_fwd_params(s, qa, ka, va, lim, cu_q, cu_k, longest_q, longest_k, softmax_scale, outa, lse_c), douta,
      dlse_c, dq, dk, dv);
  p.softmax_delta = delta.data_ptr<float>();
  p.dq_accum = deterministic ? nullptr : dq_accum.data_ptr<float>();
  p.q_tile_bounds = bounds.data_ptr<int>();
  p.q_tiles_stride = static_cast<int>(q_tiles);

  cudaError_t err;
  {
    const NvtxRange range(op);
    err = launch_bwd(p, deterministic, c10::cuda::getCurrentCUDAStream().stream());
  }
  C10_CUDA_CHECK(err);
  if (!deterministic) dq.copy_(dq_accum);  // float32 -> input dtype
  return {dq, dk, dv};
}

}  // namespace

TORCH_LIBRARY_IMPL(ism, CUDA, m) { m.impl("segment_attn_bwd", &segment_attn_bwd_cuda); }

}  // namespace ism
