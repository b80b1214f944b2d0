// Launch templates of the KV-cache kernels: shared-memory opt-in, occupancy, grid, stream. Included only
// by the per-instantiation .cu files (kvcache_attn_<dtype>_hdim<d>.cu).
#pragma once

#include <cuda_runtime.h>

#include <cassert>
#include <cstdint>

#include "kvcache_attn_kernel.cuh"
#include "kvcache_combine_kernel.cuh"
#include "kvcache_kernel_traits.h"
#include "launch_grids.h"
#include "launch_utils.h"

namespace ism::cuda {

template <int kHeadDim, KVCacheTiles kTiles, typename Element>
cudaError_t launch_kvcache_attn(const KVCacheKernelParams& params, int64_t blocks, cudaStream_t stream) {
  using Kt = KVCacheKernelTraits<kHeadDim, kTiles, Element>;
  if (blocks == 0) return cudaSuccess;
  assert(blocks <= kMaxGridX);  // checked by the caller (kvcache_op_cuda.cpp)
  auto kernel = &kvcache_attn_kernel<Kt>;
  const cudaError_t err = allow_dynamic_smem(kernel, Kt::kSmemBytes);
  if (err != cudaSuccess) return err;
  kernel<<<static_cast<unsigned>(blocks), Kt::kNThreads, Kt::kSmemBytes, stream>>>(params);
  return cudaGetLastError();
}

template <int kHeadDim, KVCacheTiles kTiles, typename Element>
cudaError_t kvcache_attn_occupancy(int& blocks) {
  using Kt = KVCacheKernelTraits<kHeadDim, kTiles, Element>;
  auto kernel = &kvcache_attn_kernel<Kt>;
  const cudaError_t err = allow_dynamic_smem(kernel, Kt::kSmemBytes);
  if (err != cudaSuccess) return err;
  return cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, kernel, Kt::kNThreads, Kt::kSmemBytes);
}

template <int kHeadDim, typename Element>
cudaError_t launch_kvcache_combine(const KVCacheKernelParams& params, int64_t blocks, cudaStream_t stream) {
  if (blocks == 0) return cudaSuccess;
  assert(blocks <= kMaxGridX);
  kvcache_combine_kernel<kHeadDim, Element>
      <<<static_cast<unsigned>(blocks), KVCacheCombineShape<kHeadDim>::kNThreads, 0, stream>>>(params);
  return cudaGetLastError();
}

}  // namespace ism::cuda
