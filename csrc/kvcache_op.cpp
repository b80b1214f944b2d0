// CPU implementation of `ism::attn_with_kvcache` (schema in ops.cpp): checks (kvcache_checks.h), then the
// kernel. Every check runs before the first byte is written.
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

}  // namespace

TORCH_LIBRARY_IMPL(ism, CPU, m) {
  m.impl("attn_with_kvcache", &attn_with_kvcache_cpu);
}

}  // namespace ism
