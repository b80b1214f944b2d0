// Host entry points of the CUDA backward: one explicit specialisation per (dtype, head dim), each
// defined in its own .cu file (segment_attn_bwd_<dtype>_hdim<d>.cu), compiled once and in parallel.
//
// No torch header: ops_cuda_bwd.cpp calls these after validation and workspace allocation, and
// checks the returned error itself.
#pragma once

#include <cuda_runtime_api.h>

#include "../ism_params.h"

namespace ism::cuda {

// Runs the backward on `stream`: the pre-pass (delta, query-tile kv_limit bounds), the dK/dV kernel,
// and the dQ part: float32 atomics into params.dq_accum (zeroed by the caller, converted by it
// afterwards) or, when `deterministic`, the separate dQ kernel that writes params.dq directly.
// `params` comes from make_bwd_params with the workspace fields set (ism_params.h); all 16-bit
// tensors 16-byte aligned with row and head strides that are multiples of 8 elements. Returns the
// first launch error, if any.
template <DType kDtype, int kHeadDim>
cudaError_t run_segment_attn_bwd(const SegmentAttnBwdParams& params, bool deterministic, cudaStream_t stream);

}  // namespace ism::cuda
