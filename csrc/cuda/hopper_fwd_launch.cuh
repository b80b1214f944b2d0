// Launch template of the Hopper forward kernel: the three TMA tensor maps (encoded on the host by
// CuTe's make_tma_copy, which calls the driver's cuTensorMapEncodeTiled through the runtime's
// entry-point query, so nothing links libcuda), the shared-memory opt-in, the launch. Included only
// by the per-instantiation hopper_fwd_*.cu files.
#pragma once

#include <cuda_runtime.h>

#include <cassert>
#include <cstdint>

#include "../ism_params.h"
#include "hopper_fwd_kernel.cuh"
#include "hopper_fwd_plan.h"
#include "launch_grids.h"
#include "launch_utils.h"

namespace ism::cuda::hopper {

// The stride a tensor map gets for one dimension: the tensor's own, except on a dimension of extent 1,
// which the copies never step along, where any stride TMA accepts will do (the op may hand over
// stride 0 there, e.g. a single head); `fallback` is one.
inline int64_t tma_stride(int extent, int64_t stride, int64_t fallback) { return extent > 1 ? stride : fallback; }

template <int kHeadDim, typename Element>
cudaError_t launch_hopper_fwd(const SegmentAttnFwdParams& p, int64_t blocks, cudaStream_t stream) {
  using Kt = HopperFwdTraits<kHeadDim, Element>;
  if (blocks == 0) return cudaSuccess;
  assert(blocks <= kMaxGridX && p.total_k > 0);  // checked by the caller (ops_cuda.cpp)

  // Strides of extent-1 dimensions: d elements (16-byte multiples at d = 64 and 128).
  const int64_t d = kHeadDim;
  auto gmem = [&](const void* ptr, int rows, int heads, int64_t row_stride, int64_t head_stride) {
    return Kt::make_gmem_tensor(static_cast<const Element*>(ptr), rows, heads, tma_stride(rows, row_stride, d * heads),
                                tma_stride(heads, head_stride, d));
  };
  HopperFwdKernelParams<Kt> kp{p, Kt::make_tma_q(gmem(p.q, p.total_q, p.h_q, p.q_row_stride, p.q_head_stride)),
                               Kt::make_tma_kv(gmem(p.k, p.total_k, p.h_kv, p.k_row_stride, p.k_head_stride)),
                               Kt::make_tma_kv(gmem(p.v, p.total_k, p.h_kv, p.v_row_stride, p.v_head_stride))};

  auto kernel = &hopper_fwd_kernel<Kt>;
  const cudaError_t err = allow_dynamic_smem(kernel, Kt::kSmemBytes);
  if (err != cudaSuccess) return err;
  kernel<<<static_cast<unsigned>(blocks), Kt::kNThreads, Kt::kSmemBytes, stream>>>(kp);
  return cudaGetLastError();
}

}  // namespace ism::cuda::hopper
