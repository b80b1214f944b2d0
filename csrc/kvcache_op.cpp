// CPU implementation of `ism::attn_with_kvcache` (schema in ops.cpp): checks (kvcache_checks.h), then the
// kernel. Every check runs before the first byte is written. Also `ism::_attn_with_kvcache_check`, the
// same checks on any device, for composite implementations (ism_ext/ops/kvcache_composite.py).
#include <ATen/ATen.h>
#include <torch/library.h>

#include <optional>

#include "cpu/segment_attn_cpu.h"
#include "kvcache_checks.h"

namespace ism {
namespace {

std::tuple<at::Tensor, at::Tensor> attn_with_kvcache_cpu(
    const at::Tensor& q, at::Tensor& k_cache, at::Tensor& v_cache, const std::optional<at::Tensor>& k_new,
    const std::optional<at::Tensor>& v_new, const at::Tensor& cache_seqlens, const at::Tensor& kv_limit,
    const std::optional<at::Tensor>& cache_batch_idx, const std::optional<at::Tensor>& block_table,
    double softmax_scale) {
  const at::Tensor seqlens_c = cache_seqlens.contiguous(), limit_c = kv_limit.contiguous();
  const auto contiguous = [](const std::optional<at::Tensor>& t) {
    return t.has_value() ? std::optional<at::Tensor>(t->contiguous()) : std::nullopt;
  };
  const std::optional<at::Tensor> idx_c = contiguous(cache_batch_idx), table_c = contiguous(block_table);
  KVCacheAttnParams p =
      check_kvcache_args(q, k_cache, v_cache, k_new, v_new, seqlens_c, limit_c, idx_c, table_c, softmax_scale);
  check_kvcache_values_cpu(p, k_cache, block_table.has_value() ? block_table->size(1) : 0);

  at::Tensor out = at::empty(q.sizes(), q.options());
  at::Tensor lse = at::empty({q.size(0), q.size(2), q.size(1)}, q.options().dtype(at::kFloat));
  p.out = out.data_ptr();
  p.out_batch_stride = out.stride(0);
  p.out_row_stride = out.stride(1);
  p.out_head_stride = out.stride(2);
  p.lse = lse.data_ptr<float>();
  p.lse_batch_stride = lse.stride(0);
  p.lse_head_stride = lse.stride(1);
  cpu::kvcache_attn_cpu(p);
  return {out, lse};
}

// The value checks read the index tensors through host pointers: tensors on another device are copied
// to the host first (one sync; a composite path accepts it, a dedicated kernel would check on the device).
void attn_with_kvcache_check(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                             const std::optional<at::Tensor>& k_new, const std::optional<at::Tensor>& v_new,
                             const at::Tensor& cache_seqlens, const at::Tensor& kv_limit,
                             const std::optional<at::Tensor>& cache_batch_idx,
                             const std::optional<at::Tensor>& block_table, double softmax_scale) {
  KVCacheAttnParams p = check_kvcache_args(q, k_cache, v_cache, k_new, v_new, cache_seqlens, kv_limit,
                                           cache_batch_idx, block_table, softmax_scale);
  const auto on_host = [](const at::Tensor& t) { return t.to(at::kCPU).contiguous(); };
  const at::Tensor seqlens_h = on_host(cache_seqlens), limit_h = on_host(kv_limit);
  const at::Tensor idx_h = cache_batch_idx.has_value() ? on_host(*cache_batch_idx) : at::Tensor();
  const at::Tensor table_h = block_table.has_value() ? on_host(*block_table) : at::Tensor();
  p.cache_seqlens = seqlens_h.data_ptr<int32_t>();
  p.kv_limit = limit_h.data_ptr<int32_t>();
  p.cache_batch_idx = idx_h.defined() ? idx_h.data_ptr<int32_t>() : nullptr;
  p.block_table = table_h.defined() ? table_h.data_ptr<int32_t>() : nullptr;
  p.block_table_batch_stride = table_h.defined() ? table_h.stride(0) : 0;
  check_kvcache_values_cpu(p, k_cache, table_h.defined() ? table_h.size(1) : 0);
}

}  // namespace

TORCH_LIBRARY_IMPL(ism, CPU, m) {
  m.impl("attn_with_kvcache", &attn_with_kvcache_cpu);
}

TORCH_LIBRARY_IMPL(ism, CompositeExplicitAutograd, m) {
  m.impl("_attn_with_kvcache_check", &attn_with_kvcache_check);
}

}  // namespace ism
