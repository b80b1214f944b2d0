// Kernel traits of the Hopper forward (hopper_fwd_kernel.cuh): the plan's shape (hopper_fwd_plan.h)
// plus the CuTe types built on it: the shared-memory layouts of Q, K and V, the two warpgroup MMAs
// and the TMA copies. CUTLASS/CuTe is used as a library for exactly the pieces that are easy to get
// subtly wrong without a GPU to debug on: the wgmma instruction atoms and their shared-memory matrix
// descriptors (derived from these layouts by make_gmma_desc), and the TMA tensor maps (encoded on
// the host by make_tma_copy from the same layouts). tests/cuda/hopper_gmma_tma_test.cu checks both
// on a GPU with exactly these types.
//
// Only the Hopper translation units include this header (they are compiled for sm_90a, and only
// when the CUTLASS headers are found: setup.py, CMakeLists.txt).
#pragma once

#include <cute/tensor.hpp>
#include <cutlass/numeric_types.h>

#include "../ism_params.h"
#include "hopper_fwd_plan.h"

namespace ism::cuda::hopper {

// The CuTe element type of a kernel dtype (same bits as __nv_bfloat16 / __half).
template <DType kDtype>
struct CuteElement;
template <>
struct CuteElement<DType::kBFloat16> {
  using type = cutlass::bfloat16_t;
};
template <>
struct CuteElement<DType::kFloat16> {
  using type = cutlass::half_t;
};

template <int kHeadDim_, typename Element_>
struct HopperFwdTraits : HopperFwdShape<kHeadDim_> {
  using Shape = HopperFwdShape<kHeadDim_>;
  using Element = Element_;
  using Shape::kBlockM;
  using Shape::kBlockN;
  using Shape::kHeadDim;
  using Shape::kStages;
  using Shape::kConsumerWarpGroups;

  using BlockM = cute::Int<kBlockM>;
  using BlockN = cute::Int<kBlockN>;
  using HeadDim = cute::Int<kHeadDim>;
  using Stages = cute::Int<kStages>;

  // Every tile is rows of d elements, K-major (d contiguous), in 128-byte swizzle atoms of 8 rows x
  // 64 elements: what TMA writes with CU_TENSOR_MAP_SWIZZLE_128B and what wgmma reads
  // conflict-free. d = 128 is two atom columns (two TMA boxes per tile, CuTe issues both).
  using SmemAtom = cute::SM90::GMMA::Layout_K_SW128_Atom<Element>;
  using SmemLayoutQ = decltype(cute::tile_to_shape(SmemAtom{}, cute::make_shape(BlockM{}, HeadDim{})));
  using SmemLayoutKVStage = decltype(cute::tile_to_shape(SmemAtom{}, cute::make_shape(BlockN{}, HeadDim{})));
  // The stages are the outermost mode: stage s is SmemLayoutKVStage at element offset s * kBlockN * d.
  using SmemLayoutK = decltype(cute::tile_to_shape(SmemAtom{}, cute::make_shape(BlockN{}, HeadDim{}, Stages{})));
  using SmemLayoutV = SmemLayoutK;
  // V read as the B operand of O = P V, B(n = d, k = key): the same bytes indexed (d, key, stage).
  // Its d is the contiguous direction, so for wgmma it is an MN-major operand (the transposed-B
  // mode of 16-bit wgmma), and the 128-byte atoms of SmemLayoutV are exactly the MN-major SW128
  // canonical layout (64 d contiguous x 8 keys).
  using SmemLayoutVt = decltype(cute::composition(
      SmemLayoutV{},
      cute::make_ordered_layout(cute::make_shape(HeadDim{}, BlockN{}, Stages{}), cute::Step<cute::_2, cute::_1, cute::_3>{})));

  // S = Q K^T: A = Q and B = K from shared memory (SS), fp32 accumulators, one m64 x kBlockN atom per
  // consumer warpgroup (AtomLayout 2 x 1 x 1: warpgroup w owns rows 64 w .. 64 w + 63).
  using AtomLayout = cute::Layout<cute::Shape<cute::Int<kConsumerWarpGroups>, cute::_1, cute::_1>>;
  using TiledMmaQK = decltype(cute::make_tiled_mma(
      cute::SM90::GMMA::ss_op_selector<Element, Element, float, cute::Shape<cute::_64, BlockN, HeadDim>>(),
      AtomLayout{}));
  // O += P V: A = P from registers (RS: the probabilities never go through shared memory), B = V
  // MN-major from shared memory.
  using TiledMmaPV = decltype(cute::make_tiled_mma(
      cute::SM90::GMMA::rs_op_selector<Element, Element, float, cute::Shape<cute::_64, HeadDim, BlockN>,
                                       cute::SM90::GMMA::Major::K, cute::SM90::GMMA::Major::MN>(),
      AtomLayout{}));

  // Global tensors as the TMA sees them: (rows, d, heads) with the row and head strides of the
  // packed [total, heads, d] tensor (the kernel offsets the rows of a sequence with domain_offset, so
  // one tensor map serves every sequence of a varlen batch; rows past the tensor's end read as zeros).
  using GmemStride = cute::Stride<int64_t, cute::_1, int64_t>;
  static auto make_gmem_tensor(const Element* ptr, int rows, int heads, int64_t row_stride, int64_t head_stride) {
    return cute::make_tensor(cute::make_gmem_ptr(ptr),
                             cute::make_layout(cute::make_shape(rows, HeadDim{}, heads),
                                               GmemStride{row_stride, cute::_1{}, head_stride}));
  }
  using GmemTensor = decltype(make_gmem_tensor(nullptr, 1, 1, 0, 0));

  static auto make_tma_q(const GmemTensor& q) {
    return cute::make_tma_copy(cute::SM90_TMA_LOAD{}, q, SmemLayoutQ{}, cute::make_shape(BlockM{}, HeadDim{}),
                               cute::_1{});
  }
  static auto make_tma_kv(const GmemTensor& kv) {
    return cute::make_tma_copy(cute::SM90_TMA_LOAD{}, kv, SmemLayoutKVStage{},
                               cute::make_shape(BlockN{}, HeadDim{}), cute::_1{});
  }
  using TmaQ = decltype(make_tma_q(std::declval<GmemTensor>()));
  using TmaKV = decltype(make_tma_kv(std::declval<GmemTensor>()));

  static_assert(cute::cosize_v<SmemLayoutQ> * 2 == Shape::kQBytes, "Q tile bytes");
  static_assert(cute::cosize_v<SmemLayoutK> * 2 == Shape::kStages * Shape::kKVBytes, "K stage bytes");
  static_assert(sizeof(Element) == Shape::kElemBytes, "16-bit elements");
};

// What the kernel takes by value (a __grid_constant__ parameter, so the TMA descriptors stay in the
// parameter space the TMA unit reads them from): the op's params and the three tensor maps.
template <typename Kt>
struct HopperFwdKernelParams {
  SegmentAttnFwdParams p;
  typename Kt::TmaQ tma_q;
  typename Kt::TmaKV tma_k;
  typename Kt::TmaKV tma_v;
};

}  // namespace ism::cuda::hopper
