// Hopper forward kernel instantiation: bfloat16, head dim 128 (one file per instantiation: compiled once, in parallel).
#include "hopper_fwd.h"
#include "hopper_fwd_launch.cuh"

namespace ism::cuda::hopper {

template <>
cudaError_t run_hopper_fwd<DType::kBFloat16, 128>(const SegmentAttnFwdParams& params, int64_t blocks, cudaStream_t stream) {
  return launch_hopper_fwd<128, cutlass::bfloat16_t>(params, blocks, stream);
}

}  // namespace ism::cuda::hopper
