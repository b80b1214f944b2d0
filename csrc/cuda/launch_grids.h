// Grid sizes of every CUDA kernel launch, computed once per pass from the call's sizes. The op
// implementations check them against the launch limits with messages that say what is too large
// (ops_cuda.cpp, ops_cuda_bwd.cpp); the launch templates take them as checked.
//
// Plain C++ (no CUDA types), like the traits it reads.
#pragma once

#include <cstdint>

#include "../ism_params.h"
#include "bwd_kernel_traits.h"
#include "fwd_kernel_traits.h"

namespace ism::cuda {

// CUDA's limits on a grid: x up to 2^31 - 1 blocks, y (and z) up to 65535.
inline constexpr int64_t kMaxGridX = 2147483647;
inline constexpr int64_t kMaxGridY = 65535;

constexpr int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Forward: one block per (query tile, query head, sequence), flattened into x (the kernel decodes
// the order): x allows 2^31 - 1 blocks where y and z stop at 65535.
struct FwdGrid {
  int64_t blocks;
};

// The structs are filled member by member, not returned as braced lists: nvcc's host compilation
// rejected `return {...}` of the one-member FwdGrid (tests/cuda/launch_grids_check.cu compiles these
// functions with nvcc).
template <int kHeadDim>
constexpr FwdGrid fwd_grid(const SegmentAttnFwdParams& p) {
  FwdGrid grid{};
  grid.blocks = ceil_div(p.max_seqlen_q, FwdTileShape<kHeadDim>::kBlockM) * p.h_q * p.batch;
  return grid;
}

// Backward, for the dK/dV tiles `DkdvShape` (bwd_kernel_traits.h):
struct BwdGrid {
  int64_t q_tiles;         // query tiles of DkdvShape::kBlockM rows in the longest sequence
                           // (params.q_tiles_stride: the pre-pass's tiles and the bounds workspace)
  int64_t prepass_blocks;  // pre-pass x: (query tile, sequence); y is the h_q query heads
  int64_t prepass_heads;
  int64_t dkdv_blocks;     // one per (key tile, K/V head, sequence), flattened into x
  int64_t dq_blocks;       // deterministic dQ kernel: one per (query tile, query head, sequence)
};

template <typename DkdvShape, typename DqShape>
constexpr BwdGrid bwd_grid(const SegmentAttnFwdParams& p) {
  BwdGrid grid{};
  grid.q_tiles = ceil_div(p.max_seqlen_q, DkdvShape::kBlockM);
  grid.prepass_blocks = grid.q_tiles * p.batch;
  grid.prepass_heads = p.h_q;
  grid.dkdv_blocks = ceil_div(p.max_seqlen_k, DkdvShape::kBlockN) * p.h_kv * p.batch;
  grid.dq_blocks = ceil_div(p.max_seqlen_q, DqShape::kBlockM) * p.h_q * p.batch;
  return grid;
}

}  // namespace ism::cuda
