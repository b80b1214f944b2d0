#include "cuda_op_utils.h"

#include <cuda_runtime_api.h>

namespace ism {

void check_cuda_kernel_support(const char* op, const at::Tensor& q, int64_t head_dim,
                               std::optional<int64_t> max_seqlen_q, std::optional<int64_t> max_seqlen_k) {
  TORCH_CHECK_TYPE(q.scalar_type() == at::kHalf || q.scalar_type() == at::kBFloat16, op,
                   ": the CUDA kernel supports float16 and bfloat16 inputs, got ", q.scalar_type(),
                   " (float32 runs on the CPU kernel)");
  TORCH_CHECK_VALUE(head_dim == 64 || head_dim == 128, op,
                    ": the CUDA kernel supports head_dim 64 and 128, got head_dim = ", head_dim);
  if (max_seqlen_q.has_value()) {
    TORCH_CHECK_VALUE(*max_seqlen_q >= 0, op, ": max_seqlen_q must be >= 0, got ", *max_seqlen_q);
  }
  if (max_seqlen_k.has_value()) {
    TORCH_CHECK_VALUE(*max_seqlen_k >= 0, op, ": max_seqlen_k must be >= 0, got ", *max_seqlen_k);
  }
  int cc_major = 0, cc_minor = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&cc_major, cudaDevAttrComputeCapabilityMajor, q.get_device()));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&cc_minor, cudaDevAttrComputeCapabilityMinor, q.get_device()));
  TORCH_CHECK(cc_major >= 8, op, ": the CUDA kernel needs compute capability 8.0 or newer, got ", cc_major, ".",
              cc_minor);
}

int64_t longest_sequence(const at::Tensor& cu_seqlens, int64_t batch, int64_t total, std::optional<int64_t> hint) {
  if (hint.has_value()) return std::min(*hint, total);
  if (batch <= 1) return total;
  const int64_t longest = (cu_seqlens.slice(0, 1) - cu_seqlens.slice(0, 0, batch)).max().item<int64_t>();  // sync
  return std::clamp<int64_t>(longest, 0, total);
}

}  // namespace ism
