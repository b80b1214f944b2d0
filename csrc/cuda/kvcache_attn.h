// Host entry points of the CUDA kernels of `ism::attn_with_kvcache`: one explicit specialisation per
// (dtype, head dim) of static_switch.h and tiling, each (dtype, head dim) in its own .cu file
// (kvcache_attn_<dtype>_hdim<d>.cu). No torch header: kvcache_op_cuda.cpp calls these after its checks
// and raises on the returned error itself.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "kvcache_kernel_traits.h"
#include "kvcache_params.h"

namespace ism::cuda {

// Launches the attention (with the append) of `blocks` thread blocks (kvcache_plan.h kvcache_grid,
// checked against kMaxGridX by the caller) on `stream`.
template <DType kDtype, int kHeadDim, KVCacheTiles kTiles>
cudaError_t run_kvcache_attn(const KVCacheKernelParams& params, int64_t blocks, cudaStream_t stream);

// Blocks of the attention kernel one SM of the current device holds at once (the split choice needs it).
template <DType kDtype, int kHeadDim, KVCacheTiles kTiles>
cudaError_t kvcache_attn_blocks_per_sm(int& blocks);

// Launches the combine of params.num_splits > 1 chunks (`blocks` from kvcache_grid).
template <DType kDtype, int kHeadDim>
cudaError_t run_kvcache_combine(const KVCacheKernelParams& params, int64_t blocks, cudaStream_t stream);

}  // namespace ism::cuda
