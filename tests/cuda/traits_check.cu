// Compile check of the kernel traits' shared-memory arithmetic (csrc/cuda/*_kernel_traits.h): the
// byte counts that docs/cuda_kernels.md and the tile choice's tests quote, and which kernels fit the
// 99 KiB per block of sm_86, sm_89 and sm_120. CMake's `cuda_compile_check` target compiles it with
// every other .cu file of the project; it is not part of the Python extension.
#include "cuda/bwd_kernel_traits.h"
#include "cuda/fwd_kernel_traits.h"
#include "cuda/static_switch.h"

namespace {

using namespace ism::cuda;

constexpr int kSmem99KiB = 99 * 1024;  // cudaDevAttrMaxSharedMemoryPerBlockOptin of sm_86/89/120

static_assert(kSmem99KiB == 101376);

static_assert(FwdTileShape<64>::kSmemBytes == 49952 && FwdTileShape<128>::kSmemBytes == 82464);
static_assert(BwdDqShape<64>::kSmemBytes == 49696 && BwdDqShape<128>::kSmemBytes == 98848);
static_assert(BwdDkDvShape<64>::kSmemBytes == 134432 && BwdDkDvShape<128>::kSmemBytes == 149280);
static_assert(BwdDkDvSmallShape<64>::kSmemBytes == 83744 && BwdDkDvSmallShape<128>::kSmemBytes == 100112);

// Every kernel fits a 99 KiB GPU but the big dK/dV tiles, which is why the small ones exist.
template <int kHeadDim>
constexpr bool fits_99kib() {
  return FwdTileShape<kHeadDim>::kSmemBytes <= kSmem99KiB && BwdDqShape<kHeadDim>::kSmemBytes <= kSmem99KiB &&
         BwdDkDvSmallShape<kHeadDim>::kSmemBytes <= kSmem99KiB && BwdDkDvShape<kHeadDim>::kSmemBytes > kSmem99KiB;
}
static_assert(fits_99kib<64>() && fits_99kib<128>());

// The small tiles keep what the kernels rely on: 16 keys per warp, whole dQ passes, a dS^T tile that
// fits where it is put, and the register state of the big tiles or less.
template <typename Small, typename Big>
constexpr bool small_keeps_shape() {
  constexpr int kState = 2 * 16 * Small::kHeadDim / 32 + 2 * 16 * Small::kBlockM / 32;
  constexpr int kBigState = 2 * 16 * Big::kHeadDim / 32 + 2 * 16 * Big::kBlockM / 32;
  return Small::kBlockN == 16 * Small::kNWarps && Small::kDqPasses * Small::kDqPassCols == Small::kDqCols &&
         Small::kDqPassCols <= 64 && kState <= kBigState;
}
static_assert(small_keeps_shape<BwdDkDvSmallShape<64>, BwdDkDvShape<64>>());
static_assert(small_keeps_shape<BwdDkDvSmallShape<128>, BwdDkDvShape<128>>());

static_assert(is_kernel_head_dim(64) && is_kernel_head_dim(128) && !is_kernel_head_dim(96));
static_assert(is_kernel_dtype(ism::DType::kFloat16) && !is_kernel_dtype(ism::DType::kFloat32));

}  // namespace
