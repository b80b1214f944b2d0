// Compile check of csrc/cuda/launch_grids.h under nvcc: the grid functions evaluated at compile time
// (static_assert) and called from host code of a .cu file, which is where nvcc once rejected the
// braced `return {...}` of the one-member FwdGrid that g++ accepts. CMake's `cuda_compile_check`
// target compiles it with every other .cu file of the project; it is not part of the Python extension.
#include <cstdint>

#include "cuda/bwd_kernel_traits.h"
#include "cuda/launch_grids.h"

namespace {

using namespace ism::cuda;

// Two sequences, the longest 1000 query rows and 700 keys, 8 query heads on 2 K/V heads.
constexpr ism::SegmentAttnFwdParams sample_params() {
  ism::SegmentAttnFwdParams p{};
  p.batch = 2;
  p.h_q = 8;
  p.h_kv = 2;
  p.max_seqlen_q = 1000;
  p.max_seqlen_k = 700;
  return p;
}

// Forward: query tiles of 128 rows (d = 64) or 64 rows (d = 128), times heads and sequences.
static_assert(fwd_grid<64>(sample_params()).blocks == 8 * 8 * 2);
static_assert(fwd_grid<128>(sample_params()).blocks == 16 * 8 * 2);

// Backward, big dK/dV tiles of d = 64: 128-row query tiles, 128-key tiles; the pre-pass one block per
// (query tile, sequence) and query head.
constexpr BwdGrid kBig64 = bwd_grid<BwdDkDvShape<64>, BwdDqShape<64>>(sample_params());
static_assert(kBig64.q_tiles == 8 && kBig64.prepass_blocks == 16 && kBig64.prepass_heads == 8);
static_assert(kBig64.dkdv_blocks == 6 * 2 * 2 && kBig64.dq_blocks == 16 * 8 * 2);

}  // namespace

// The same functions from host code at run time, for every tile choice of both head dims.
int64_t launch_grid_blocks(const ism::SegmentAttnFwdParams& p) {
  int64_t blocks = fwd_grid<64>(p).blocks + fwd_grid<128>(p).blocks;
  const BwdGrid grids[] = {bwd_grid<BwdDkDvShape<64>, BwdDqShape<64>>(p),
                           bwd_grid<BwdDkDvShape<128>, BwdDqShape<128>>(p),
                           bwd_grid<BwdDkDvSmallShape<64>, BwdDqShape<64>>(p),
                           bwd_grid<BwdDkDvSmallShape<128>, BwdDqShape<128>>(p)};
  for (const BwdGrid& g : grids) blocks += g.prepass_blocks + g.dkdv_blocks + g.dq_blocks;
  return blocks;
}
