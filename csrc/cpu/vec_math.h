// Vector math written once for every instruction set, on the primitives of its Vec (simd_*.h).
#pragma once

namespace ism::cpu::ISM_ISA_NS {

// 2^x for x <= 0 (or a rounding error above 0): every caller exponentiates a score minus a reference that is at
// least as large (a running max, a log-sum-exp). Relative error at most 2.4e-7; 0 for x < -126.5 and for -inf;
// NaN stays NaN. A libm call per element would cost more than the tile products around it.
// 2^x = 2^n * 2^f with n = round(x), f in [-0.5, 0.5], and 2^f = e^(f ln 2) as its Taylor series to degree 6.
// Below -126.5, n = -127 makes 2^n's exponent field 0, so the product is exactly 0: no compare and select.
inline typename Vec::V exp2v(typename Vec::V x) {
  using V = typename Vec::V;
  const V xc = Vec::max(Vec::set1(-127.f), x);  // operand order keeps NaN: max returns its second operand then
  const V n = Vec::round(xc);
  const V f = Vec::sub(xc, n);
  V p = Vec::set1(1.5403530e-4f);
  p = Vec::fma(p, f, Vec::set1(1.3333558e-3f));
  p = Vec::fma(p, f, Vec::set1(9.6181291e-3f));
  p = Vec::fma(p, f, Vec::set1(5.5504109e-2f));
  p = Vec::fma(p, f, Vec::set1(2.4022651e-1f));
  p = Vec::fma(p, f, Vec::set1(6.9314718e-1f));
  p = Vec::fma(p, f, Vec::set1(1.f));
  return Vec::mul(p, Vec::pow2i(n));
}

}  // namespace ism::cpu::ISM_ISA_NS
