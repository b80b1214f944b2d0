// Inline-PTX wrappers for the sm_80+ data path of the attention kernels: 16-byte cp.async copies
// with zero-fill, ldmatrix (plain and transposed), mma.sync m16n8k16 with float accumulators, and
// packing of float pairs into 16-bit pairs.
//
// Fragment layouts (PTX ISA, "Matrix Fragments for mma.m16n8k16"), with g = lane / 4 and
// t = lane % 4; each 32-bit register holds two 16-bit values, the lower column in the low half:
//   A 16x16 (row-major): a0 = (g, 2t..2t+1), a1 = (g+8, 2t..), a2 = (g, 2t+8..), a3 = (g+8, 2t+8..)
//   B 16x8  (col-major): b0 = (k 2t..2t+1, n g), b1 = (k 2t+8..2t+9, n g)
//   C 16x8  (float):     c0, c1 = (g, 2t..2t+1), c2, c3 = (g+8, 2t..2t+1)
// ldmatrix .x4: lanes 8i..8i+7 give the row addresses of 8x8 matrix i, and register i of lane l
// receives row l / 4, columns 2 (l % 4)..+1 of matrix i (.trans: the transposed matrix).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <cstring>

namespace ism::cuda {

__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16-byte global -> shared copy that bypasses L1 (.cg: K/V tiles are read once per block).
// When `valid` is false nothing is read and the 16 bytes are zero-filled (src-size 0), so rows
// past a sequence's end or past the tile's largest kv_limit become zeros: 0 * P stays finite.
__device__ __forceinline__ void cp_async_16(uint32_t smem_addr, const void* gmem, bool valid) {
  const int src_bytes = valid ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr), "l"(gmem), "r"(src_bytes)
               : "memory");
}

// 4-byte global -> shared copy (through L1: .cg takes 16 bytes only), zero-filled when `valid` is
// false; the backward moves the per-row lse, delta and kv_limit of a query tile with it.
__device__ __forceinline__ void cp_async_4(uint32_t smem_addr, const void* gmem, bool valid) {
  const int src_bytes = valid ? 4 : 0;
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(smem_addr), "l"(gmem), "r"(src_bytes)
               : "memory");
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }

// Waits until at most N of this thread's committed groups are still in flight.
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], uint32_t smem_addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr));
}

__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], uint32_t smem_addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr));
}

// This lane's ldmatrix .x4 row address inside a 16-row x 2-chunk block of a swizzled tile (row
// `kRowBytes` bytes, rows 16-aligned, chunk pair 0; other chunk pairs are one XOR away, see
// SwizzledRows::chunk_pair_xor, and other 16-row blocks one added offset). Lanes 8i..8i+7 address
// the rows of matrix i; the two orders of the four 8x8 matrices:
//   rows first  (i = 0..3: rows 0-7 chunk 0, rows 8-15 chunk 0, rows 0-7 chunk 1, rows 8-15 chunk 1):
//               the A operand of a tile stored [m][k] (plain), or the B operand of a tile stored
//               [k][n] (.trans, b0/b1 of n-tile 0 then of n-tile 1);
//   chunks first (i = 0..3: rows 0-7 chunk 0, rows 0-7 chunk 1, rows 8-15 chunk 0, rows 8-15 chunk 1):
//               the B operand of a tile stored [n][k] (plain, b0/b1 of n-tile 0 then of n-tile 1), or
//               the A operand of a tile stored [k][m] (.trans).
// The swizzle term uses r8 alone because every row the lane addresses is r8 plus a multiple of 8.
template <int kRowBytes>
__device__ __forceinline__ uint32_t ldmatrix_lane_rows_first(int lane) {
  const int r8 = lane % 8, bit3 = (lane / 8) % 2, bit4 = lane / 16;
  return (r8 + 8 * bit3) * kRowBytes + ((bit4 ^ r8) << 4);
}

template <int kRowBytes>
__device__ __forceinline__ uint32_t ldmatrix_lane_chunks_first(int lane) {
  const int r8 = lane % 8, bit3 = (lane / 8) % 2, bit4 = lane / 16;
  return (r8 + 8 * bit4) * kRowBytes + ((bit3 ^ r8) << 4);
}

// Two 16-bit values of one register as floats (the low half is the lower column).
template <typename Element>
__device__ __forceinline__ float2 unpack_float2(uint32_t x);

template <>
__device__ __forceinline__ float2 unpack_float2<__nv_bfloat16>(uint32_t x) {
  return make_float2(__uint_as_float(x << 16), __uint_as_float(x & 0xffff0000u));
}

template <>
__device__ __forceinline__ float2 unpack_float2<__half>(uint32_t x) {
  __half2 h;
  memcpy(&h, &x, sizeof(h));
  return __half22float2(h);
}

// c += A * B for one m16n8k16 tile, float accumulation.
template <typename Element>
__device__ __forceinline__ void mma_m16n8k16(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1);

template <>
__device__ __forceinline__ void mma_m16n8k16<__nv_bfloat16>(float (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                                            uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

template <>
__device__ __forceinline__ void mma_m16n8k16<__half>(float (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                                     uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Two floats -> one register of two 16-bit values, round to nearest; `lo` goes to the low half
// (cvt's first source operand fills the upper half).
template <typename Element>
__device__ __forceinline__ uint32_t pack_float2(float lo, float hi);

template <>
__device__ __forceinline__ uint32_t pack_float2<__nv_bfloat16>(float lo, float hi) {
  uint32_t r;
  asm("cvt.rn.bf16x2.f32 %0, %1, %2;\n" : "=r"(r) : "f"(hi), "f"(lo));
  return r;
}

template <>
__device__ __forceinline__ uint32_t pack_float2<__half>(float lo, float hi) {
  uint32_t r;
  asm("cvt.rn.f16x2.f32 %0, %1, %2;\n" : "=r"(r) : "f"(hi), "f"(lo));
  return r;
}

// 2^x with the SFU instruction (what exp2f becomes under --use_fast_math, which the build does not
// pass). ex2.approx(-inf) = +0, which the masked scores rely on; relative error about 2^-22.
__device__ __forceinline__ float fast_exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}

// dst[0] += a, dst[1] += b in global memory, atomically per element (dst 8-byte aligned). Hopper
// has a vector float2 reduction (one instruction for both); older GPUs take two scalar ones.
__device__ __forceinline__ void atomic_add_float2(float* dst, float a, float b) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  atomicAdd(reinterpret_cast<float2*>(dst), make_float2(a, b));
#else
  atomicAdd(dst, a);
  atomicAdd(dst + 1, b);
#endif
}

}  // namespace ism::cuda
