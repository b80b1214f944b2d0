// Constants of the softmax, written once for host and device code. The kernels work in base 2:
// scores times softmax_scale * log2(e) go through exp2, and the log-sum-exp is turned back into a
// natural logarithm with ln(2). Plain constexpr floats: usable in C++ and in CUDA device code alike.
#pragma once

namespace ism {

inline constexpr float kLog2e = 1.4426950408889634f;  // log2(e)
inline constexpr float kLn2 = 0.6931471805599453f;    // ln(2) = 1 / log2(e)

}  // namespace ism
