#include "cuda_op_utils.h"

#include <cuda_runtime_api.h>
#include <torch/library.h>

#include <array>
#include <atomic>
#include <sstream>

#include "../params_builder.h"
#include "static_switch.h"

namespace ism {
namespace {

// "a, b and c" of the supported values, in the order of static_switch.h.
template <typename T, std::size_t N, typename Name>
std::string listed(const T (&values)[N], Name name) {
  std::ostringstream text;
  for (std::size_t i = 0; i < N; ++i) {
    if (i > 0) text << (i + 1 == N ? " and " : ", ");
    text << name(values[i]);
  }
  return text.str();
}

std::atomic<bool> hopper_fwd_chosen{false};
std::atomic<bool> bwd_small_tiles_chosen{false};

void set_cuda_kernel_choice(bool hopper_fwd, bool bwd_small_tiles) {
  hopper_fwd_chosen.store(hopper_fwd);
  bwd_small_tiles_chosen.store(bwd_small_tiles);
}

}  // namespace

KernelChoice kernel_choice() { return {hopper_fwd_chosen.load(), bwd_small_tiles_chosen.load()}; }

TORCH_LIBRARY_FRAGMENT(ism, m) {
  m.def("_set_cuda_kernel_choice(bool hopper_fwd, bool bwd_small_tiles) -> ()", &set_cuda_kernel_choice);
}

void check_cuda_kernel_support(const char* op, const at::Tensor& q, int64_t head_dim,
                               std::optional<int64_t> max_seqlen_q, std::optional<int64_t> max_seqlen_k) {
  const std::optional<DType> dtype = float_dtype(q.scalar_type());
  TORCH_CHECK_TYPE(dtype.has_value() && cuda::is_kernel_dtype(*dtype), op, ": the CUDA kernel supports ",
                   listed(cuda::kKernelDtypes, cuda::dtype_name), " inputs, got ", q.scalar_type(),
                   " (float32 runs on the CPU kernel)");
  TORCH_CHECK_VALUE(cuda::is_kernel_head_dim(head_dim), op, ": the CUDA kernel supports head_dim ",
                    listed(cuda::kKernelHeadDims, [](int d) { return d; }), ", got head_dim = ", head_dim);
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

int64_t smem_optin_bytes(int device) {
  // 0 = not read yet. Devices past the table are read at every call (a cheap driver query).
  static std::array<std::atomic<int>, 64> cache{};
  const bool cached = device >= 0 && device < static_cast<int>(cache.size());
  if (cached) {
    const int bytes = cache[device].load(std::memory_order_relaxed);
    if (bytes > 0) return bytes;
  }
  int bytes = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&bytes, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  if (cached) cache[device].store(bytes, std::memory_order_relaxed);
  return bytes;
}

std::string device_description(int device) {
  cudaDeviceProp prop{};
  C10_CUDA_CHECK(cudaGetDeviceProperties(&prop, device));
  std::ostringstream text;
  text << prop.name << " (compute capability " << prop.major << "." << prop.minor << ")";
  return text.str();
}

void check_kernel_smem(const char* op, const char* kernel, int64_t bytes, int device) {
  const int64_t limit = smem_optin_bytes(device);
  TORCH_CHECK(bytes <= limit, op, ": the ", kernel, " needs ", bytes, " bytes of shared memory per block, but ",
              device_description(device), " allows ", limit);
}

int64_t longest_sequence(const at::Tensor& cu_seqlens, int64_t batch, int64_t total, std::optional<int64_t> hint) {
  if (hint.has_value()) return std::min(*hint, total);
  if (batch <= 1) return total;
  const int64_t longest = (cu_seqlens.slice(0, 1) - cu_seqlens.slice(0, 0, batch)).max().item<int64_t>();  // sync
  return std::clamp<int64_t>(longest, 0, total);
}

}  // namespace ism
