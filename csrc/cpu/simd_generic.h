// 4-lane float32 vectors in GCC/Clang vector extensions: the baseline of any CPU (SSE2 on x86-64, NEON on
// Arm). Included only by kernels_generic.cpp inside its ISA namespace (see isa_kernels.h for the contract).
#pragma once

namespace ism::cpu::ISM_ISA_NS {

struct Vec {
  static constexpr const char* kName = "generic";
  static constexpr int W = 4;
  static constexpr int kMR = 4;  // 4 x 2 vectors of C in 8 of the 16 baseline registers
  static constexpr int kNV = 2;
  static constexpr int kRegs = 16;  // vector registers (SSE2 and NEON have at least 16)
  static constexpr int kFewRowsMaxNV = 8;  // widest panel of a product with few rows (attend_rows.h)
  typedef float V __attribute__((vector_size(16)));
  typedef int32_t I __attribute__((vector_size(16)));

  static V zero() { return V{0.f, 0.f, 0.f, 0.f}; }
  static V set1(float x) { return V{x, x, x, x}; }
  static V load(const float* p) {
    V v;
    std::memcpy(&v, p, sizeof(V));
    return v;
  }
  static void store(float* p, V v) { std::memcpy(p, &v, sizeof(V)); }
  static V load_part(const float* p, int n) {
    V v = zero();
    for (int i = 0; i < n && i < W; ++i) v[i] = p[i];
    return v;
  }
  static void store_part(float* p, V v, int n) {
    for (int i = 0; i < n && i < W; ++i) p[i] = v[i];
  }
  static V fma(V a, V b, V c) { return a * b + c; }
  static V add(V a, V b) { return a + b; }
  static V sub(V a, V b) { return a - b; }
  static V mul(V a, V b) { return a * b; }
  // The SSE rule, written out: b where either is NaN.
  static V max(V a, V b) { return a > b ? a : b; }
  static V min(V a, V b) { return a < b ? a : b; }
  static V neg_inf_to_zero(V x) { return x == set1(-__builtin_inff()) ? zero() : x; }

  static V keep_visible(V x, const int32_t* limit, int key, V fill) {
    I lim;
    std::memcpy(&lim, limit, sizeof(I));
    return lim > (I{} + key) ? x : fill;
  }

  // Pieces of exp2 (vec_math.h): round to nearest by adding and subtracting 1.5 * 2^23 (no rounding-mode
  // calls), and 2^n for integral n in [-127, 127] (n = -127 gives 0).
  static V round(V x) { return (x + 12582912.f) - 12582912.f; }
  static V pow2i(V n) {
    const I bits = (__builtin_convertvector(n, I) + 127) << 23;
    V r;
    std::memcpy(&r, &bits, sizeof(V));
    return r;
  }

  // Lane i of the result is the sum of a[i]'s lanes.
  static V sum_each(const V (&a)[W]) {
    const auto sum = [&a](int i) { return (a[i][0] + a[i][1]) + (a[i][2] + a[i][3]); };
    return V{sum(0), sum(1), sum(2), sum(3)};
  }

  // In place: a[c] becomes column c of the W x W block whose rows were a[0..W).
  // Whole vectors built from their lanes: element-wise writes into uninitialised vectors made GCC warn.
  static void transpose(V (&a)[W]) {
    V t[W];
    for (int c = 0; c < W; ++c) t[c] = V{a[0][c], a[1][c], a[2][c], a[3][c]};
    for (int c = 0; c < W; ++c) a[c] = t[c];
  }

  template <typename T>
  static V load_cvt(const T* p) {
    return V{static_cast<float>(p[0]), static_cast<float>(p[1]), static_cast<float>(p[2]), static_cast<float>(p[3])};
  }
};

}  // namespace ism::cpu::ISM_ISA_NS
