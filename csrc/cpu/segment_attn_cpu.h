// Entry points of the CPU segment-attention kernels. They take the plain params structs of
// ism_params.h; the caller (ops.cpp) has validated shapes, dtypes and values.
#pragma once

#include "../attn_constants.h"
#include "../ism_params.h"

namespace ism::cpu {

// Tile sizes of the CPU kernels. The transposed query tile is packed once per query tile and reused
// against every key tile, so a tall query tile amortises it, and a long key tile means fewer loads and
// stores of the output accumulator in the P V product. 128 x 128 measured best of 96/128/192 x 64/96/128
// on AVX-512 and AVX2 (2k tokens, head dims 64 and 128); the score tile (64 KiB) stays in L2. Both are
// multiples of every vector width (4, 8, 16).
constexpr int kTileQ = 128;
constexpr int kTileK = 128;

// Scores are kept in the log2 domain (exp2 is cheaper than exp): q is scaled by softmax_scale * kLog2e
// once, and the log-sum-exp converted back with kLn2 (attn_constants.h, shared with the CUDA kernels).

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
