// Block-wide reductions shared by the kernels.
#pragma once

namespace ism::cuda {

// The smallest `lo` and the largest `hi` over all threads of the block, returned to every thread
// as (min, max). Every thread of the block must call it (it holds one barrier); s_reduce holds
// 2 * kNWarps ints and must not be rewritten before the next barrier. A thread with nothing to add
// passes lo = INT_MAX, hi = 0 (or INT_MIN).
template <int kNWarps>
__device__ __forceinline__ int2 block_min_max(int lo, int hi, int* s_reduce) {
#pragma unroll
  for (int off = 16; off > 0; off /= 2) {
    lo = min(lo, __shfl_xor_sync(0xffffffffu, lo, off));
    hi = max(hi, __shfl_xor_sync(0xffffffffu, hi, off));
  }
  const int warp = static_cast<int>(threadIdx.x) / 32;
  if (threadIdx.x % 32 == 0) {
    s_reduce[warp] = lo;
    s_reduce[kNWarps + warp] = hi;
  }
  __syncthreads();
  int2 result = make_int2(s_reduce[0], s_reduce[kNWarps]);
#pragma unroll
  for (int w = 1; w < kNWarps; ++w) {
    result.x = min(result.x, s_reduce[w]);
    result.y = max(result.y, s_reduce[kNWarps + w]);
  }
  return result;
}

}  // namespace ism::cuda
