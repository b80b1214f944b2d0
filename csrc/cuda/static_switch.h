// The (dtype, head dim) pairs the CUDA kernels are compiled for, and the static switch that turns a
// call's run-time dtype and head dim into those compile-time template arguments.
//
// This is the one list: the op implementations dispatch through it (ops_cuda.cpp, ops_cuda_bwd.cpp)
// and check_cuda_kernel_support (cuda_op_utils.cpp) accepts and names exactly its entries. Each pair
// needs its explicit specialisations in the .cu files (segment_attn_{fwd,bwd}_<dtype>_hdim<d>.cu);
// a pair listed here without them fails at link time, not at run time.
//
// Plain C++ (no torch, no CUDA header): every host file may include it.
#pragma once

#include <cstddef>
#include <iterator>
#include <type_traits>
#include <utility>

#include "../ism_params.h"

namespace ism::cuda {

inline constexpr DType kKernelDtypes[] = {DType::kFloat16, DType::kBFloat16};
inline constexpr int kKernelHeadDims[] = {64, 128};

constexpr const char* dtype_name(DType dtype) {
  switch (dtype) {
    case DType::kFloat16:
      return "float16";
    case DType::kBFloat16:
      return "bfloat16";
    case DType::kFloat32:
      return "float32";
  }
  return "?";
}

constexpr bool is_kernel_dtype(DType dtype) {
  for (DType d : kKernelDtypes) {
    if (d == dtype) return true;
  }
  return false;
}

constexpr bool is_kernel_head_dim(long long head_dim) {
  for (int d : kKernelHeadDims) {
    if (d == head_dim) return true;
  }
  return false;
}

// What the dispatch hands to the callable: the pair as compile-time constants,
// e.g. run_segment_attn_fwd<Config::kDtype, Config::kHeadDim>(...).
template <DType kDtype_, int kHeadDim_>
struct KernelConfig {
  static constexpr DType kDtype = kDtype_;
  static constexpr int kHeadDim = kHeadDim_;
};

namespace detail {

inline constexpr std::size_t kNumHeadDims = std::size(kKernelHeadDims);

// Pair I of the list is (kKernelDtypes[I / kNumHeadDims], kKernelHeadDims[I % kNumHeadDims]).
template <std::size_t I>
using ConfigAt = KernelConfig<kKernelDtypes[I / kNumHeadDims], kKernelHeadDims[I % kNumHeadDims]>;

template <typename F, std::size_t... I>
bool dispatch_config(DType dtype, int head_dim, F& f, std::index_sequence<I...>) {
  // Left to right, stops at the first match.
  return ((ConfigAt<I>::kDtype == dtype && ConfigAt<I>::kHeadDim == head_dim ? (f(ConfigAt<I>{}), true) : false) ||
          ...);
}

template <typename F, std::size_t... I>
bool dispatch_head_dim(int head_dim, F& f, std::index_sequence<I...>) {
  return ((kKernelHeadDims[I] == head_dim ? (f(std::integral_constant<int, kKernelHeadDims[I]>{}), true) : false) ||
          ...);
}

}  // namespace detail

// Calls f(KernelConfig<dtype, head_dim>{}) for the listed pair equal to (dtype, head_dim) and returns
// true, or returns false without calling f when the pair is not compiled. Every pair's call is
// instantiated, so f must compile for all of them.
template <typename F>
bool dispatch_kernel_config(DType dtype, int head_dim, F&& f) {
  return detail::dispatch_config(dtype, head_dim, f,
                                 std::make_index_sequence<std::size(kKernelDtypes) * detail::kNumHeadDims>{});
}

// The same over the head dims alone, f(std::integral_constant<int, head_dim>{}): for what depends on
// the tile shape only (grid sizes, workspace), which bf16 and fp16 share.
template <typename F>
bool dispatch_head_dim(int head_dim, F&& f) {
  return detail::dispatch_head_dim(head_dim, f, std::make_index_sequence<detail::kNumHeadDims>{});
}

}  // namespace ism::cuda
