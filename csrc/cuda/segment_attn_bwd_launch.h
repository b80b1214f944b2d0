// Launch template of the backward kernels: grids, dynamic shared memory opt-in, stream. Included
// only by the per-instantiation .cu files.
#pragma once

#include <cuda_runtime.h>

#include <climits>
#include <cstdint>

#include "../ism_params.h"
#include "launch_utils.h"
#include "segment_attn_bwd_dkdv_kernel.cuh"
#include "segment_attn_bwd_dq_kernel.cuh"
#include "segment_attn_bwd_prepass.cuh"

namespace ism::cuda {

template <int kHeadDim, typename Element>
cudaError_t launch_segment_attn_bwd(const SegmentAttnBwdParams& params, bool deterministic, cudaStream_t stream) {
  using Dkdv = BwdDkDvTraits<kHeadDim, Element>;
  using Dq = BwdDqTraits<kHeadDim, Element>;
  cudaError_t err;

  // Pre-pass: (query tile, sequence) in x, query head in y.
  const int64_t prepass_x = static_cast<int64_t>(params.q_tiles_stride) * params.batch;
  if (prepass_x > 0) {
    if (prepass_x > INT_MAX || params.h_q > 65535) return cudaErrorInvalidConfiguration;
    segment_attn_bwd_prepass_kernel<kHeadDim, Element>
        <<<dim3(static_cast<unsigned>(prepass_x), params.h_q), kPrepassThreads, 0, stream>>>(params);
    if ((err = cudaGetLastError()) != cudaSuccess) return err;
  }

  // dK/dV (and atomic dQ): one block per (key tile, K/V head, sequence), key tile major.
  const int64_t key_tiles = (params.max_seqlen_k + Dkdv::kBlockN - 1) / Dkdv::kBlockN;
  const int64_t dkdv_blocks = key_tiles * params.h_kv * params.batch;
  if (dkdv_blocks > INT_MAX) return cudaErrorInvalidConfiguration;
  if (dkdv_blocks > 0) {
    auto kernel = deterministic ? &segment_attn_bwd_dkdv_kernel<Dkdv, false> : &segment_attn_bwd_dkdv_kernel<Dkdv, true>;
    if ((err = allow_dynamic_smem(kernel, Dkdv::kSmemBytes)) != cudaSuccess) return err;
    kernel<<<static_cast<unsigned>(dkdv_blocks), Dkdv::kNThreads, Dkdv::kSmemBytes, stream>>>(params);
    if ((err = cudaGetLastError()) != cudaSuccess) return err;
  }

  if (!deterministic) return cudaSuccess;
  // Deterministic dQ: one block per (query tile, query head, sequence), last query tiles first.
  const int64_t dq_blocks =
      static_cast<int64_t>((params.max_seqlen_q + Dq::kBlockM - 1) / Dq::kBlockM) * params.h_q * params.batch;
  if (dq_blocks > INT_MAX) return cudaErrorInvalidConfiguration;
  if (dq_blocks == 0) return cudaSuccess;
  auto kernel = &segment_attn_bwd_dq_kernel<Dq>;
  if ((err = allow_dynamic_smem(kernel, Dq::kSmemBytes)) != cudaSuccess) return err;
  kernel<<<static_cast<unsigned>(dq_blocks), Dq::kNThreads, Dq::kSmemBytes, stream>>>(params);
  return cudaGetLastError();
}

}  // namespace ism::cuda
