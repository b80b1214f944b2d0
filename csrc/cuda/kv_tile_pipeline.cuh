// The double-buffered K/V stream of a query tile's key loop (the forward and the deterministic dQ
// kernel): the K and V tiles of kBlockN keys go to two shared-memory buffers each, and tile t + 1 is
// in flight while tile t is computed. Keys at or past the query tile's largest kv_limit are
// invisible to every row: zero-filled, never read.
//
// The kernel's key loop, with `kv` this thread's pipeline:
//   kv.start(p, lane, max_limit, n_key_tiles);          // tile 0 in flight
//   for (int kt = 0; kt < n_key_tiles; ++kt) {
//     const int buf = kt % 2, k0 = kt * kBlockN;
//     cp_async_wait<0>();  // tile kt has landed (the only group in flight) ...
//     __syncthreads();     // ... and every warp is done with tile kt - 1, whose buffer takes kt + 1
//     if (kt + 1 < n_key_tiles) kv.load_next(buf, k0, max_limit, p, lane);
//     ... compute on buffer buf ...
//   }
// The wait, the barrier and the loop test stay in the kernel: moved in here they changed the
// kernels' generated code (the loop counter and the scheduling around the copies).
#pragma once

#include <cstdint>

#include "../ism_params.h"
#include "mma_utils.cuh"
#include "tile_io.cuh"

namespace ism::cuda {

// sK and sV each hold two tiles of kBlockN rows of Rows (swizzled_rows.h), the second right after
// the first. k_src/v_src are this thread's first chunk of the next tile to load, advanced one tile
// at a time (two running pointers instead of per-pass 64-bit offsets kept across the loop). Row
// strides and base pointers are read from the kernel parameters at each use, which costs no
// register.
template <typename Rows, int kBlockN, typename Element>
struct KvTilePipeline {
  static constexpr int kTileElems = kBlockN * Rows::kCols;

  Element* sK;
  Element* sV;
  const Element* k_src;
  const Element* v_src;

  // k_rows/v_rows: key row 0 of the sequence in the query tile's K/V head.
  __device__ __forceinline__ KvTilePipeline(Element* sK_, Element* sV_, const Element* k_rows, const Element* v_rows,
                                            const SegmentAttnFwdParams& p, const TileCopyLane<Rows>& lane)
      : sK(sK_),
        sV(sV_),
        k_src(k_rows + lane.gmem_offset(p.k_row_stride)),
        v_src(v_rows + lane.gmem_offset(p.v_row_stride)) {}

  // Puts key tile 0 in flight into buffer 0, when there is one. A group is committed either way, so
  // the callers' wait counts are the same in both cases.
  __device__ __forceinline__ void start(const SegmentAttnFwdParams& p, const TileCopyLane<Rows>& lane, int max_limit,
                                        int n_key_tiles) {
    if (n_key_tiles > 0) {
      const int valid = min(kBlockN, max_limit);
      load_tile_async<Rows, kBlockN>(sK, lane, k_src, p.k_row_stride, valid, static_cast<const Element*>(p.k));
      load_tile_async<Rows, kBlockN>(sV, lane, v_src, p.v_row_stride, valid, static_cast<const Element*>(p.v));
    }
    cp_async_commit();
  }

  // Puts the key tile after the one at k0 (in buffer buf) in flight into the other buffer.
  __device__ __forceinline__ void load_next(int buf, int k0, int max_limit, const SegmentAttnFwdParams& p,
                                            const TileCopyLane<Rows>& lane) {
    const int valid = min(kBlockN, max_limit - (k0 + kBlockN));
    k_src += kBlockN * p.k_row_stride;
    v_src += kBlockN * p.v_row_stride;
    load_tile_async<Rows, kBlockN>(sK + (buf ^ 1) * kTileElems, lane, k_src, p.k_row_stride, valid,
                                   static_cast<const Element*>(p.k));
    load_tile_async<Rows, kBlockN>(sV + (buf ^ 1) * kTileElems, lane, v_src, p.v_row_stride, valid,
                                   static_cast<const Element*>(p.v));
    cp_async_commit();
  }
};

}  // namespace ism::cuda
