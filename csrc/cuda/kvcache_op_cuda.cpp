// `ism::_attn_with_kvcache_cuda`: the dedicated CUDA kernel of `ism::attn_with_kvcache`, as an internal op
// with the same schema. It is opt-in until its GPU tests pass: the one CUDA implementation of
// `ism::attn_with_kvcache` is the Python dispatcher (ism_ext/ops/kvcache_dispatch.py,
// attn_with_kvcache_cuda), which calls this op when ism_ext.config has kvcache_kernel=True and the call is
// one the kernel covers, and the composite of verified pieces (ism_ext/ops/kvcache_composite.py) otherwise.
// Nothing else calls it, so it has no fake kernel: tracing sees only ism::attn_with_kvcache.
//
// Every check runs before the first byte is written, so a rejected call leaves the cache byte-identical:
//   - shapes, dtypes, devices, strides: check_kvcache_args (kvcache_checks.h), the CPU op's checks;
//   - what the kernel supports: float16/bfloat16, head_dim 64 or 128, sm_80+ (check_cuda_kernel_support),
//     and caches it can read and write in 16-byte vectors (q, k_new and v_new are copied when they are not);
//   - index values: the small index tensors go to the host in one copy (one device sync) and
//     check_kvcache_values_cpu runs on them, as the composite path does. A device-side check could guard
//     the writes without the sync but could not raise at the call (docs/kv_cache.md). The host copy also
//     gives the longest kv_limit, which the split choice uses.
// Then the launch plan (kvcache_plan.h), its grid checks, and the kernels on the current stream.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cstdint>
#include <map>
#include <mutex>
#include <optional>
#include <tuple>
#include <vector>

#include "../kvcache_checks.h"
#include "cuda_op_utils.h"
#include "kvcache_attn.h"
#include "kvcache_params.h"
#include "kvcache_plan.h"
#include "launch_grids.h"
#include "static_switch.h"

namespace ism {
namespace {

constexpr const char* kOp = "ism._attn_with_kvcache_cuda";
using OptTensor = std::optional<at::Tensor>;

// The kernel moves rows with 16-byte vectors: last dimension contiguous, base 16-byte aligned, the
// other strides multiples of 8 elements.
bool vector_aligned_4d(const at::Tensor& t) {
  return t.stride(3) == 1 && reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0 && t.stride(0) % 8 == 0 &&
         t.stride(1) % 8 == 0 && t.stride(2) % 8 == 0;
}

at::Tensor aligned_or_copy(const at::Tensor& t) {
  return vector_aligned_4d(t) ? t : t.clone(at::MemoryFormat::Contiguous);
}

OptTensor aligned_or_copy(const OptTensor& t) { return t.has_value() ? OptTensor(aligned_or_copy(*t)) : t; }

OptTensor contiguous(const OptTensor& t) { return t.has_value() ? OptTensor(t->contiguous()) : t; }

// What the kernel covers beyond the op's checks (the composite path runs the rest).
void check_kernel_covers(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache) {
  check_cuda_kernel_support(kOp, q, q.size(3), std::nullopt, std::nullopt);
  TORCH_CHECK_VALUE(vector_aligned_4d(k_cache) && vector_aligned_4d(v_cache), kOp,
                    ": the kernel appends to and reads the caches in 16-byte vectors, so k_cache and v_cache need ",
                    "a 16-byte aligned base and strides that are multiples of 8 elements, got strides ",
                    k_cache.strides(), " and ", v_cache.strides(),
                    " (ism.attn_with_kvcache runs such caches on its composite path)");
}

// The index values checked on the host (one copy of all four tensors, one sync); returns the largest
// kv_limit. `p` comes from check_kvcache_args; its index pointers are pointed at the host copy.
int check_values_on_host(KVCacheAttnParams p, const at::Tensor& k_cache, const at::Tensor& cache_seqlens,
                         const at::Tensor& kv_limit, const OptTensor& cache_batch_idx, const OptTensor& block_table) {
  std::vector<at::Tensor> parts = {cache_seqlens.reshape(-1), kv_limit.reshape(-1)};
  if (cache_batch_idx.has_value()) parts.push_back(cache_batch_idx->reshape(-1));
  if (block_table.has_value()) parts.push_back(block_table->reshape(-1));
  const at::Tensor host = at::cat(parts).to(at::kCPU);
  const int32_t* values = host.data_ptr<int32_t>();
  const int64_t limits = kv_limit.numel();
  p.cache_seqlens = values;
  p.kv_limit = values + p.batch;
  p.cache_batch_idx = cache_batch_idx.has_value() ? values + p.batch + limits : nullptr;
  p.block_table = block_table.has_value() ? values + p.batch + limits : nullptr;
  const int64_t max_pages = block_table.has_value() ? block_table->size(1) : 0;
  p.block_table_batch_stride = max_pages;
  check_kvcache_values_cpu(p, k_cache, max_pages);
  return limits > 0 ? *std::max_element(p.kv_limit, p.kv_limit + limits) : 0;
}

// Blocks of the attention kernel per SM on `device`, from the occupancy API, read once per (device,
// dtype, head dim, tiling): the cache is keyed by exactly that tuple, so a new head dim or dtype in
// static_switch.h needs no change here.
int blocks_per_sm(DType dtype, int head_dim, cuda::KVCacheTiles tiles, int device) {
  using Key = std::tuple<int, DType, int, cuda::KVCacheTiles>;
  static std::mutex mutex;
  static std::map<Key, int> cache;
  const Key key{device, dtype, head_dim, tiles};
  {
    const std::lock_guard<std::mutex> lock(mutex);
    if (const auto it = cache.find(key); it != cache.end()) return it->second;
  }
  int blocks = 0;
  cudaError_t err = cudaErrorInvalidValue;
  cuda::dispatch_kernel_config(dtype, head_dim, [&](auto c) {
    using C = decltype(c);
    using cuda::KVCacheTiles;
    err = tiles == KVCacheTiles::kGroup
              ? cuda::kvcache_attn_blocks_per_sm<C::kDtype, C::kHeadDim, KVCacheTiles::kGroup>(blocks)
              : cuda::kvcache_attn_blocks_per_sm<C::kDtype, C::kHeadDim, KVCacheTiles::kRows>(blocks);
  });
  C10_CUDA_CHECK(err);
  blocks = std::max(blocks, 1);
  const std::lock_guard<std::mutex> lock(mutex);
  cache.emplace(key, blocks);
  return blocks;
}

// The tiling, the split of the keys and the grids, checked against CUDA's launch limits.
cuda::KVCacheGrid plan_launch(const KVCacheAttnParams& p, int max_limit, int device) {
  cuda::KVCacheGrid grid{};
  int64_t smem_bytes = 0;
  cuda::dispatch_head_dim(p.head_dim, [&](auto d) {
    constexpr int kHeadDim = decltype(d)::value;
    grid = cuda::kvcache_grid<kHeadDim>(p.batch, p.h_q, p.h_kv, p.seqlen_q, 1);
    const int64_t units = grid.attn_blocks;
    int sms = 0;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
    constexpr int kBlockN = cuda::KVCacheTileShape<kHeadDim, cuda::KVCacheTiles::kGroup>::kBlockN;
    const int64_t key_tiles = cuda::ceil_div64(max_limit, kBlockN);
    const int splits = cuda::choose_key_splits(units, key_tiles, sms,
                                               blocks_per_sm(p.dtype, p.head_dim, grid.tiles, device));
    grid = cuda::kvcache_grid<kHeadDim>(p.batch, p.h_q, p.h_kv, p.seqlen_q, splits);
    smem_bytes = grid.tiles == cuda::KVCacheTiles::kGroup
                     ? cuda::KVCacheTileShape<kHeadDim, cuda::KVCacheTiles::kGroup>::kSmemBytes
                     : cuda::KVCacheTileShape<kHeadDim, cuda::KVCacheTiles::kRows>::kSmemBytes;
  });
  TORCH_CHECK_VALUE(grid.attn_blocks <= cuda::kMaxGridX, kOp, ": ", grid.attn_blocks, " thread blocks (row tiles x ",
                    "key chunks x K/V heads x sequences) exceed one launch; split the batch");
  TORCH_CHECK_VALUE(grid.combine_blocks <= cuda::kMaxGridX, kOp, ": ", grid.combine_blocks,
                    " thread blocks of the combine exceed one launch; split the batch");
  check_kernel_smem(kOp, "KV-cache attention kernel", smem_bytes, device);
  return grid;
}

cudaError_t launch(const KVCacheKernelParams& p, const cuda::KVCacheGrid& grid, cudaStream_t stream) {
  cudaError_t err = cudaErrorInvalidValue;
  const bool compiled = cuda::dispatch_kernel_config(p.dtype, p.head_dim, [&](auto c) {
    using C = decltype(c);
    err = grid.tiles == cuda::KVCacheTiles::kGroup
              ? cuda::run_kvcache_attn<C::kDtype, C::kHeadDim, cuda::KVCacheTiles::kGroup>(p, grid.attn_blocks, stream)
              : cuda::run_kvcache_attn<C::kDtype, C::kHeadDim, cuda::KVCacheTiles::kRows>(p, grid.attn_blocks, stream);
    if (err == cudaSuccess && grid.splits > 1) {
      err = cuda::run_kvcache_combine<C::kDtype, C::kHeadDim>(p, grid.combine_blocks, stream);
    }
  });
  TORCH_INTERNAL_ASSERT(compiled, "no CUDA KV-cache kernel for this dtype and head_dim");  // checked before
  return err;
}

// The kernel's params: the tensors as it reads them (16-byte vectors, contiguous index tensors; copies where
// needed, kept alive in `workspace`, which must outlive the launch) and the outputs.
KVCacheKernelParams kernel_params(const at::Tensor& q, at::Tensor& k_cache, at::Tensor& v_cache, const OptTensor& k_new,
                                  const OptTensor& v_new, const at::Tensor& cache_seqlens, const at::Tensor& kv_limit,
                                  const OptTensor& cache_batch_idx, const OptTensor& block_table, double softmax_scale,
                                  const at::Tensor& out, const at::Tensor& lse, std::vector<at::Tensor>& workspace) {
  const OptTensor kn = aligned_or_copy(k_new), vn = aligned_or_copy(v_new);
  const OptTensor idx = contiguous(cache_batch_idx), table = contiguous(block_table);
  workspace = {aligned_or_copy(q), cache_seqlens.contiguous(), kv_limit.contiguous()};
  for (const OptTensor& t : {kn, vn, idx, table}) {
    if (t.has_value()) workspace.push_back(*t);
  }
  KVCacheKernelParams p{};
  static_cast<KVCacheAttnParams&>(p) = check_kvcache_args(workspace[0], k_cache, v_cache, kn, vn, workspace[1],
                                                          workspace[2], idx, table, softmax_scale);
  p.out = out.data_ptr();
  p.out_batch_stride = out.stride(0);
  p.out_row_stride = out.stride(1);
  p.out_head_stride = out.stride(2);
  p.lse = lse.data_ptr<float>();
  p.lse_batch_stride = lse.stride(0);
  p.lse_head_stride = lse.stride(1);
  return p;
}

// Points the params at the split workspace when the plan splits the keys.
void set_split(KVCacheKernelParams& p, const cuda::KVCacheGrid& grid, const at::Tensor& q,
               std::vector<at::Tensor>& workspace) {
  p.row_tiles = static_cast<int>(grid.row_tiles);
  p.num_splits = grid.splits;
  if (grid.splits == 1) return;
  const int64_t rows = q.size(0) * q.size(2) * q.size(1);
  workspace.push_back(at::empty({grid.splits, rows, q.size(3)}, q.options().dtype(at::kFloat)));
  workspace.push_back(at::empty({grid.splits, rows}, q.options().dtype(at::kFloat)));
  p.out_partial = workspace[workspace.size() - 2].data_ptr<float>();
  p.lse_partial = workspace.back().data_ptr<float>();
}

std::tuple<at::Tensor, at::Tensor> attn_with_kvcache_cuda(const at::Tensor& q, at::Tensor& k_cache,
                                                          at::Tensor& v_cache, const OptTensor& k_new,
                                                          const OptTensor& v_new, const at::Tensor& cache_seqlens,
                                                          const at::Tensor& kv_limit, const OptTensor& cache_batch_idx,
                                                          const OptTensor& block_table, double softmax_scale) {
  const KVCacheAttnParams checked = check_kvcache_args(q, k_cache, v_cache, k_new, v_new, cache_seqlens, kv_limit,
                                                       cache_batch_idx, block_table, softmax_scale);
  const c10::cuda::CUDAGuard device_guard(q.device());
  check_kernel_covers(q, k_cache, v_cache);
  const int max_limit = check_values_on_host(checked, k_cache, cache_seqlens, kv_limit, cache_batch_idx, block_table);

  at::Tensor out = at::empty(q.sizes(), q.options());
  at::Tensor lse = at::empty({q.size(0), q.size(2), q.size(1)}, q.options().dtype(at::kFloat));
  if (q.numel() == 0) return {out, lse};  // no sequence or no new row: nothing to append or attend

  std::vector<at::Tensor> workspace;
  KVCacheKernelParams p = kernel_params(q, k_cache, v_cache, k_new, v_new, cache_seqlens, kv_limit, cache_batch_idx,
                                        block_table, softmax_scale, out, lse, workspace);
  const cuda::KVCacheGrid grid = plan_launch(p, max_limit, q.get_device());
  set_split(p, grid, q, workspace);
  cudaError_t err;
  {
    const NvtxRange range(kOp);
    err = launch(p, grid, c10::cuda::getCurrentCUDAStream().stream());
  }
  C10_CUDA_CHECK(err);
  return {out, lse};
}

}  // namespace

// The schema is attn_with_kvcache's (ops.cpp); the op exists in CUDA builds only.
TORCH_LIBRARY_FRAGMENT(ism, m) {
  m.def(
      "_attn_with_kvcache_cuda(Tensor q, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor? k_new, Tensor? v_new, "
      "Tensor cache_seqlens, Tensor kv_limit, Tensor? cache_batch_idx, Tensor? block_table, float softmax_scale) "
      "-> (Tensor out, Tensor lse)");
}

TORCH_LIBRARY_IMPL(ism, CUDA, m) { m.impl("_attn_with_kvcache_cuda", &attn_with_kvcache_cuda); }

}  // namespace ism
