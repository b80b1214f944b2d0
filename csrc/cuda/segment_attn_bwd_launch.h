// Launch templates of the backward kernels: dynamic shared memory opt-in, grids, stream. Included
// only by the per-instantiation .cu files.
#pragma once

#include <cuda_runtime.h>

#include <cassert>

#include "../ism_params.h"
#include "bwd_kernel_traits.h"
#include "launch_grids.h"
#include "launch_utils.h"
#include "segment_attn_bwd.h"
#include "segment_attn_bwd_dkdv_kernel.cuh"
#include "segment_attn_bwd_dq_kernel.cuh"
#include "segment_attn_bwd_prepass.cuh"

namespace ism::cuda {

// The pre-pass, then the dK/dV kernel (and atomic dQ) of the kTiles traits.
template <int kHeadDim, typename Element, BwdTiles kTiles>
cudaError_t launch_segment_attn_bwd_dkdv(const SegmentAttnBwdParams& params, const BwdGrid& grid,
                                         bool deterministic, cudaStream_t stream) {
  using Dkdv = BwdDkDvTraitsOf<kHeadDim, Element, kTiles>;
  cudaError_t err;
  assert(grid.prepass_blocks <= kMaxGridX && grid.prepass_heads <= kMaxGridY && grid.dkdv_blocks <= kMaxGridX);

  // Pre-pass: (query tile, sequence) in x, query head in y; its query tiles are the dK/dV kernel's.
  if (grid.prepass_blocks > 0) {
    segment_attn_bwd_prepass_kernel<kHeadDim, Element, Dkdv::kBlockM>
        <<<dim3(static_cast<unsigned>(grid.prepass_blocks), static_cast<unsigned>(grid.prepass_heads)),
           kPrepassThreads, 0, stream>>>(params);
    if ((err = cudaGetLastError()) != cudaSuccess) return err;
  }

  // dK/dV (and atomic dQ): one block per (key tile, K/V head, sequence), key tile major.
  if (grid.dkdv_blocks > 0) {
    auto kernel = deterministic ? &segment_attn_bwd_dkdv_kernel<Dkdv, false> : &segment_attn_bwd_dkdv_kernel<Dkdv, true>;
    if ((err = allow_dynamic_smem(kernel, Dkdv::kSmemBytes)) != cudaSuccess) return err;
    kernel<<<static_cast<unsigned>(grid.dkdv_blocks), Dkdv::kNThreads, Dkdv::kSmemBytes, stream>>>(params);
    if ((err = cudaGetLastError()) != cudaSuccess) return err;
    count_bwd_dkdv_launch(kTiles);
  }
  return cudaSuccess;
}

// Deterministic dQ: one block per (query tile, query head, sequence), last query tiles first.
template <int kHeadDim, typename Element>
cudaError_t launch_segment_attn_bwd_dq(const SegmentAttnBwdParams& params, const BwdGrid& grid, cudaStream_t stream) {
  using Dq = BwdDqTraits<kHeadDim, Element>;
  if (grid.dq_blocks == 0) return cudaSuccess;
  assert(grid.dq_blocks <= kMaxGridX);
  auto kernel = &segment_attn_bwd_dq_kernel<Dq>;
  const cudaError_t err = allow_dynamic_smem(kernel, Dq::kSmemBytes);
  if (err != cudaSuccess) return err;
  kernel<<<static_cast<unsigned>(grid.dq_blocks), Dq::kNThreads, Dq::kSmemBytes, stream>>>(params);
  return cudaGetLastError();
}

}  // namespace ism::cuda
