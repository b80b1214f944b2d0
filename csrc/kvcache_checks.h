// Argument checks of `ism::attn_with_kvcache` (schema in ops.cpp), shared by every backend.
//
// Every check that can fail runs before the first byte is written, so a rejected call leaves the
// cache exactly as it was. Messages name the argument (ValueError / TypeError in Python).
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>

#include "ism_params.h"

namespace ism {

inline constexpr const char* kKVCacheOp = "ism.attn_with_kvcache";

// Shapes, dtypes, devices, strides; returns the params with every input pointer and stride filled in
// (out / lse are the caller's).
KVCacheAttnParams check_kvcache_args(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                     const std::optional<at::Tensor>& k_new, const std::optional<at::Tensor>& v_new,
                                     const at::Tensor& cache_seqlens, const at::Tensor& kv_limit,
                                     const std::optional<at::Tensor>& cache_batch_idx,
                                     const std::optional<at::Tensor>& block_table, double softmax_scale);

// Values, read through the params' pointers (which must point at host memory): lengths and capacity,
// kv_limit range, cache rows / pages in range and never written for two sequences, nor written for one
// while another reads them.
void check_kvcache_values_cpu(const KVCacheAttnParams& p, const at::Tensor& k_cache, int64_t max_pages);

}  // namespace ism
