// Compile check: the headers shared with the CUDA kernels (params struct, tile-range rules) must
// build with nvcc alone, in device code, without any torch header. CMake's `cuda_compile_check`
// target compiles this file with every other .cu file of the project; it is not part of the
// Python extension.
#include <cstdint>

#include "ism_params.h"
#include "tile_range.h"

namespace {

// Writes, for each query tile of one sequence, how many key tiles it visits and whether the first of
// them needs a mask: exercises every tile_range.h function on the device.
__global__ void tile_plan_kernel(ism::SegmentAttnFwdParams params, int tile_q, int tile_k, int* visits,
                                 int* first_tile_full) {
  const int tile = blockIdx.x * blockDim.x + threadIdx.x;
  const int q0 = tile * tile_q;
  if (q0 >= params.total_q) return;
  int lo = params.kv_limit[q0], hi = lo;
  for (int r = q0; r < q0 + tile_q && r < params.total_q; ++r) {
    lo = min(lo, params.kv_limit[r]);
    hi = max(hi, params.kv_limit[r]);
  }
  visits[tile] = ism::key_tiles_to_visit(hi, tile_k);
  first_tile_full[tile] = ism::key_tile_is_full(lo, 0, tile_k) && ism::query_tile_sees_key_tile(hi, 0) &&
                          ism::visible_keys(lo, 0, tile_k) == tile_k;
}

}  // namespace

void launch_tile_plan(const ism::SegmentAttnFwdParams& params, int tile_q, int tile_k, int* visits,
                      int* first_tile_full, cudaStream_t stream) {
  const int tiles = (params.total_q + tile_q - 1) / tile_q;
  tile_plan_kernel<<<(tiles + 127) / 128, 128, 0, stream>>>(params, tile_q, tile_k, visits, first_tile_full);
}
