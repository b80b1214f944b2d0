// KV-cache kernels, bfloat16, head dim 128: both tilings and the combine (one file per instantiation).
#include "kvcache_attn.h"
#include "kvcache_launch.h"

namespace ism::cuda {

template <>
cudaError_t run_kvcache_attn<DType::kBFloat16, 128, KVCacheTiles::kGroup>(const KVCacheKernelParams& params,
                                                                     int64_t blocks, cudaStream_t stream) {
  return launch_kvcache_attn<128, KVCacheTiles::kGroup, __nv_bfloat16>(params, blocks, stream);
}

template <>
cudaError_t run_kvcache_attn<DType::kBFloat16, 128, KVCacheTiles::kRows>(const KVCacheKernelParams& params,
                                                                    int64_t blocks, cudaStream_t stream) {
  return launch_kvcache_attn<128, KVCacheTiles::kRows, __nv_bfloat16>(params, blocks, stream);
}

template <>
cudaError_t kvcache_attn_blocks_per_sm<DType::kBFloat16, 128, KVCacheTiles::kGroup>(int& blocks) {
  return kvcache_attn_occupancy<128, KVCacheTiles::kGroup, __nv_bfloat16>(blocks);
}

template <>
cudaError_t kvcache_attn_blocks_per_sm<DType::kBFloat16, 128, KVCacheTiles::kRows>(int& blocks) {
  return kvcache_attn_occupancy<128, KVCacheTiles::kRows, __nv_bfloat16>(blocks);
}

template <>
cudaError_t run_kvcache_combine<DType::kBFloat16, 128>(const KVCacheKernelParams& params, int64_t blocks,
                                                   cudaStream_t stream) {
  return launch_kvcache_combine<128, __nv_bfloat16>(params, blocks, stream);
}

}  // namespace ism::cuda
