// Launch template of the forward kernel: grid, dynamic shared memory opt-in, stream. Included only
// by the per-instantiation .cu files.
#pragma once

#include <cuda_runtime.h>

#include <climits>
#include <cstdint>

#include "../ism_params.h"
#include "launch_utils.h"
#include "segment_attn_fwd_kernel.cuh"

namespace ism::cuda {

template <int kHeadDim, typename Element>
cudaError_t launch_segment_attn_fwd(const SegmentAttnFwdParams& params, cudaStream_t stream) {
  using Kt = FwdKernelTraits<kHeadDim, Element>;
  // One block per (query tile, head, sequence), flattened into x (see the kernel for the order):
  // x allows 2^31 - 1 blocks where y and z stop at 65535, and the host checks the product fits.
  const int64_t blocks = static_cast<int64_t>(num_query_tiles<kHeadDim>(params.max_seqlen_q)) * params.h_q *
                         params.batch;
  if (blocks == 0) return cudaSuccess;
  if (blocks > INT_MAX) return cudaErrorInvalidConfiguration;

  auto kernel = &segment_attn_fwd_kernel<Kt>;
  constexpr int kSmem = Kt::kSmemBytes;
  const cudaError_t err = allow_dynamic_smem(kernel, kSmem);
  if (err != cudaSuccess) return err;
  kernel<<<static_cast<unsigned>(blocks), Kt::kNThreads, kSmem, stream>>>(params);
  return cudaGetLastError();
}

}  // namespace ism::cuda
