// The `torch.ops.ism` library: op schemas and their CPU implementations.
//
// Schemas live here, in C++, so every backend registers against the same definition; the fake
// (meta) kernels and autograd formulas are registered from Python (ism_ext/ops/segment_attention.py,
// ism_ext/ops/kvcache_attention.py), following pytorch/extension-cpp.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "checks.h"
#include "cpu/segment_attn_cpu.h"
#include "params_builder.h"

namespace ism {
namespace {

std::tuple<at::Tensor, at::Tensor> segment_attn_fwd_cpu(const at::Tensor& q, const at::Tensor& k,
                                                        const at::Tensor& v, const at::Tensor& kv_limit,
                                                        const at::Tensor& cu_seqlens_q,
                                                        const at::Tensor& cu_seqlens_k,
                                                        std::optional<int64_t> max_seqlen_q,
                                                        std::optional<int64_t> max_seqlen_k, double softmax_scale,
                                                        bool /*deterministic: the CPU kernels always are*/) {
  constexpr const char* op = "ism.segment_attn_fwd";
  const AttnShape s = check_attn_args(op, q, k, v, kv_limit, cu_seqlens_q, cu_seqlens_k);
  check_softmax_scale(op, softmax_scale);
  const auto [longest_q, longest_k] =
      check_index_values_cpu(op, kv_limit, cu_seqlens_q, cu_seqlens_k, s, max_seqlen_q, max_seqlen_k);

  at::Tensor out = at::empty({s.total_q, s.h_q, s.head_dim}, q.options());
  at::Tensor lse = at::empty({s.h_q, s.total_q}, q.options().dtype(at::kFloat));
  const at::Tensor lim = kv_limit.contiguous(), cu_q = cu_seqlens_q.contiguous(), cu_k = cu_seqlens_k.contiguous();
  const SegmentAttnFwdParams p =
      make_fwd_params(s, q, k, v, lim, cu_q, cu_k, longest_q, longest_k, softmax_scale, out, lse);
  cpu::segment_attn_fwd_cpu(p);
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> segment_attn_bwd_cpu(
    const at::Tensor& dout, const std::optional<at::Tensor>& dlse, const at::Tensor& q, const at::Tensor& k,
    const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse, const at::Tensor& kv_limit,
    const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k, std::optional<int64_t> max_seqlen_q,
    std::optional<int64_t> max_seqlen_k, double softmax_scale, bool /*deterministic: always, on the CPU*/) {
  constexpr const char* op = "ism.segment_attn_bwd";
  const AttnShape s = check_bwd_args(op, dout, dlse, q, k, v, out, lse, kv_limit, cu_seqlens_q, cu_seqlens_k,
                                     softmax_scale);
  const auto [longest_q, longest_k] =
      check_index_values_cpu(op, kv_limit, cu_seqlens_q, cu_seqlens_k, s, max_seqlen_q, max_seqlen_k);

  // Gradients arriving from autograd may be expanded or sliced: the kernel needs only a
  // contiguous last dimension for the [rows, heads, d] tensors and contiguous lse rows.
  const at::Tensor dout_c = dout.stride(2) == 1 ? dout : dout.contiguous();
  const at::Tensor out_c = out.stride(2) == 1 ? out : out.contiguous();
  const at::Tensor lse_c = lse.contiguous();
  const at::Tensor dlse_c = dlse.has_value() ? dlse->contiguous() : at::Tensor();
  const at::Tensor lim = kv_limit.contiguous(), cu_q = cu_seqlens_q.contiguous(), cu_k = cu_seqlens_k.contiguous();

  at::Tensor dq = at::empty({s.total_q, s.h_q, s.head_dim}, q.options());
  at::Tensor dk = at::empty({s.total_k, s.h_kv, s.head_dim}, k.options());
  at::Tensor dv = at::empty({s.total_k, s.h_kv, s.head_dim}, v.options());

  const SegmentAttnBwdParams p = make_bwd_params(
      make_fwd_params(s, q, k, v, lim, cu_q, cu_k, longest_q, longest_k, softmax_scale, out_c, lse_c), dout_c,
      dlse_c, dq, dk, dv);
  cpu::segment_attn_bwd_cpu(p);
  return {dq, dk, dv};
}

}  // namespace

// `deterministic` selects a backward whose result does not depend on the order of floating-point
// atomics (CUDA: a separate dQ kernel instead of atomic adds; the CPU backward always is). The
// forward takes it too, as FlashAttention's API does, so that autograd can hand it to the backward.
TORCH_LIBRARY(ism, m) {
  m.def(
      "segment_attn_fwd(Tensor q, Tensor k, Tensor v, Tensor kv_limit, Tensor cu_seqlens_q, "
      "Tensor cu_seqlens_k, int? max_seqlen_q, int? max_seqlen_k, float softmax_scale, "
      "bool deterministic=False) -> (Tensor out, Tensor lse)");
  m.def(
      "segment_attn_bwd(Tensor dout, Tensor? dlse, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, "
      "Tensor kv_limit, Tensor cu_seqlens_q, Tensor cu_seqlens_k, int? max_seqlen_q, int? max_seqlen_k, "
      "float softmax_scale, bool deterministic=False) -> (Tensor dq, Tensor dk, Tensor dv)");
  // Mutates the caches (in-place append); not differentiable (inference).
  m.def(
      "attn_with_kvcache(Tensor q, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor? k_new, Tensor? v_new, "
      "Tensor cache_seqlens, Tensor kv_limit, Tensor? cache_batch_idx, Tensor? block_table, float softmax_scale) "
      "-> (Tensor out, Tensor lse)");
  // The checks of attn_with_kvcache alone, on any device (kvcache_op.cpp): what a composite
  // implementation runs before it writes anything.
  m.def(
      "_attn_with_kvcache_check(Tensor q, Tensor k_cache, Tensor v_cache, Tensor? k_new, Tensor? v_new, "
      "Tensor cache_seqlens, Tensor kv_limit, Tensor? cache_batch_idx, Tensor? block_table, float softmax_scale) "
      "-> ()");
}

TORCH_LIBRARY_FRAGMENT(ism, m) {
  // Which instruction-set build of the CPU kernels runs in this process (csrc/cpu/isa_kernels.h): the
  // widest the CPU and ATen's capability (ATEN_CPU_CAPABILITY) both allow.
  m.def("cpu_kernel_isa() -> str", [] { return std::string(cpu::kernel_isa()); });
}

TORCH_LIBRARY_IMPL(ism, CPU, m) {
  m.impl("segment_attn_fwd", &segment_attn_fwd_cpu);
  m.impl("segment_attn_bwd", &segment_attn_bwd_cpu);
}

}  // namespace ism
