#include "checks.h"

#include <c10/util/Exception.h>

#include <cmath>
#include <limits>

namespace ism {
namespace {

bool is_supported_float(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16;
}

void check_int32_vector(const char* op, const char* name, const at::Tensor& t, const at::Tensor& q) {
  TORCH_CHECK_TYPE(t.scalar_type() == at::kInt, op, ": ", name, " must be int32, got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.dim() == 1, op, ": ", name, " must be 1-D, got shape ", t.sizes());
  TORCH_CHECK_VALUE(t.device() == q.device(), op, ": ", name, " is on ", t.device(), " but q is on ", q.device());
}

}  // namespace

AttnShape check_attn_args(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                          const at::Tensor& kv_limit, const at::Tensor& cu_seqlens_q,
                          const at::Tensor& cu_seqlens_k) {
  TORCH_CHECK_VALUE(q.dim() == 3, op, ": q must have shape [total_q, heads_q, head_dim], got ", q.sizes());
  TORCH_CHECK_VALUE(k.dim() == 3, op, ": k must have shape [total_k, heads_kv, head_dim], got ", k.sizes());
  TORCH_CHECK_VALUE(v.dim() == 3, op, ": v must have shape [total_k, heads_kv, head_dim], got ", v.sizes());
  TORCH_CHECK_TYPE(is_supported_float(q.scalar_type()), op, ": q must be float32, float16 or bfloat16, got ",
                   q.scalar_type());
  TORCH_CHECK_TYPE(k.scalar_type() == q.scalar_type(), op, ": k has dtype ", k.scalar_type(),
                   " but q has ", q.scalar_type());
  TORCH_CHECK_TYPE(v.scalar_type() == q.scalar_type(), op, ": v has dtype ", v.scalar_type(),
                   " but q has ", q.scalar_type());
  TORCH_CHECK_VALUE(k.device() == q.device(), op, ": k is on ", k.device(), " but q is on ", q.device());
  TORCH_CHECK_VALUE(v.device() == q.device(), op, ": v is on ", v.device(), " but q is on ", q.device());
  TORCH_CHECK_VALUE(k.sizes() == v.sizes(), op, ": k and v must have the same shape, got k ", k.sizes(),
                    " and v ", v.sizes());
  const int64_t d = q.size(2);
  TORCH_CHECK_VALUE(k.size(2) == d, op, ": k has head_dim ", k.size(2), " but q has ", d);
  TORCH_CHECK_VALUE(d >= 1 && d <= kMaxHeadDim, op, ": head_dim must be in [1, ", kMaxHeadDim, "], got ", d);
  const int64_t h_q = q.size(1), h_kv = k.size(1);
  TORCH_CHECK_VALUE(h_q >= 1 && h_kv >= 1 && h_q % h_kv == 0, op,
                    ": the number of q heads must be a positive multiple of the number of k/v heads, got q ",
                    h_q, " and k/v ", h_kv);
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor&>{"q", q}, {"k", k}, {"v", v}}) {
    TORCH_CHECK_VALUE(t.stride(2) == 1, op, ": ", name,
                      " must be contiguous in its last dimension (head_dim), got strides ", t.strides());
  }
  constexpr int64_t kMaxRows = std::numeric_limits<int32_t>::max();
  TORCH_CHECK_VALUE(q.size(0) <= kMaxRows, op, ": q has more than 2^31 - 1 rows");
  TORCH_CHECK_VALUE(k.size(0) <= kMaxRows, op, ": k has more than 2^31 - 1 rows");

  check_int32_vector(op, "kv_limit", kv_limit, q);
  TORCH_CHECK_VALUE(kv_limit.size(0) == q.size(0), op, ": kv_limit must have one entry per q row (",
                    q.size(0), "), got ", kv_limit.size(0));
  check_int32_vector(op, "cu_seqlens_q", cu_seqlens_q, q);
  check_int32_vector(op, "cu_seqlens_k", cu_seqlens_k, q);
  TORCH_CHECK_VALUE(cu_seqlens_q.size(0) >= 1, op, ": cu_seqlens_q must have batch + 1 >= 1 entries");
  TORCH_CHECK_VALUE(cu_seqlens_k.size(0) == cu_seqlens_q.size(0), op,
                    ": cu_seqlens_q and cu_seqlens_k must have the same length (batch + 1), got ",
                    cu_seqlens_q.size(0), " and ", cu_seqlens_k.size(0));
  return {q.size(0), k.size(0), h_q, h_kv, d, cu_seqlens_q.size(0) - 1};
}

float check_softmax_scale(const char* op, double softmax_scale) {
  const float scale = static_cast<float>(softmax_scale);
  TORCH_CHECK_VALUE(std::isfinite(scale), op, ": softmax_scale must be finite as a float32 (the kernels compute in ",
                    "float32, whose largest value is about 3.4e38), got ", softmax_scale);
  return scale;
}

void check_same_as(const char* op, const char* name, const at::Tensor& t, const char* like_name,
                   const at::Tensor& like) {
  TORCH_CHECK_VALUE(t.sizes() == like.sizes(), op, ": ", name, " must have the shape of ", like_name, " ",
                    like.sizes(), ", got ", t.sizes());
  TORCH_CHECK_TYPE(t.scalar_type() == like.scalar_type(), op, ": ", name, " has dtype ", t.scalar_type(),
                   " but ", like_name, " has ", like.scalar_type());
  TORCH_CHECK_VALUE(t.device() == like.device(), op, ": ", name, " is on ", t.device(), " but ", like_name,
                    " is on ", like.device());
}

void check_lse(const char* op, const char* name, const at::Tensor& lse, const AttnShape& s, const at::Tensor& q) {
  TORCH_CHECK_TYPE(lse.scalar_type() == at::kFloat, op, ": ", name, " must be float32, got ", lse.scalar_type());
  TORCH_CHECK_VALUE(lse.dim() == 2 && lse.size(0) == s.h_q && lse.size(1) == s.total_q, op, ": ", name,
                    " must have shape [heads_q, total_q] = [", s.h_q, ", ", s.total_q, "], got ", lse.sizes());
  TORCH_CHECK_VALUE(lse.device() == q.device(), op, ": ", name, " is on ", lse.device(), " but q is on ",
                    q.device());
}

AttnShape check_bwd_args(const char* op, const at::Tensor& dout, const std::optional<at::Tensor>& dlse,
                         const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
                         const at::Tensor& lse, const at::Tensor& kv_limit, const at::Tensor& cu_seqlens_q,
                         const at::Tensor& cu_seqlens_k, double softmax_scale) {
  const AttnShape s = check_attn_args(op, q, k, v, kv_limit, cu_seqlens_q, cu_seqlens_k);
  check_softmax_scale(op, softmax_scale);
  check_same_as(op, "dout", dout, "q", q);
  check_same_as(op, "out", out, "q", q);
  check_lse(op, "lse", lse, s, q);
  if (dlse.has_value()) check_lse(op, "dlse", *dlse, s, q);
  return s;
}

std::pair<int64_t, int64_t> check_index_values_cpu(const char* op, const at::Tensor& kv_limit,
                                                   const at::Tensor& cu_seqlens_q,
                            const at::Tensor& cu_seqlens_k, const AttnShape& s,
                            std::optional<int64_t> max_seqlen_q, std::optional<int64_t> max_seqlen_k) {
  const at::Tensor cq = cu_seqlens_q.contiguous(), ck = cu_seqlens_k.contiguous(), lim = kv_limit.contiguous();
  const int32_t* cu_q = cq.data_ptr<int32_t>();
  const int32_t* cu_k = ck.data_ptr<int32_t>();
  const int32_t* limit = lim.data_ptr<int32_t>();
  TORCH_CHECK_VALUE(cu_q[0] == 0, op, ": cu_seqlens_q must start at 0, got ", cu_q[0]);
  TORCH_CHECK_VALUE(cu_k[0] == 0, op, ": cu_seqlens_k must start at 0, got ", cu_k[0]);
  int64_t longest_q = 0, longest_k = 0;
  for (int64_t b = 0; b < s.batch; ++b) {
    const int64_t len_q = int64_t{cu_q[b + 1]} - cu_q[b], len_k = int64_t{cu_k[b + 1]} - cu_k[b];
    TORCH_CHECK_VALUE(len_q >= 0, op, ": cu_seqlens_q must be non-decreasing, but entry ", b + 1, " (",
                      cu_q[b + 1], ") < entry ", b, " (", cu_q[b], ")");
    TORCH_CHECK_VALUE(len_k >= 0, op, ": cu_seqlens_k must be non-decreasing, but entry ", b + 1, " (",
                      cu_k[b + 1], ") < entry ", b, " (", cu_k[b], ")");
    longest_q = std::max(longest_q, len_q);
    longest_k = std::max(longest_k, len_k);
  }
  TORCH_CHECK_VALUE(cu_q[s.batch] == s.total_q, op, ": cu_seqlens_q must end at total_q = ", s.total_q,
                    ", got ", cu_q[s.batch]);
  TORCH_CHECK_VALUE(cu_k[s.batch] == s.total_k, op, ": cu_seqlens_k must end at total_k = ", s.total_k,
                    ", got ", cu_k[s.batch]);
  for (int64_t b = 0; b < s.batch; ++b) {
    const int32_t len_k = cu_k[b + 1] - cu_k[b];
    for (int32_t r = cu_q[b]; r < cu_q[b + 1]; ++r) {
      TORCH_CHECK_VALUE(limit[r] >= 0 && limit[r] <= len_k, op, ": kv_limit[", r, "] = ", limit[r],
                        " is outside [0, seqlen_k] = [0, ", len_k, "] of its sequence ", b);
    }
  }
  if (max_seqlen_q.has_value()) {
    TORCH_CHECK_VALUE(*max_seqlen_q >= longest_q, op, ": max_seqlen_q = ", *max_seqlen_q,
                      " is smaller than the longest query sequence (", longest_q, ")");
  }
  if (max_seqlen_k.has_value()) {
    TORCH_CHECK_VALUE(*max_seqlen_k >= longest_k, op, ": max_seqlen_k = ", *max_seqlen_k,
                      " is smaller than the longest key sequence (", longest_k, ")");
  }
  return {longest_q, longest_k};
}

}  // namespace ism
