// CUDA implementation of `ism::segment_attn_fwd`: validation, output allocation and the launch of
// the forward kernel (segment_attn_fwd_kernel.cuh) on the current stream. The backward is
// ops_cuda_bwd.cpp.
//
// Two forward kernels: the FA2-class sm_80 kernel, the default everywhere, and the Hopper kernel
// (hopper_fwd_kernel.cuh: TMA, wgmma, warp-specialised), opt-in until its GPU tests have passed on a
// GPU: ism_ext.config's hopper_fwd (default from ISM_EXT_HOPPER_FWD; kernel_choice() here) selects it. It is
// compiled only when the build found the CUTLASS headers and 9.0a among the architectures
// (ISM_WITH_HOPPER_FWD, setup.py) and runs only on compute capability 9.0 devices; asked for where
// either is missing, the call raises (a forced kernel that silently fell back would let its tests
// pass on the other kernel). A call with no keys at all (total_k = 0, where no tensor map can
// describe K) runs the sm_80 kernel, which writes its zeros and -inf.
//   ism::_cuda_hopper_fwd_launches() -> int   Hopper forward launches in this process (for tests)
//   ism::_cuda_hopper_fwd_built() -> bool     whether this build has the Hopper kernel
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
#include <atomic>
#include <cmath>
#include <cstdint>
#include <optional>
#include <string>
#include <tuple>

#include "../checks.h"
#include "../params_builder.h"
#include "cuda_op_utils.h"
#include "fwd_kernel_traits.h"
#include "hopper_fwd_plan.h"
#include "launch_grids.h"
#include "segment_attn_fwd.h"
#include "static_switch.h"
#if defined(ISM_WITH_HOPPER_FWD)
#include "hopper_fwd.h"
#endif

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

// How the error messages name the switch.
constexpr const char* kHopperFwdChoice = "ism_ext.config hopper_fwd=True (default from ISM_EXT_HOPPER_FWD)";
std::atomic<int64_t> hopper_fwd_launches{0};

// Whether this call runs the Hopper kernel: when the kernel configuration asks for it, which needs a
// build with the kernel and a compute capability 9.0 device (else a RuntimeError that says which is missing).
bool use_hopper_fwd(const char* op, int device) {
  if (!kernel_choice().hopper_fwd) return false;
#if defined(ISM_WITH_HOPPER_FWD)
  int cc_major = 0, cc_minor = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&cc_major, cudaDevAttrComputeCapabilityMajor, device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&cc_minor, cudaDevAttrComputeCapabilityMinor, device));
  TORCH_CHECK(cc_major == 9 && cc_minor == 0, op, ": ", kHopperFwdChoice,
              " selects the Hopper (sm_90a) forward kernel, which runs on compute capability 9.0 only, but ",
              device_description(device), " is not one; set hopper_fwd=False for the default kernel");
  return true;
#else
  (void)device;
  TORCH_CHECK(false, op, ": ", kHopperFwdChoice, " selects the Hopper forward kernel, but this build of ism_ext ",
              "has none: it is compiled only when the CUTLASS headers are found and TORCH_CUDA_ARCH_LIST names 9.0a ",
              "(see setup.py); set hopper_fwd=False for the default kernel");
  return false;
#endif
}

#if defined(ISM_WITH_HOPPER_FWD)
// A tensor map needs every stride a multiple of 16 bytes (vector_aligned_or_copy gave that) and a
// nonzero one on each dimension of extent > 1: an expanded (broadcast) view is copied.
at::Tensor tma_ready(const at::Tensor& t) {
  const bool ok = (t.size(0) <= 1 || t.stride(0) != 0) && (t.size(1) <= 1 || t.stride(1) != 0);
  return ok ? t : t.contiguous();
}

void run_hopper_fwd(const char* op, const AttnShape& s, const at::Tensor& qa, const at::Tensor& ka,
                    const at::Tensor& va, const at::Tensor& lim, const at::Tensor& cu_q, const at::Tensor& cu_k,
                    int64_t longest_q, int64_t longest_k, double softmax_scale, const at::Tensor& out,
                    const at::Tensor& lse) {
  const at::Tensor qh = tma_ready(qa), kh = tma_ready(ka), vh = tma_ready(va);
  const SegmentAttnFwdParams p =
      make_fwd_params(s, qh, kh, vh, lim, cu_q, cu_k, longest_q, longest_k, softmax_scale, out, lse);
  int64_t blocks = 0, smem_bytes = 0;
  cuda::dispatch_head_dim(p.head_dim, [&](auto head_dim) {
    using Shape = cuda::hopper::HopperFwdShape<decltype(head_dim)::value>;
    blocks = cuda::hopper::grid_blocks(p.max_seqlen_q, Shape::kBlockM, p.h_q, p.batch);
    smem_bytes = Shape::kSmemBytes;
  });
  TORCH_CHECK_VALUE(blocks <= cuda::kMaxGridX, op, ": ", blocks,
                    " thread blocks (query tiles x heads x sequences) exceed one launch; split the batch");
  check_kernel_smem(op, "Hopper forward kernel", smem_bytes, qh.get_device());

  cudaError_t err = cudaErrorInvalidValue;
  {
    const NvtxRange range("ism.segment_attn_fwd (hopper)");
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
    const bool compiled = cuda::dispatch_kernel_config(p.dtype, p.head_dim, [&](auto config) {
      using Config = decltype(config);
      err = cuda::hopper::run_hopper_fwd<Config::kDtype, Config::kHeadDim>(p, blocks, stream);
    });
    TORCH_INTERNAL_ASSERT(compiled, "no Hopper forward kernel for this dtype and head_dim");  // checked before
  }
  C10_CUDA_CHECK(err);
  hopper_fwd_launches.fetch_add(1);
}
#endif

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
  if (use_hopper_fwd(op, q.get_device()) && s.total_k > 0) {
#if defined(ISM_WITH_HOPPER_FWD)
    run_hopper_fwd(op, s, qa, ka, va, lim, cu_q, cu_k, longest_q, longest_k, softmax_scale, out, lse);
    return {out, lse};
#endif
  }
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

TORCH_LIBRARY_FRAGMENT(ism, m) {
  m.def("_cuda_hopper_fwd_launches() -> int", []() -> int64_t { return hopper_fwd_launches.load(); });
  m.def("_cuda_hopper_fwd_built() -> bool", []() -> bool {
#if defined(ISM_WITH_HOPPER_FWD)
    return true;
#else
    return false;
#endif
  });
}

}  // namespace ism
