// Launch template of the forward kernel: dynamic shared memory opt-in, grid, stream. Included only
// by the per-instantiation .cu files.
#pragma once

#include <cuda_runtime.h>

#include <cassert>

#include "../ism_params.h"
#include "launch_grids.h"
#include "launch_utils.h"
#include "segment_attn_fwd_kernel.cuh"

namespace ism::cuda {

template <int kHeadDim, typename Element>
cudaError_t launch_segment_attn_fwd(const SegmentAttnFwdParams& params, const FwdGrid& grid, cudaStream_t stream) {
  using Kt = FwdKernelTraits<kHeadDim, Element>;
  if (grid.blocks == 0) return cudaSuccess;
  assert(grid.blocks <= kMaxGridX);  // checked by the caller (ops_cuda.cpp)

  auto kernel = &segment_attn_fwd_kernel<Kt>;
  constexpr int kSmem = Kt::kSmemBytes;
  const cudaError_t err = allow_dynamic_smem(kernel, kSmem);
  if (err != cudaSuccess) return err;
  kernel<<<static_cast<unsigned>(grid.blocks), Kt::kNThreads, kSmem, stream>>>(params);
  return cudaGetLastError();
}

}  // namespace ism::cuda
