// 8-lane float32 vectors on AVX2 + FMA + F16C (x86-64-v3). Included only by kernels_avx2.cpp, after its
// target pragma, inside that file's ISA namespace (see isa_kernels.h for the contract every Vec meets).
#pragma once

namespace ism::cpu::ISM_ISA_NS {

struct Vec {
  static constexpr const char* kName = "avx2";
  static constexpr int W = 8;
  // Register blocking of the micro-kernel: 6 x 2 vectors = 12 of the 16 ymm registers hold C, 2 hold a row
  // of B, 1 the broadcast of A (the classic 6 x 16 AVX2 SGEMM kernel).
  static constexpr int kMR = 6;
  static constexpr int kNV = 2;
  static constexpr int kRegs = 16;  // vector registers
  static constexpr int kFewRowsMaxNV = 8;  // widest panel of a product with few rows (attend_rows.h)
  using V = __m256;
  using I = __m256i;

  static V zero() { return _mm256_setzero_ps(); }
  static V set1(float x) { return _mm256_set1_ps(x); }
  static V load(const float* p) { return _mm256_loadu_ps(p); }
  static void store(float* p, V v) { _mm256_storeu_ps(p, v); }
  static I lanes(int n) { return _mm256_cmpgt_epi32(_mm256_set1_epi32(n), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7)); }
  static V load_part(const float* p, int n) { return _mm256_maskload_ps(p, lanes(n)); }
  static void store_part(float* p, V v, int n) { _mm256_maskstore_ps(p, lanes(n), v); }
  static V fma(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
  static V add(V a, V b) { return _mm256_add_ps(a, b); }
  static V sub(V a, V b) { return _mm256_sub_ps(a, b); }
  static V mul(V a, V b) { return _mm256_mul_ps(a, b); }
  // max(a, b) returns b where either is NaN: callers put the value whose NaN must survive second.
  static V max(V a, V b) { return _mm256_max_ps(a, b); }
  static V min(V a, V b) { return _mm256_min_ps(a, b); }
  static V neg_inf_to_zero(V x) {
    return _mm256_blendv_ps(x, zero(), _mm256_cmp_ps(x, set1(-__builtin_inff()), _CMP_EQ_OQ));
  }

  // x where lane i has limit[i] > key, else `fill`: the kv_limit rule for one key row of a transposed tile.
  static V keep_visible(V x, const int32_t* limit, int key, V fill) {
    const I vis = _mm256_cmpgt_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(limit)),
                                     _mm256_set1_epi32(key));
    return _mm256_blendv_ps(fill, x, _mm256_castsi256_ps(vis));
  }

  // Pieces of exp2 (vec_math.h): round to nearest, and 2^n for integral n in [-127, 127] (n = -127 gives 0).
  static V round(V x) { return _mm256_round_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
  static V pow2i(V n) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23));
  }

  // Lane i of the result is the sum of a[i]'s lanes: the W dot products of a block of keys against one query
  // reduced at once (horizontal adds, then the two 128-bit halves added across).
  static V sum_each(const V (&a)[W]) {
    const V s0123 = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));
    const V s4567 = _mm256_hadd_ps(_mm256_hadd_ps(a[4], a[5]), _mm256_hadd_ps(a[6], a[7]));
    return add(_mm256_permute2f128_ps(s0123, s4567, 0x20), _mm256_permute2f128_ps(s0123, s4567, 0x31));
  }

  // In place: a[c] becomes column c of the W x W block whose rows were a[0..W) (lane i of a[c] = old a[i][c]).
  static void transpose(V (&a)[W]) {
    V t[W], u[W];
    for (int i = 0; i < W; i += 2) {
      t[i] = _mm256_unpacklo_ps(a[i], a[i + 1]);
      t[i + 1] = _mm256_unpackhi_ps(a[i], a[i + 1]);
    }
    for (int g = 0; g < 2; ++g) {  // u[4 g + j]: rows 4g..4g+3 of columns j (low half) and j + 4 (high half)
      const V* x = t + 4 * g;
      u[4 * g + 0] = _mm256_shuffle_ps(x[0], x[2], 0x44);
      u[4 * g + 1] = _mm256_shuffle_ps(x[0], x[2], 0xEE);
      u[4 * g + 2] = _mm256_shuffle_ps(x[1], x[3], 0x44);
      u[4 * g + 3] = _mm256_shuffle_ps(x[1], x[3], 0xEE);
    }
    for (int j = 0; j < 4; ++j) {
      a[j] = _mm256_permute2f128_ps(u[j], u[4 + j], 0x20);
      a[4 + j] = _mm256_permute2f128_ps(u[j], u[4 + j], 0x31);
    }
  }

  // W elements of a half-precision row as float32.
  static V load_cvt(const c10::BFloat16* p) {
    const I wide = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    return _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16));
  }
  static V load_cvt(const c10::Half* p) {
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  }
};

}  // namespace ism::cpu::ISM_ISA_NS
