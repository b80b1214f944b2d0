// Host entry points of the CUDA backward: explicit specialisations per (dtype, head dim) of
// static_switch.h, defined in the .cu files segment_attn_bwd_<dtype>_hdim<d>.cu (big dK/dV tiles and
// the deterministic dQ kernel) and segment_attn_bwd_small_<dtype>_hdim<d>.cu (small dK/dV tiles),
// each compiled once and in parallel.
//
// No torch header: ops_cuda_bwd.cpp calls these after validation, the tile choice and workspace
// allocation, and checks the returned errors itself. `params` comes from make_bwd_params with the
// workspace fields set (ism_params.h), params.q_tiles_stride == grid.q_tiles; all 16-bit tensors
// 16-byte aligned with row and head strides that are multiples of 8 elements. `grid` is
// bwd_grid<BwdDkDvShapeOf<kHeadDim, kTiles>, BwdDqShape<kHeadDim>>(params) (launch_grids.h),
// checked by the caller.
#pragma once

#include <cuda_runtime_api.h>

#include "../ism_params.h"
#include "bwd_kernel_traits.h"
#include "launch_grids.h"

namespace ism::cuda {

// Runs on `stream` the pre-pass (delta, query-tile kv_limit bounds) and the dK/dV kernel of the
// `kTiles` traits. Unless `deterministic`, the dK/dV kernel also adds dQ with float32 atomics into
// params.dq_accum (zeroed by the caller, converted by it afterwards). Returns the first launch
// error, if any.
template <DType kDtype, int kHeadDim, BwdTiles kTiles>
cudaError_t run_segment_attn_bwd_dkdv(const SegmentAttnBwdParams& params, const BwdGrid& grid, bool deterministic,
                                      cudaStream_t stream);

// Runs on `stream` the deterministic dQ kernel, which writes params.dq directly; after
// run_segment_attn_bwd_dkdv (it reads the pre-pass's delta).
template <DType kDtype, int kHeadDim>
cudaError_t run_segment_attn_bwd_dq(const SegmentAttnBwdParams& params, const BwdGrid& grid, cudaStream_t stream);

// Counts the dK/dV launches of each kind of tiles in this process (bwd_tiles_choice.cpp), so a test
// can tell which kernels a call really ran.
void count_bwd_dkdv_launch(BwdTiles tiles);

}  // namespace ism::cuda
