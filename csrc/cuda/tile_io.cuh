// Global <-> shared memory movement of row tiles in the swizzled layout of SwizzledRows
// (swizzled_rows.h; any Shape with its kNThreads, kChunks, kRowBytes and swizzle()):
// asynchronous 16-byte loads with zero-filled rows past the valid range, and 16-byte stores of a
// finished output tile.
#pragma once

#include <cstdint>

#include "mma_utils.cuh"

namespace ism::cuda {

// Where this thread's 16-byte chunks of a row tile lie: tile row `row` (and row + k * kRowsPerPass,
// k = 1, 2, ...) and chunk `chunk`. The same for every tile of the kernel.
template <typename Shape>
struct TileCopyLane {
  static constexpr int kRowsPerPass = Shape::kNThreads / Shape::kChunks;
  static_assert(kRowsPerPass % 8 == 0, "row & 7 is the same for every pass of a thread");
  int row, chunk;
  __device__ __forceinline__ explicit TileCopyLane(int tid) : row(tid / Shape::kChunks), chunk(tid % Shape::kChunks) {}
  // Offset of this thread's first chunk in a tile whose rows are `row_stride` elements apart.
  __device__ __forceinline__ int64_t gmem_offset(int64_t row_stride) const { return row * row_stride + chunk * 8; }
};

// Issues cp.async copies of rows [0, kRows) of a [rows, d] tile. `src` is this thread's first chunk
// (tile start + lane.gmem_offset(row_stride)). Rows >= valid_rows are zero-filled and read nothing;
// their copies still carry an address, `fallback`, which must be a valid one (the tensor's base:
// taken from the kernel parameters, it costs no register). All threads take part; the caller
// commits the group.
template <typename Shape, int kRows, typename Element>
__device__ __forceinline__ void load_tile_async(Element* smem_tile, const TileCopyLane<Shape>& lane,
                                                const Element* src, int64_t row_stride, int valid_rows,
                                                const Element* fallback) {
  constexpr int kRowsPerPass = TileCopyLane<Shape>::kRowsPerPass;
  static_assert(kRows % kRowsPerPass == 0, "whole passes");
  const uint32_t dst0 = smem_u32(smem_tile + Shape::swizzle(lane.row, lane.chunk));
#pragma unroll
  for (int pass = 0; pass < kRows / kRowsPerPass; ++pass) {
    const bool valid = lane.row + pass * kRowsPerPass < valid_rows;
    cp_async_16(dst0 + pass * kRowsPerPass * Shape::kRowBytes,
                valid ? src + pass * kRowsPerPass * row_stride : fallback, valid);
  }
}

// Writes rows [0, valid_rows) of a [kRows, d] tile to global memory, one 16-byte vector per thread
// and pass (8 or 16 consecutive threads cover one row); `chunk_at(row, chunk)` gives the vector.
template <typename Shape, int kRows, typename Element, typename ChunkAt>
__device__ __forceinline__ void store_rows(Element* gmem, int64_t row_stride, int valid_rows, int tid,
                                           ChunkAt chunk_at) {
  constexpr int kRowsPerPass = Shape::kNThreads / Shape::kChunks;
  const int chunk = tid % Shape::kChunks;
  const int row0 = tid / Shape::kChunks;
#pragma unroll
  for (int pass = 0; pass < kRows / kRowsPerPass; ++pass) {
    const int row = row0 + pass * kRowsPerPass;
    if (row < valid_rows) *reinterpret_cast<uint4*>(gmem + row * row_stride + chunk * 8) = chunk_at(row, chunk);
  }
}

// Writes rows [0, valid_rows) of a finished tile staged in shared memory to global memory.
template <typename Shape, int kRows, typename Element>
__device__ __forceinline__ void store_tile(const Element* smem_tile, Element* gmem, int64_t row_stride,
                                           int valid_rows, int tid) {
  store_rows<Shape, kRows>(gmem, row_stride, valid_rows, tid, [smem_tile](int row, int chunk) {
    return *reinterpret_cast<const uint4*>(smem_tile + Shape::swizzle(row, chunk));
  });
}

// Writes zeros to rows [0, valid_rows) of a tile in global memory (the gradients of keys that no
// query sees).
template <typename Shape, int kRows, typename Element>
__device__ __forceinline__ void store_zero_rows(Element* gmem, int64_t row_stride, int valid_rows, int tid) {
  store_rows<Shape, kRows>(gmem, row_stride, valid_rows, tid, [](int, int) { return make_uint4(0, 0, 0, 0); });
}

}  // namespace ism::cuda
