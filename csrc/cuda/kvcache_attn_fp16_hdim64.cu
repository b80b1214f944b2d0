// KV-cache kernels, float16, head dim 64: both tilings and the combine (one file per instantiation).
#include "kvcache_attn.h"
#include "kvcache_launch.h"

namespace ism::cuda {

template <>
cudaError_t run_kvcache_attn<DType::kFloat16, 64, KVCacheTiles::kGroup>(const KVCacheKernelParams& params,
                                                                     int64_t blocks, cudaStream_t stream) {
  return launch_kvcache_attn<64, KVCacheTiles::kGroup, __half>(params, blocks, stream);
}

template <>
cudaError_t run_kvcache_attn<DType::kFloat16, 64, KVCacheTiles::kRows>(const KVCacheKernelParams& params,
                                                                    int64_t blocks, cudaStream_t stream) {
  return launch_kvcache_attn<64, KVCacheTiles::kRows, __half>(params, blocks, stream);
}

template <>
cudaError_t kvcache_attn_blocks_per_sm<DType::kFloat16, 64, KVCacheTiles::kGroup>(int& blocks) {
  return kvcache_attn_occupancy<64, KVCacheTiles::kGroup, __half>(blocks);
}

template <>
cudaError_t kvcache_attn_blocks_per_sm<DType::kFloat16, 64, KVCacheTiles::kRows>(int& blocks) {
  return kvcache_attn_occupancy<64, KVCacheTiles::kRows, __half>(blocks);
}

template <>
cudaError_t run_kvcache_combine<DType::kFloat16, 64>(const KVCacheKernelParams& params, int64_t blocks,
                                                   cudaStream_t stream) {
  return launch_kvcache_combine<64, __half>(params, blocks, stream);
}

}  // namespace ism::cuda
