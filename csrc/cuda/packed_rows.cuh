// Where one sequence of a packed (varlen) batch lies, from cu_seqlens, as every kernel reads it.
#pragma once

namespace ism::cuda {

__device__ __forceinline__ int clamp_int(int x, int lo, int hi) { return min(max(x, lo), hi); }

// Rows [begin, begin + len) of sequence `seq` among `total` packed rows. cu_seqlens is not checked
// on the host (that would sync): its values are clamped into [0, total] and made non-decreasing
// here, so bad values give wrong numbers but never an access outside the tensors.
struct SeqRows {
  int begin, len;
};

__device__ __forceinline__ SeqRows sequence_rows(const int* cu_seqlens, int seq, int total) {
  const int begin = clamp_int(cu_seqlens[seq], 0, total);
  return {begin, clamp_int(cu_seqlens[seq + 1], begin, total) - begin};
}

}  // namespace ism::cuda
