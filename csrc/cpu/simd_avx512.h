// 16-lane float32 vectors on AVX-512 (x86-64-v4). Included by kernels_avx512.cpp and kernels_avx512_bf16.cpp,
// after their target pragma, inside that file's ISA namespace (see isa_kernels.h for the contract every Vec
// meets). The second defines ISM_ISA_NATIVE_BF16 and gets the AVX512_BF16 pair operations as well.
#pragma once

namespace ism::cpu::ISM_ISA_NS {

struct Vec {
#if defined(ISM_ISA_NATIVE_BF16)
  static constexpr const char* kName = "avx512_bf16";
#else
  static constexpr const char* kName = "avx512";
#endif
  static constexpr int W = 16;
  // Register blocking of the micro-kernel: 6 x 4 vectors = 24 of the 32 zmm registers hold C, 4 hold a
  // row of B, 1 the broadcast of A. Four B loads and six broadcasts feed 24 FMAs per k step.
  static constexpr int kMR = 6;
  static constexpr int kNV = 4;
  static constexpr int kRegs = 32;  // vector registers
  static constexpr int kFewRowsMaxNV = 4;  // widest panel of a product with few rows (attend_rows.h)
  using V = __m512;
  using I = __m512i;

  static V zero() { return _mm512_setzero_ps(); }
  static V set1(float x) { return _mm512_set1_ps(x); }
  static V load(const float* p) { return _mm512_loadu_ps(p); }
  static void store(float* p, V v) { _mm512_storeu_ps(p, v); }
  static __mmask16 lanes(int n) { return static_cast<__mmask16>(n >= W ? 0xFFFF : (1u << n) - 1u); }
  static V load_part(const float* p, int n) { return _mm512_maskz_loadu_ps(lanes(n), p); }
  static void store_part(float* p, V v, int n) { _mm512_mask_storeu_ps(p, lanes(n), v); }
  static V fma(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
  static V add(V a, V b) { return _mm512_add_ps(a, b); }
  static V sub(V a, V b) { return _mm512_sub_ps(a, b); }
  static V mul(V a, V b) { return _mm512_mul_ps(a, b); }
  // max(a, b) returns b where either is NaN (the SSE rule): callers put the value whose NaN must survive second.
  static V max(V a, V b) { return _mm512_max_ps(a, b); }
  static V min(V a, V b) { return _mm512_min_ps(a, b); }
  static V neg_inf_to_zero(V x) {
    return _mm512_mask_blend_ps(_mm512_cmp_ps_mask(x, set1(-__builtin_inff()), _CMP_EQ_OQ), x, zero());
  }

  // x where lane i has limit[i] > key, else `fill`: the kv_limit rule for one key row of a transposed tile.
  static V keep_visible(V x, const int32_t* limit, int key, V fill) {
    const __mmask16 vis = _mm512_cmpgt_epi32_mask(_mm512_loadu_si512(limit), _mm512_set1_epi32(key));
    return _mm512_mask_blend_ps(vis, fill, x);
  }

  // Pieces of exp2 (vec_math.h): round to nearest, and 2^n for integral n in [-127, 127] (n = -127 gives 0).
  static V round(V x) { return _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
  static V pow2i(V n) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23));
  }

  // Lane i of the result is the sum of a[i]'s lanes: the W dot products of a block of keys against one query
  // reduced at once (a transpose folded into the additions: 45 instructions for 256 floats). Each step adds
  // two vectors' halves side by side, so the partial sums of a[i] stay in the quarter that ends as lane i.
  static V sum_each(const V (&a)[W]) {
    V half[8], quarter[4];
    for (int i = 0; i < 8; ++i) {  // a[i] and a[i + 4] (i in 0..3, 8..11) as 8 partial sums each
      const int x = i < 4 ? i : i + 4;
      half[i] = add(_mm512_shuffle_f32x4(a[x], a[x + 4], 0x44), _mm512_shuffle_f32x4(a[x], a[x + 4], 0xEE));
    }
    for (int i = 0; i < 4; ++i) {  // quarters: a[i], a[i + 4], a[i + 8], a[i + 12], 4 partial sums each
      quarter[i] = add(_mm512_shuffle_f32x4(half[i], half[i + 4], 0x88),
                       _mm512_shuffle_f32x4(half[i], half[i + 4], 0xDD));
    }
    const V pair01 =
        add(_mm512_shuffle_ps(quarter[0], quarter[1], 0x44), _mm512_shuffle_ps(quarter[0], quarter[1], 0xEE));
    const V pair23 =
        add(_mm512_shuffle_ps(quarter[2], quarter[3], 0x44), _mm512_shuffle_ps(quarter[2], quarter[3], 0xEE));
    return add(_mm512_shuffle_ps(pair01, pair23, 0x88), _mm512_shuffle_ps(pair01, pair23, 0xDD));
  }

  // In place: a[c] becomes column c of the W x W block whose rows were a[0..W) (lane i of a[c] = old a[i][c]).
  // Within 128-bit blocks first (unpack, then 2-lane shuffles: 4 rows x 1 column per block), then the 4 x 4
  // transpose of the blocks themselves: 64 shuffles.
  static void transpose(V (&a)[W]) {
    V t[W], u[W];
    for (int i = 0; i < W; i += 2) {
      t[i] = _mm512_unpacklo_ps(a[i], a[i + 1]);
      t[i + 1] = _mm512_unpackhi_ps(a[i], a[i + 1]);
    }
    for (int g = 0; g < 4; ++g) {  // u[4 g + j]: rows 4g..4g+3, column 4b + j in block b
      const V* x = t + 4 * g;
      u[4 * g + 0] = _mm512_shuffle_ps(x[0], x[2], 0x44);
      u[4 * g + 1] = _mm512_shuffle_ps(x[0], x[2], 0xEE);
      u[4 * g + 2] = _mm512_shuffle_ps(x[1], x[3], 0x44);
      u[4 * g + 3] = _mm512_shuffle_ps(x[1], x[3], 0xEE);
    }
    for (int j = 0; j < 4; ++j) {
      const V y0 = _mm512_shuffle_f32x4(u[j], u[4 + j], 0x44), y1 = _mm512_shuffle_f32x4(u[j], u[4 + j], 0xEE);
      const V y2 = _mm512_shuffle_f32x4(u[8 + j], u[12 + j], 0x44);
      const V y3 = _mm512_shuffle_f32x4(u[8 + j], u[12 + j], 0xEE);
      a[j] = _mm512_shuffle_f32x4(y0, y2, 0x88);
      a[4 + j] = _mm512_shuffle_f32x4(y0, y2, 0xDD);
      a[8 + j] = _mm512_shuffle_f32x4(y1, y3, 0x88);
      a[12 + j] = _mm512_shuffle_f32x4(y1, y3, 0xDD);
    }
  }

  // W elements of a half-precision row as float32.
  static V load_cvt(const c10::BFloat16* p) {
    const I wide = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
    return _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
  }
  static V load_cvt(const c10::Half* p) {
    return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  }

#if defined(ISM_ISA_NATIVE_BF16)
  // bfloat16 pairs (pair_path.h): a 32-bit word holds two bfloat16, the even one in the low half; a vector
  // of words is carried in a V (its bits, never its float value).

  // The word at p in every lane.
  static V broadcast_pair(const void* p) {
    int32_t word;
    std::memcpy(&word, p, sizeof(word));
    return _mm512_castsi512_ps(_mm512_set1_epi32(word));
  }
  // acc[l] += a.lo[l] * b.lo[l] + a.hi[l] * b.hi[l] in float32 (VDPBF16PS: twice the products of an FMA).
  static V dot_pairs(V acc, V a, V b) {
    return _mm512_dpbf16_ps(acc, (__m512bh)_mm512_castps_si512(a), (__m512bh)_mm512_castps_si512(b));
  }
  // Lane l = (lo[l], hi[l]) rounded to bfloat16 (to nearest even; NaN stays NaN).
  static V round_to_pairs(V lo, V hi) {
    const __m512i both = (__m512i)_mm512_cvtne2ps_pbh(hi, lo);  // 16 bf16 of lo, then 16 of hi
    const __m512i interleave = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23,
                                                7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
    return _mm512_castsi512_ps(_mm512_permutexvar_epi16(interleave, both));
  }
  // The lanes of lo, then those of hi, rounded to 2 W bfloat16 in that order (a float32 row as bfloat16 pairs of
  // neighbouring lanes).
  static V round_in_order(V lo, V hi) { return _mm512_castsi512_ps((__m512i)_mm512_cvtne2ps_pbh(hi, lo)); }
  // Lane l = (lo[l], hi[l]) for W bfloat16 of two rows, bits unchanged.
  static V interleave_pairs(const c10::BFloat16* lo, const c10::BFloat16* hi) {
    const I l = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(lo)));
    const I h = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(hi)));
    return _mm512_castsi512_ps(_mm512_or_si512(l, _mm512_slli_epi32(h, 16)));
  }
#endif
};

}  // namespace ism::cpu::ISM_ISA_NS
