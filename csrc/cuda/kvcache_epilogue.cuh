// The end of the KV-cache attention kernel: finished rows written as the op's output (16-bit out and
// lse) or, when the keys are split, as this chunk's float32 partial output and lse
// (kvcache_params.h), which kvcache_combine_kernel.cuh combines.
#pragma once

#include <cmath>
#include <cstdint>

#include "kvcache_params.h"
#include "kvcache_rows.cuh"
#include "mma_utils.cuh"
#include "online_softmax.cuh"

namespace ism::cuda {

// Where packed row r's results go: element offset in out, float offset in lse, row of the partials.
struct RowDest {
  int64_t out, lse, part;
};

__device__ __forceinline__ RowDest row_dest(const KVCacheKernelParams& p, const KVCacheBlock& b, int r) {
  const PackedRow row = packed_row(p, b, r);
  RowDest d;
  d.out = b.seq * p.out_batch_stride + row.pos * p.out_row_stride + row.head * p.out_head_stride;
  d.lse = b.seq * p.lse_batch_stride + row.head * p.lse_head_stride + row.pos;
  d.part = ((static_cast<int64_t>(b.split) * p.batch + b.seq) * p.h_q + row.head) * p.seqlen_q + row.pos;
  return d;
}

// kGroup: the 4 warps each hold the softmax state of all 16 rows over their quarter of every key tile.
// The states go through shared memory (s_merge, kMergeBytes, free once the key loop is over) and are
// merged per row: weights exp2((max_w - max) * scale), sum and output the weighted sums. A row whose
// warps all saw nothing gets output 0 and lse -inf, a row with a NaN score NaN (row_normaliser: a
// warp's NaN sum stays NaN under any weight, 0 included). Every thread calls it (one barrier inside).
template <typename Kt, typename Softmax>
__device__ __forceinline__ void merge_warps_and_store(const Softmax& softmax, const float (&o)[1][Kt::kOTiles][4],
                                                      float scale_log2, float* s_merge, const KVCacheKernelParams& p,
                                                      const KVCacheBlock& b) {
  using Element = typename Kt::Element;
  constexpr int kM = Kt::kBlockM, kRowFloats = Kt::kMergeRowFloats, kNWarps = Kt::kNWarps;
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32, g = lane / 4, t4 = lane % 4;
  float* s_o = s_merge;                       // [warp][row][kRowFloats]
  float* s_max = s_merge + Kt::kMergeOFloats;  // [warp][row], raw scores
  float* s_sum = s_max + kNWarps * kM;
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int row = g + 8 * h;
    const float sum = quad_sum(softmax.row_sum[0][h]);
    if (t4 == 0) {
      s_max[warp * kM + row] = softmax.row_max[0][h];
      s_sum[warp * kM + row] = sum;
    }
#pragma unroll
    for (int dt = 0; dt < Kt::kOTiles; ++dt) {
      *reinterpret_cast<float2*>(s_o + (warp * kM + row) * kRowFloats + dt * 8 + 2 * t4) =
          make_float2(o[0][dt][2 * h], o[0][dt][2 * h + 1]);
    }
  }
  __syncthreads();

  const int row = tid / Kt::kMergeThreadsPerRow, t = tid % Kt::kMergeThreadsPerRow;
  if (row >= b.rows) return;
  float top = -INFINITY;
#pragma unroll
  for (int w = 0; w < kNWarps; ++w) top = fmaxf(top, s_max[w * kM + row]);
  float weight[kNWarps], sum = 0.f;
#pragma unroll
  for (int w = 0; w < kNWarps; ++w) {
    weight[w] = top == -INFINITY ? 0.f : fast_exp2((s_max[w * kM + row] - top) * scale_log2);
    sum += weight[w] * s_sum[w * kM + row];
  }
  float inv_sum, lse;
  row_normaliser(top, sum, scale_log2, inv_sum, lse);
  const RowDest dest = row_dest(p, b, row);
#pragma unroll
  for (int k = 0; k < Kt::kMergeQuads; ++k) {
    const int col = 4 * t + 4 * Kt::kMergeThreadsPerRow * k;
    float4 acc = make_float4(0.f, 0.f, 0.f, 0.f);
#pragma unroll
    for (int w = 0; w < kNWarps; ++w) {
      const float4 x = *reinterpret_cast<const float4*>(s_o + (w * kM + row) * kRowFloats + col);
      acc.x += weight[w] * x.x;
      acc.y += weight[w] * x.y;
      acc.z += weight[w] * x.z;
      acc.w += weight[w] * x.w;
    }
    acc = make_float4(acc.x * inv_sum, acc.y * inv_sum, acc.z * inv_sum, acc.w * inv_sum);
    if (p.num_splits == 1) {
      *reinterpret_cast<uint2*>(static_cast<Element*>(p.out) + dest.out + col) =
          make_uint2(pack_float2<Element>(acc.x, acc.y), pack_float2<Element>(acc.z, acc.w));
    } else {
      *reinterpret_cast<float4*>(p.out_partial + dest.part * p.head_dim + col) = acc;
    }
  }
  if (t == 0) {
    if (p.num_splits == 1) {
      p.lse[dest.lse] = lse;
    } else {
      p.lse_partial[dest.part] = lse;
    }
  }
}

// kRows: each warp owns its rows. Without splits, the output is staged in the Q buffer (each warp
// writes only the rows it alone read) and stored with 16-byte writes per row; with splits, the float
// partials go out straight from the fragments (float2 writes, 32 contiguous bytes per quad).
template <typename Kt, typename Softmax>
__device__ __forceinline__ void store_rows_of_warps(const Softmax& softmax,
                                                    const float (&o)[Kt::kMTiles][Kt::kOTiles][4], float scale_log2,
                                                    typename Kt::Element* sQ, const KVCacheKernelParams& p,
                                                    const KVCacheBlock& b) {
  using Element = typename Kt::Element;
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32, t4 = lane % 4;
  const bool split = p.num_splits > 1;
  __syncwarp();
  softmax.for_each_finished_row(warp * Kt::kWarpRows, lane, scale_log2,
                                [&](int mi, int h, int row, float inv_sum, float lse) {
    if (!split) {
#pragma unroll
      for (int dt = 0; dt < Kt::kOTiles; ++dt) {
        *reinterpret_cast<uint32_t*>(sQ + Kt::swizzle(row, dt) + 2 * t4) =
            pack_float2<Element>(o[mi][dt][2 * h] * inv_sum, o[mi][dt][2 * h + 1] * inv_sum);
      }
    }
    if (row >= b.rows) return;
    const RowDest dest = row_dest(p, b, row);
    if (split) {
      float* part = p.out_partial + dest.part * p.head_dim + 2 * t4;
#pragma unroll
      for (int dt = 0; dt < Kt::kOTiles; ++dt) {
        *reinterpret_cast<float2*>(part + dt * 8) =
            make_float2(o[mi][dt][2 * h] * inv_sum, o[mi][dt][2 * h + 1] * inv_sum);
      }
    }
    if (t4 == 0) (split ? p.lse_partial[dest.part] : p.lse[dest.lse]) = lse;
  });
  if (split) return;  // block-uniform
  __syncthreads();
  constexpr int kRowsPerPass = Kt::kNThreads / Kt::kChunks;
  const int chunk = tid % Kt::kChunks;
#pragma unroll
  for (int pass = 0; pass < Kt::kBlockM / kRowsPerPass; ++pass) {
    const int row = tid / Kt::kChunks + pass * kRowsPerPass;
    if (row < b.rows) {
      *reinterpret_cast<uint4*>(static_cast<Element*>(p.out) + row_dest(p, b, row).out + chunk * 8) =
          *reinterpret_cast<const uint4*>(sQ + Kt::swizzle(row, chunk));
    }
  }
}

}  // namespace ism::cuda
