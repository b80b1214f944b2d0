// Entry points of the CPU segment-attention kernels. They take the plain params structs of
// ism_params.h; the caller (ops.cpp) has validated shapes, dtypes and values.
#pragma once

#include "../ism_params.h"

namespace ism::cpu {

// Tile sizes of the CPU kernels. A key tile is converted (and K transposed) once per query tile,
// so taller query tiles amortise that better: 128 x 64 measured faster than 64 x 64 on an AVX-512
// machine at 2k-4k tokens. The working set of a tile (q, k, v, scores, accumulator at head dim 128:
// about 200 KiB) stays inside a core's L2 cache.
constexpr int kTileQ = 128;
constexpr int kTileK = 64;

// Scores are kept in the log2 domain (exp2 is cheaper than exp): q is scaled by
// softmax_scale * log2(e) once, and the log-sum-exp converted back with ln(2).
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

// out and lse from q, k, v.
void segment_attn_fwd_cpu(const SegmentAttnFwdParams& params);

// dq, dk, dv from dout (and optionally dlse), q, k, v, out, lse. Deterministic: every gradient
// element is written by exactly one work item, in a fixed order.
void segment_attn_bwd_cpu(const SegmentAttnBwdParams& params);

// Writes k_new/v_new into the cache at cache_seqlens[b].., then attends q over the updated cache.
void kvcache_attn_cpu(const KVCacheAttnParams& params);

}  // namespace ism::cpu
