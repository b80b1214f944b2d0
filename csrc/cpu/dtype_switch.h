// The one switch from the params' DType to the C++ element type of the CPU kernels.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "../ism_params.h"

namespace ism::cpu {

// Calls fn(T{}) with T = float, c10::Half or c10::BFloat16 as `dtype` says.
template <typename Fn>
void with_element_type(DType dtype, Fn&& fn) {
  switch (dtype) {
    case DType::kFloat32: fn(float{}); break;
    case DType::kFloat16: fn(c10::Half{}); break;
    case DType::kBFloat16: fn(c10::BFloat16{}); break;
  }
}

}  // namespace ism::cpu
