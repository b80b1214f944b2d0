// Backward kernels instantiation: bfloat16, head dim 128; the pre-pass and dK/dV kernels of the big tiles
// and the deterministic dQ kernel (one file per instantiation: compiled once, in parallel).
#include "segment_attn_bwd.h"
#include "segment_attn_bwd_launch.h"

namespace ism::cuda {

template <>
cudaError_t run_segment_attn_bwd_dkdv<DType::kBFloat16, 128, BwdTiles::kBig>(const SegmentAttnBwdParams& params,
                                                                        const BwdGrid& grid, bool deterministic,
                                                                        cudaStream_t stream) {
  return launch_segment_attn_bwd_dkdv<128, __nv_bfloat16, BwdTiles::kBig>(params, grid, deterministic, stream);
}

template <>
cudaError_t run_segment_attn_bwd_dq<DType::kBFloat16, 128>(const SegmentAttnBwdParams& params, const BwdGrid& grid,
                                                       cudaStream_t stream) {
  return launch_segment_attn_bwd_dq<128, __nv_bfloat16>(params, grid, stream);
}

}  // namespace ism::cuda
