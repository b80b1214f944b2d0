// The params of the CUDA kernel of `ism::attn_with_kvcache`: the op's params (ism_params.h) plus the
// split of the keys over thread blocks and its workspace. Plain C++, like ism_params.h, so the op file,
// the launch templates and the kernels read one struct.
#pragma once

#include "../ism_params.h"

namespace ism {

struct KVCacheKernelParams : KVCacheAttnParams {
  // Thread blocks per (sequence, K/V head): row_tiles tiles of the group's packed query rows (GQA heads
  // x new rows, kvcache_plan.h) times num_splits chunks of the keys.
  int row_tiles;
  int num_splits;
  // num_splits > 1 only: each chunk's normalised output and log-sum-exp, combined by
  // kvcache_combine_kernel.cuh. Row index (sequence, query head, query position): (b * h_q + h) * seqlen_q + i.
  float* out_partial;  // [num_splits, batch * h_q * seqlen_q, head_dim]
  float* lse_partial;  // [num_splits, batch * h_q * seqlen_q]
};

}  // namespace ism
