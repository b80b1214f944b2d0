// Validation of the segment-attention op arguments.
//
// Every message names the argument at fault. Shape and dimension errors raise ValueError and
// dtype errors TypeError in Python (TORCH_CHECK_VALUE / TORCH_CHECK_TYPE), so a user sees which
// argument to fix instead of a crash or silent garbage.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <utility>

namespace ism {

// Sizes shared by the forward and backward checks.
struct AttnShape {
  int64_t total_q, total_k, h_q, h_kv, head_dim, batch;
};

constexpr int64_t kMaxHeadDim = 256;

// q [total_q, h_q, d], k/v [total_k, h_kv, d], one float dtype, one device, last dim contiguous,
// h_q % h_kv == 0, d <= kMaxHeadDim; kv_limit int32 [total_q]; cu_seqlens_q/k int32 [batch + 1].
AttnShape check_attn_args(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                          const at::Tensor& kv_limit, const at::Tensor& cu_seqlens_q,
                          const at::Tensor& cu_seqlens_k);

// A tensor that must have exactly the shape/dtype/device of `like` (gradients, saved outputs).
void check_same_as(const char* op, const char* name, const at::Tensor& t, const char* like_name,
                   const at::Tensor& like);

// A float32 [h_q, total_q] tensor on the device of `q` (lse and its gradient).
void check_lse(const char* op, const char* name, const at::Tensor& lse, const AttnShape& s, const at::Tensor& q);

// The softmax scale as every kernel uses it: the float32 value, which must be finite. The check runs on the
// cast value, not the double, so a scale that overflows float32 (1e39 -> inf) is rejected. Returns it.
float check_softmax_scale(const char* op, double softmax_scale);

// The backward's arguments: check_attn_args, a finite (float32) softmax_scale, dout and out exactly like q, and
// lse (and dlse, when given) float32 [h_q, total_q]. Shared by the CPU and CUDA backward.
AttnShape check_bwd_args(const char* op, const at::Tensor& dout, const std::optional<at::Tensor>& dlse,
                         const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
                         const at::Tensor& lse, const at::Tensor& kv_limit, const at::Tensor& cu_seqlens_q,
                         const at::Tensor& cu_seqlens_k, double softmax_scale);

// Value checks that read the index tensors (they must be on the CPU): cu_seqlens start at 0, never
// decrease and end at total_q/total_k; kv_limit[r] lies in [0, seqlen_k of r's sequence];
// max_seqlen_q/k, when given, are at least the longest sequence. Returns the longest (q, k) lengths.
std::pair<int64_t, int64_t> check_index_values_cpu(const char* op, const at::Tensor& kv_limit,
                                                   const at::Tensor& cu_seqlens_q,
                            const at::Tensor& cu_seqlens_k, const AttnShape& s,
                            std::optional<int64_t> max_seqlen_q, std::optional<int64_t> max_seqlen_k);

}  // namespace ism
