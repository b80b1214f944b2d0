// Entry points of the CPU segment-attention kernels. They take the plain params structs of
// ism_params.h; the caller (ops.cpp) has validated shapes, dtypes and values.
#pragma once

#include "../ism_params.h"

namespace ism::cpu {

// Tile sizes of the CPU kernels. The transposed query tile is packed once per query tile and reused
// against every key tile, so a tall query tile amortises it; the score tile (64 x 128 floats, 32 KiB) stays
// in L1 between its two products and the softmax. Both are multiples of every vector width (4, 8, 16).
constexpr int kTileQ = 128;
constexpr int kTileK = 128;

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

// The instruction-set build the three entry points run: "avx512", "avx2" or "generic" (isa_kernels.h).
const char* kernel_isa();

}  // namespace ism::cpu
