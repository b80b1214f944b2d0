// Backward kernels instantiation: bfloat16, head dim 128 (one file per instantiation: compiled once, in parallel).
#include "segment_attn_bwd.h"
#include "segment_attn_bwd_launch.h"

namespace ism::cuda {

template <>
cudaError_t run_segment_attn_bwd<DType::kBFloat16, 128>(const SegmentAttnBwdParams& params, bool deterministic,
                                                    cudaStream_t stream) {
  return launch_segment_attn_bwd<128, __nv_bfloat16>(params, deterministic, stream);
}

}  // namespace ism::cuda
