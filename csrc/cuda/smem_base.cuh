// The base of a kernel's dynamic shared memory, rounded up to kSmemAlign (swizzled_rows.h).
#pragma once

#include <cstdint>

#include "swizzled_rows.h"

namespace ism::cuda {

// The bytes from the kernel's dynamic shared memory at shared address `smem_addr` to the next
// kSmemAlign boundary; a kernel takes its tiles from
//   extern __shared__ __align__(128) unsigned char smem_raw[];
//   unsigned char* smem = smem_raw + smem_align_pad(smem_u32(smem_raw));
// The launch reserves kSmemAlign bytes more than the tiles need (the traits' kSmemBytes), so the
// rounded base always leaves room for them. (Declaring the array in a helper, or returning the
// rounded pointer from one, changes the kernels' code: nvcc then loses track of the pointer's
// shared address space.)
__device__ __forceinline__ uint32_t smem_align_pad(uint32_t smem_addr) {
  return (kSmemAlign - (smem_addr % kSmemAlign)) % kSmemAlign;
}

}  // namespace ism::cuda
