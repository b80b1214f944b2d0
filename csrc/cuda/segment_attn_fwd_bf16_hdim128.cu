// Forward kernel instantiation: bfloat16, head dim 128 (one file per instantiation: compiled once, in parallel).
#include "segment_attn_fwd.h"
#include "segment_attn_fwd_launch.h"

namespace ism::cuda {

template <>
cudaError_t run_segment_attn_fwd<DType::kBFloat16, 128>(const SegmentAttnFwdParams& params, const FwdGrid& grid,
                                                    cudaStream_t stream) {
  return launch_segment_attn_fwd<128, __nv_bfloat16>(params, grid, stream);
}

}  // namespace ism::cuda
