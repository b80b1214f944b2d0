// Host helpers shared by the CUDA op implementations (ops_cuda.cpp, ops_cuda_bwd.cpp).
#pragma once

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <nvtx3/nvToolsExt.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <string>

namespace ism {

// The opt-in CUDA kernels the process asked for: ism_ext.config (Python) sets them through the op
// ism::_set_cuda_kernel_choice(bool hopper_fwd, bool bwd_small_tiles) whenever its configuration
// changes (the environment variables are read there, once, as defaults; never here). Both start false.
struct KernelChoice {
  bool hopper_fwd;       // the sm_90a forward (ops_cuda.cpp)
  bool bwd_small_tiles;  // the small dK/dV tiles of the backward (bwd_tiles_choice.cpp)
};
KernelChoice kernel_choice();

// Scoped NVTX range, so a profile shows the op's host work and launches under its own name.
class NvtxRange {
 public:
  explicit NvtxRange(const char* name) { nvtxRangePushA(name); }
  ~NvtxRange() { nvtxRangePop(); }
  NvtxRange(const NvtxRange&) = delete;
  NvtxRange& operator=(const NvtxRange&) = delete;
};

// The kernels move rows with 16-byte vectors (cp.async in, vector stores out): the last dimension
// must be contiguous, the base 16-byte aligned and the row/head strides multiples of 8 elements.
inline bool vector_aligned(const at::Tensor& t) {
  return t.stride(2) == 1 && reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0 && t.stride(0) % 8 == 0 &&
         t.stride(1) % 8 == 0;
}

// A [rows, heads, d] view the kernels cannot read with 16-byte vectors (odd storage offset or
// strides, or an expanded last dimension such as autograd's gradient of a sum) is copied once;
// clone() always allocates, so the copy is aligned even when `t` is contiguous but offset.
inline at::Tensor vector_aligned_or_copy(const at::Tensor& t) {
  return vector_aligned(t) ? t : t.clone(at::MemoryFormat::Contiguous);
}

// What the CUDA kernels support beyond check_attn_args: the dtypes and head dims they are compiled
// for (static_switch.h: float16/bfloat16, head_dim 64 or 128), a device of compute capability 8.0
// or newer, non-negative max_seqlen hints.
void check_cuda_kernel_support(const char* op, const at::Tensor& q, int64_t head_dim,
                               std::optional<int64_t> max_seqlen_q, std::optional<int64_t> max_seqlen_k);

// The most dynamic shared memory one block of `device` may opt in to
// (cudaDevAttrMaxSharedMemoryPerBlockOptin), read from the driver once per device.
int64_t smem_optin_bytes(int device);

// "<name> (compute capability <major>.<minor>)" of `device`, for error messages.
std::string device_description(int device);

// Raises RuntimeError when `kernel` needs more shared memory per block than `device` allows.
void check_kernel_smem(const char* op, const char* kernel, int64_t bytes, int device);

// The longest sequence of a packed batch: the hint when given (capped at `total`, no sequence is
// longer than all rows), else `total` for a single sequence, else read from cu_seqlens (one device
// sync; pass the hint to avoid it and inside CUDA graph capture).
int64_t longest_sequence(const at::Tensor& cu_seqlens, int64_t batch, int64_t total, std::optional<int64_t> hint);

}  // namespace ism
