// Host entry points of the Hopper (sm_90a) forward kernel (hopper_fwd_kernel.cuh): one explicit
// specialisation per (dtype, head dim) of static_switch.h, each in its own .cu file
// (hopper_fwd_<dtype>_hdim<d>.cu). They exist only in builds that compiled the Hopper files
// (ISM_WITH_HOPPER_FWD: the CUTLASS headers found and 9.0a among the architectures, see setup.py);
// ops_cuda.cpp calls them only then, only on compute capability 9.0 devices, and only when
// ISM_EXT_HOPPER_FWD asks for them.
//
// No torch header and no CUDA type beyond cudaStream_t/cudaError_t (ops_cuda.cpp is plain C++).
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "../ism_params.h"

namespace ism::cuda::hopper {

// Launches the Hopper forward on `stream`: `blocks` = grid_blocks(params.max_seqlen_q, 128, h_q,
// batch) (hopper_fwd_plan.h), checked against the launch limit by the caller. params as for
// run_segment_attn_fwd, and additionally total_k > 0 (a tensor map cannot describe an empty K) and
// q/k/v strides that TMA accepts: multiples of 16 bytes, nonzero on every dimension of extent > 1.
// Returns the launch error, if any (a tensor map the driver refuses is cudaErrorInvalidValue).
template <DType kDtype, int kHeadDim>
cudaError_t run_hopper_fwd(const SegmentAttnFwdParams& params, int64_t blocks, cudaStream_t stream);

}  // namespace ism::cuda::hopper
