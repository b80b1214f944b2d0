// Fills the plain params structs of ism_params.h from validated tensors; shared by the CPU and
// CUDA implementations so that both read the tensors the same way.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>

#include "checks.h"
#include "ism_params.h"

namespace ism {

// The DType of a floating-point scalar type the params structs can carry, or none: the one mapping
// from torch's dtypes to the kernels' (the CUDA ops' support check reads it too, cuda_op_utils.cpp).
inline std::optional<DType> float_dtype(at::ScalarType t) {
  switch (t) {
    case at::kHalf:
      return DType::kFloat16;
    case at::kBFloat16:
      return DType::kBFloat16;
    case at::kFloat:
      return DType::kFloat32;
    default:
      return std::nullopt;
  }
}

// The DType of inputs the argument checks accepted (float16, bfloat16 or float32).
inline DType to_dtype(at::ScalarType t) {
  const std::optional<DType> dtype = float_dtype(t);
  TORCH_INTERNAL_ASSERT(dtype.has_value(), "no kernel dtype for ", t, " (the argument checks refuse it)");
  return *dtype;
}

inline SegmentAttnFwdParams make_fwd_params(const AttnShape& s, const at::Tensor& q, const at::Tensor& k,
                                            const at::Tensor& v, const at::Tensor& kv_limit,
                                            const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k,
                                            int64_t max_seqlen_q, int64_t max_seqlen_k, double softmax_scale,
                                            const at::Tensor& out, const at::Tensor& lse) {
  SegmentAttnFwdParams p{};
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  p.cu_seqlens_q = cu_seqlens_q.data_ptr<int32_t>();
  p.cu_seqlens_k = cu_seqlens_k.data_ptr<int32_t>();
  p.kv_limit = kv_limit.data_ptr<int32_t>();
  p.out = out.data_ptr();
  p.lse = lse.data_ptr<float>();
  p.q_row_stride = q.stride(0);
  p.q_head_stride = q.stride(1);
  p.k_row_stride = k.stride(0);
  p.k_head_stride = k.stride(1);
  p.v_row_stride = v.stride(0);
  p.v_head_stride = v.stride(1);
  p.out_row_stride = out.stride(0);
  p.out_head_stride = out.stride(1);
  p.lse_head_stride = lse.stride(0);
  p.batch = static_cast<int>(s.batch);
  p.h_q = static_cast<int>(s.h_q);
  p.h_kv = static_cast<int>(s.h_kv);
  p.head_dim = static_cast<int>(s.head_dim);
  p.total_q = static_cast<int>(s.total_q);
  p.total_k = static_cast<int>(s.total_k);
  p.max_seqlen_q = static_cast<int>(max_seqlen_q);
  p.max_seqlen_k = static_cast<int>(max_seqlen_k);
  p.softmax_scale = static_cast<float>(softmax_scale);
  p.dtype = to_dtype(q.scalar_type());
  return p;
}

// The backward's params: the forward's (with `out`/`lse` as inputs) plus the gradients in and out.
inline SegmentAttnBwdParams make_bwd_params(const SegmentAttnFwdParams& fwd, const at::Tensor& dout,
                                            const at::Tensor& dlse, const at::Tensor& dq, const at::Tensor& dk,
                                            const at::Tensor& dv) {
  SegmentAttnBwdParams p{};
  static_cast<SegmentAttnFwdParams&>(p) = fwd;
  p.dout = dout.data_ptr();
  p.dout_row_stride = dout.stride(0);
  p.dout_head_stride = dout.stride(1);
  p.dlse = dlse.defined() ? dlse.data_ptr<float>() : nullptr;
  p.dq = dq.data_ptr();
  p.dk = dk.data_ptr();
  p.dv = dv.data_ptr();
  p.dq_row_stride = dq.stride(0);
  p.dq_head_stride = dq.stride(1);
  p.dk_row_stride = dk.stride(0);
  p.dk_head_stride = dk.stride(1);
  p.dv_row_stride = dv.stride(0);
  p.dv_head_stride = dv.stride(1);
  return p;
}

}  // namespace ism
