// Hopper forward kernel instantiation: float16, head dim 64 (one file per instantiation: compiled once, in parallel).
#include "hopper_fwd.h"
#include "hopper_fwd_launch.cuh"

namespace ism::cuda::hopper {

template <>
cudaError_t run_hopper_fwd<DType::kFloat16, 64>(const SegmentAttnFwdParams& params, int64_t blocks, cudaStream_t stream) {
  return launch_hopper_fwd<64, cutlass::half_t>(params, blocks, stream);
}

}  // namespace ism::cuda::hopper
