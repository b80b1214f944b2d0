// Host helpers of the launch templates (segment_attn_*_launch.h).
#pragma once

#include <cuda_runtime.h>

namespace ism::cuda {

// Above 48 KiB of dynamic shared memory a kernel must opt in. The attribute belongs to the function
// on the current device; setting it on every launch is a cheap host call and stays right when the
// caller switches devices.
template <typename Kernel>
cudaError_t allow_dynamic_smem(Kernel kernel, int bytes) {
  if (bytes <= 48 * 1024) return cudaSuccess;
  return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
}

}  // namespace ism::cuda
