// Host entry points of the CUDA forward kernel: one explicit specialisation per (dtype, head dim)
// of static_switch.h, each defined in its own .cu file (segment_attn_fwd_<dtype>_hdim<d>.cu) so that
// every kernel is compiled once and the files build in parallel.
//
// No torch header and no CUDA type beyond cudaStream_t/cudaError_t: ops_cuda.cpp (a plain C++ file)
// calls these after validation, and checks the returned error itself.
#pragma once

#include <cuda_runtime_api.h>

#include "../ism_params.h"
#include "launch_grids.h"

namespace ism::cuda {

// Launches the forward on `stream`. `params` comes from make_fwd_params (params_builder.h) with
// params.dtype == kDtype and params.head_dim == kHeadDim; q/k/v and out must be 16-byte aligned
// with row and head strides that are multiples of 8 elements. `grid` is fwd_grid<kHeadDim>(params),
// checked against kMaxGridX by the caller. Returns the launch error, if any.
template <DType kDtype, int kHeadDim>
cudaError_t run_segment_attn_fwd(const SegmentAttnFwdParams& params, const FwdGrid& grid, cudaStream_t stream);

}  // namespace ism::cuda
