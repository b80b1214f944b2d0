// Argument checks of `ism::attn_with_kvcache`, shared by the CPU and CUDA implementations.
#include "kvcache_checks.h"

#include <c10/util/Exception.h>

#include <limits>
#include <map>
#include <set>
#include <vector>

#include "checks.h"
#include "kvcache_constants.h"
#include "params_builder.h"

namespace ism {
namespace {

constexpr const char* kOp = kKVCacheOp;

void check_float_tensor(const char* name, const at::Tensor& t, const at::Tensor& q, int64_t dim) {
  TORCH_CHECK_VALUE(t.dim() == dim, kOp, ": ", name, " must be ", dim, "-D, got shape ", t.sizes());
  TORCH_CHECK_TYPE(t.scalar_type() == q.scalar_type(), kOp, ": ", name, " has dtype ", t.scalar_type(),
                   " but q has ", q.scalar_type());
  TORCH_CHECK_VALUE(t.device() == q.device(), kOp, ": ", name, " is on ", t.device(), " but q is on ", q.device());
  TORCH_CHECK_VALUE(t.stride(-1) == 1, kOp, ": ", name, " must be contiguous in its last dimension, got strides ",
                    t.strides());
}

void check_int32(const char* name, const at::Tensor& t, const at::Tensor& q, at::IntArrayRef shape) {
  TORCH_CHECK_TYPE(t.scalar_type() == at::kInt, kOp, ": ", name, " must be int32, got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.sizes() == shape, kOp, ": ", name, " must have shape ", shape, ", got ", t.sizes());
  TORCH_CHECK_VALUE(t.device() == q.device(), kOp, ": ", name, " is on ", t.device(), " but q is on ", q.device());
}

}  // namespace

KVCacheAttnParams check_kvcache_args(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                     const std::optional<at::Tensor>& k_new, const std::optional<at::Tensor>& v_new,
                                     const at::Tensor& cache_seqlens, const at::Tensor& kv_limit,
                                     const std::optional<at::Tensor>& cache_batch_idx,
                                     const std::optional<at::Tensor>& block_table, double softmax_scale) {
  TORCH_CHECK_VALUE(q.dim() == 4, kOp, ": q must have shape [batch, seqlen_q, heads_q, head_dim], got ", q.sizes());
  TORCH_CHECK_TYPE(q.scalar_type() == at::kFloat || q.scalar_type() == at::kHalf || q.scalar_type() == at::kBFloat16,
                   kOp, ": q must be float32, float16 or bfloat16, got ", q.scalar_type());
  TORCH_CHECK_VALUE(q.stride(-1) == 1, kOp, ": q must be contiguous in its last dimension, got strides ",
                    q.strides());
  check_float_tensor("k_cache", k_cache, q, 4);
  check_float_tensor("v_cache", v_cache, q, 4);
  TORCH_CHECK_VALUE(k_cache.sizes() == v_cache.sizes(), kOp, ": k_cache and v_cache must have the same shape, got ",
                    k_cache.sizes(), " and ", v_cache.sizes());
  const int64_t batch = q.size(0), seqlen_q = q.size(1), h_q = q.size(2), d = q.size(3), h_kv = k_cache.size(2);
  // The params hold these as int (and positions as int32, like cache_seqlens): check before the casts below.
  constexpr int64_t kMaxInt = std::numeric_limits<int32_t>::max();
  TORCH_CHECK_VALUE(batch <= kMaxInt && seqlen_q <= kMaxInt && h_q <= kMaxInt, kOp,
                    ": q's batch, seqlen_q and heads must each be below 2^31, got shape ", q.sizes());
  TORCH_CHECK_VALUE(k_cache.size(1) <= kMaxInt, kOp, ": k_cache.size(1) (positions per row, or the page size) must ",
                    "be below 2^31, got ", k_cache.size(1));
  TORCH_CHECK_VALUE(k_cache.size(3) == d, kOp, ": k_cache has head_dim ", k_cache.size(3), " but q has ", d);
  TORCH_CHECK_VALUE(d >= 1 && d <= kMaxHeadDim, kOp, ": head_dim must be in [1, ", kMaxHeadDim, "], got ", d);
  TORCH_CHECK_VALUE(h_kv >= 1 && h_q % h_kv == 0, kOp,
                    ": the number of q heads must be a multiple of the cache's k/v heads, got q ", h_q, " and ", h_kv);
  TORCH_CHECK_VALUE(k_new.has_value() == v_new.has_value(), kOp, ": give both k_new and v_new, or neither");
  int64_t seqlen_new = 0;
  if (k_new.has_value()) {
    check_float_tensor("k_new", *k_new, q, 4);
    check_float_tensor("v_new", *v_new, q, 4);
    const std::vector<int64_t> expect = {batch, seqlen_q, h_kv, d};
    TORCH_CHECK_VALUE(k_new->sizes() == at::IntArrayRef(expect), kOp, ": k_new must have shape [batch, seqlen_q, ",
                      "heads_kv, head_dim] = ", at::IntArrayRef(expect), ", got ", k_new->sizes());
    TORCH_CHECK_VALUE(v_new->sizes() == at::IntArrayRef(expect), kOp, ": v_new must have shape ",
                      at::IntArrayRef(expect), ", got ", v_new->sizes());
    seqlen_new = seqlen_q;
  }
  check_int32("cache_seqlens", cache_seqlens, q, {batch});
  check_int32("kv_limit", kv_limit, q, {batch, seqlen_q});
  const float scale = check_softmax_scale(kOp, softmax_scale);

  const bool paged = block_table.has_value();
  int64_t page_size = 0;
  if (paged) {
    TORCH_CHECK_VALUE(!cache_batch_idx.has_value(), kOp, ": cache_batch_idx is for contiguous caches; a paged ",
                      "cache maps sequences to pages through block_table");
    TORCH_CHECK_VALUE(block_table->dim() == 2 && block_table->size(0) == batch, kOp,
                      ": block_table must have shape [batch, max_pages], got ", block_table->sizes());
    check_int32("block_table", *block_table, q, block_table->sizes());
    page_size = k_cache.size(1);
    TORCH_CHECK_VALUE(page_size % kPageSizeMultiple == 0, kOp, ": the page size (k_cache.size(1)) must be a ",
                      "multiple of ", kPageSizeMultiple, ", got ", page_size);
  } else if (cache_batch_idx.has_value()) {
    check_int32("cache_batch_idx", *cache_batch_idx, q, {batch});
  } else {
    TORCH_CHECK_VALUE(batch <= k_cache.size(0), kOp, ": batch ", batch, " is larger than the cache's ",
                      k_cache.size(0), " rows (pass cache_batch_idx to pick rows)");
  }

  KVCacheAttnParams p{};
  p.q = q.data_ptr();
  p.k_cache = k_cache.data_ptr();
  p.v_cache = v_cache.data_ptr();
  p.k_new = k_new.has_value() ? k_new->data_ptr() : nullptr;
  p.v_new = v_new.has_value() ? v_new->data_ptr() : nullptr;
  p.cache_seqlens = cache_seqlens.data_ptr<int32_t>();
  p.kv_limit = kv_limit.data_ptr<int32_t>();
  p.cache_batch_idx = cache_batch_idx.has_value() ? cache_batch_idx->data_ptr<int32_t>() : nullptr;
  p.block_table = paged ? block_table->data_ptr<int32_t>() : nullptr;
  p.q_batch_stride = q.stride(0);
  p.q_row_stride = q.stride(1);
  p.q_head_stride = q.stride(2);
  if (k_new.has_value()) {
    p.k_new_batch_stride = k_new->stride(0);
    p.k_new_row_stride = k_new->stride(1);
    p.k_new_head_stride = k_new->stride(2);
    p.v_new_batch_stride = v_new->stride(0);
    p.v_new_row_stride = v_new->stride(1);
    p.v_new_head_stride = v_new->stride(2);
  }
  p.k_cache_batch_stride = k_cache.stride(0);
  p.k_cache_row_stride = k_cache.stride(1);
  p.k_cache_head_stride = k_cache.stride(2);
  p.v_cache_batch_stride = v_cache.stride(0);
  p.v_cache_row_stride = v_cache.stride(1);
  p.v_cache_head_stride = v_cache.stride(2);
  p.block_table_batch_stride = paged ? block_table->stride(0) : 0;
  p.batch = static_cast<int>(batch);
  p.seqlen_q = static_cast<int>(seqlen_q);
  p.seqlen_new = static_cast<int>(seqlen_new);
  p.h_q = static_cast<int>(h_q);
  p.h_kv = static_cast<int>(h_kv);
  p.head_dim = static_cast<int>(d);
  p.page_size = static_cast<int>(page_size);
  p.softmax_scale = scale;
  p.dtype = to_dtype(q.scalar_type());
  return p;
}

// Values: lengths and capacity, kv_limit range, cache rows / pages in range and never written for
// two sequences (or written for one while another reads them).
void check_kvcache_values_cpu(const KVCacheAttnParams& p, const at::Tensor& k_cache, int64_t max_pages) {
  const int64_t rows = k_cache.size(0);  // cache rows (contiguous) or pages (paged)
  const int64_t capacity = p.page_size > 0 ? max_pages * p.page_size : k_cache.size(1);
  TORCH_CHECK_VALUE(capacity <= std::numeric_limits<int32_t>::max(), kOp, ": block_table's ", max_pages,
                    " pages of ", p.page_size, " tokens exceed 2^31 - 1 positions per sequence");
  std::set<int64_t> written;                      // rows / pages this call writes, over all sequences
  std::vector<std::set<int64_t>> own(p.batch);    // pages each sequence writes
  std::vector<std::pair<int64_t, int>> reads;     // (page, sequence) for every page a sequence reads
  for (int b = 0; b < p.batch; ++b) {
    const int64_t len = p.cache_seqlens[b];
    TORCH_CHECK_VALUE(len >= 0, kOp, ": cache_seqlens[", b, "] = ", len, " is negative");
    TORCH_CHECK_VALUE(len + p.seqlen_new <= capacity, kOp, ": appending ", p.seqlen_new, " tokens to sequence ", b,
                      " of length ", len, " exceeds the cache capacity of ", capacity, " tokens; nothing was written");
    const int64_t total = len + p.seqlen_new;
    for (int i = 0; i < p.seqlen_q; ++i) {
      const int32_t lim = p.kv_limit[static_cast<int64_t>(b) * p.seqlen_q + i];
      TORCH_CHECK_VALUE(lim >= 0 && lim <= total, kOp, ": kv_limit[", b, ", ", i, "] = ", lim,
                        " is outside [0, cache_seqlens + new tokens] = [0, ", total, "]");
    }
    if (p.page_size > 0) {
      const int32_t* table = p.block_table + b * p.block_table_batch_stride;
      std::map<int64_t, int64_t> slot_of;  // page -> the first slot of this row that holds it
      for (int64_t pg = 0; pg * p.page_size < total; ++pg) {
        TORCH_CHECK_VALUE(table[pg] >= 0 && table[pg] < rows, kOp, ": block_table[", b, ", ", pg, "] = ", table[pg],
                          " is not a page index in [0, ", rows, ")");
        // One page at two positions of a sequence: the append would overwrite its own history (and even a
        // read-only row would attend to one page's tokens twice). Only the slots in use are looked at.
        const auto [first, fresh] = slot_of.emplace(table[pg], pg);
        TORCH_CHECK_VALUE(fresh, kOp, ": page ", table[pg], " appears twice in block_table row ", b, " (slots ",
                          first->second, " and ", pg, "): a sequence's pages must be distinct; nothing was written");
        reads.emplace_back(table[pg], b);
        if (p.seqlen_new > 0 && (pg + 1) * p.page_size > len) {  // the page holds some of the new positions
          TORCH_CHECK_VALUE(written.insert(table[pg]).second, kOp, ": page ", table[pg],
                            " would be written twice in one call (it appears more than once in block_table)");
          own[b].insert(table[pg]);
        }
      }
    } else {
      const int64_t row = p.cache_batch_idx != nullptr ? p.cache_batch_idx[b] : b;
      TORCH_CHECK_VALUE(row >= 0 && row < rows, kOp, ": cache_batch_idx[", b, "] = ", row,
                        " is not a cache row in [0, ", rows, ")");
      // Reading one row for several sequences is fine; writing it twice is not.
      TORCH_CHECK_VALUE(written.insert(row).second || p.seqlen_new == 0, kOp, ": cache row ", row,
                        " would be written for two sequences in one call");
    }
  }
  // A shared (forked) page may be read by many sequences but written by none of them in place.
  for (const auto& [page, seq] : reads) {
    TORCH_CHECK_VALUE(!written.count(page) || own[seq].count(page), kOp, ": page ", page, " is read by sequence ",
                      seq, " but written for another sequence in the same call (copy it first: copy-on-write)");
  }
}

}  // namespace ism
