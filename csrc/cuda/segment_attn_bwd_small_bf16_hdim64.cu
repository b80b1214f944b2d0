// Backward kernels instantiation: bfloat16, head dim 64; the pre-pass and dK/dV kernels of the small
// tiles (bwd_kernel_traits.h BwdDkDvSmallShape), for GPUs with 99 KiB of shared memory per block.
#include "segment_attn_bwd.h"
#include "segment_attn_bwd_launch.h"

namespace ism::cuda {

template <>
cudaError_t run_segment_attn_bwd_dkdv<DType::kBFloat16, 64, BwdTiles::kSmall>(const SegmentAttnBwdParams& params,
                                                                          const BwdGrid& grid, bool deterministic,
                                                                          cudaStream_t stream) {
  return launch_segment_attn_bwd_dkdv<64, __nv_bfloat16, BwdTiles::kSmall>(params, grid, deterministic, stream);
}

}  // namespace ism::cuda
