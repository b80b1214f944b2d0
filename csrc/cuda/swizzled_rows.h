// The shared-memory layout of every 16-bit row tile of the CUDA kernels (Q, K, V, dO, dS, staged
// outputs): rows of kCols elements, XOR-swizzled in 16-byte chunks.
//
// Plain C++ (no CUDA types), so that the kernel traits that build on it stay host-includable.
#pragma once

#include "../tile_range.h"  // ISM_HOST_DEVICE

namespace ism::cuda {

// Alignment of every kernel's shared-memory tiles, in bytes. The ldmatrix addresses step through the
// d chunks of a row by XOR-ing the absolute shared address (chunk_pair_xor below), which needs each
// tile to start on a 256-byte boundary. The runtime promises less for dynamic shared memory, so every
// kernel rounds its base up (smem_base.cuh) and every traits set asks for kSmemAlign bytes of slack.
inline constexpr int kSmemAlign = 256;

// A row-major tile of 16-bit elements whose rows are kCols elements (kChunks = kCols / 8 chunks of
// 16 bytes). kNThreads is the number of threads that copy such a tile together (tile_io.cuh).
template <int kCols_, int kNThreads_>
struct SwizzledRows {
  static constexpr int kCols = kCols_;
  static constexpr int kNThreads = kNThreads_;
  static constexpr int kChunks = kCols / 8;
  static constexpr int kRowBytes = kCols * 2;

  // XOR swizzle: element offset of chunk `chunk` of row `row`. The 8 rows an ldmatrix phase reads
  // (8 consecutive rows, same logical chunk) land on 8 different 16-byte bank groups, because the
  // physical chunk's low 3 bits are chunk ^ (row & 7) and a row is a multiple of 128 bytes. Writes
  // (cp.async, one row's chunks per 8 or 16 threads) stay conflict-free as a permutation of a row.
  ISM_HOST_DEVICE static constexpr int swizzle(int row, int chunk) { return row * kCols + ((chunk ^ (row & 7)) << 3); }

  // The XOR that moves an ldmatrix row address from 16-byte chunk pair 0 to chunk pair `pair`
  // (chunks 2 pair, 2 pair + 1) when the address was formed for pair 0: chunk c ^ (row & 7) with
  // c = 2 pair + b (b in {0, 1}) equals (b ^ (row & 7)) ^ (2 pair), and the chunk sits in address
  // bits 4 and up of a tile aligned to kSmemAlign (256) bytes.
  ISM_HOST_DEVICE static constexpr int chunk_pair_xor(int pair) { return pair << 5; }

  static_assert(kCols % 64 == 0, "the swizzle needs at least 8 chunks (128 bytes) per row");
  static_assert(kNThreads % kChunks == 0, "tile copies cover whole rows per pass");
};

}  // namespace ism::cuda
