// Backward kernels instantiation: float16, head dim 64 (one file per instantiation: compiled once, in parallel).
#include "segment_attn_bwd.h"
#include "segment_attn_bwd_launch.h"

namespace ism::cuda {

template <>
cudaError_t run_segment_attn_bwd<DType::kFloat16, 64>(const SegmentAttnBwdParams& params, bool deterministic,
                                                    cudaStream_t stream) {
  return launch_segment_attn_bwd<64, __half>(params, deterministic, stream);
}

}  // namespace ism::cuda
