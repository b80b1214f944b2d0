// The dK/dV tile choice of the CUDA backward (bwd_tiles_choice.h), the launch counter of
// segment_attn_bwd.h, and two small ops that let the tests see both:
//   ism::_cuda_bwd_tiles_choice(int head_dim, int smem_optin_bytes, bool small_tiles, str device) -> str
//       the choice ("big" or "small") for a made-up device, or its RuntimeError;
//   ism::_cuda_bwd_tiles_launches(str tiles) -> int
//       how many dK/dV kernels with the "big" or "small" tiles this process has launched.
#include "bwd_tiles_choice.h"

#include <c10/util/Exception.h>
#include <c10/util/StringUtil.h>
#include <torch/library.h>

#include <atomic>
#include <string>

#include "cuda_op_utils.h"
#include "segment_attn_bwd.h"
#include "static_switch.h"

namespace ism {
namespace {

// How the error messages name the switch.
constexpr const char* kSmallTilesChoice = "ism_ext.config bwd_small_tiles=True (default from ISM_EXT_BWD_SMALL_TILES)";

std::atomic<int64_t> dkdv_launches[2];

const char* tiles_name(cuda::BwdTiles tiles) { return tiles == cuda::BwdTiles::kSmall ? "small" : "big"; }

int64_t dkdv_smem_bytes(int head_dim, cuda::BwdTiles tiles) {
  int64_t bytes = 0;
  cuda::dispatch_head_dim(head_dim, [&](auto d) {
    cuda::dispatch_bwd_tiles(tiles, [&](auto t) {
      bytes = cuda::BwdDkDvShapeOf<decltype(d)::value, decltype(t)::value>::kSmemBytes;
    });
  });
  return bytes;
}

std::string bwd_tiles_choice_op(int64_t head_dim, int64_t smem_optin_bytes, bool small_tiles,
                                c10::string_view device) {
  constexpr const char* op = "ism._cuda_bwd_tiles_choice";
  TORCH_CHECK_VALUE(cuda::is_kernel_head_dim(head_dim), op, ": no CUDA kernel for head_dim ", head_dim);
  const int d = static_cast<int>(head_dim);
  const BwdTilesPlan plan = plan_bwd_tiles(d, smem_optin_bytes, small_tiles);
  if (!plan.fits) raise_bwd_tiles_error(op, plan, d, smem_optin_bytes, std::string(device));
  return tiles_name(plan.tiles);
}

int64_t bwd_tiles_launches_op(c10::string_view tiles) {
  TORCH_CHECK_VALUE(tiles == "big" || tiles == "small", "ism._cuda_bwd_tiles_launches: tiles must be \"big\" or ",
                    "\"small\", got \"", std::string(tiles), "\"");
  return dkdv_launches[tiles == "small" ? 1 : 0].load();
}

}  // namespace

bool bwd_small_tiles_requested() { return kernel_choice().bwd_small_tiles; }

BwdTilesPlan plan_bwd_tiles(int head_dim, int64_t smem_optin_bytes, bool small_tiles_requested) {
  BwdTilesPlan plan{};
  plan.big_bytes = dkdv_smem_bytes(head_dim, cuda::BwdTiles::kBig);
  plan.small_bytes = dkdv_smem_bytes(head_dim, cuda::BwdTiles::kSmall);
  plan.tiles = small_tiles_requested ? cuda::BwdTiles::kSmall : cuda::BwdTiles::kBig;
  plan.fits = (small_tiles_requested ? plan.small_bytes : plan.big_bytes) <= smem_optin_bytes;
  return plan;
}

void raise_bwd_tiles_error(const char* op, const BwdTilesPlan& plan, int head_dim, int64_t smem_optin_bytes,
                           const std::string& device) {
  std::string message;
  if (plan.tiles == cuda::BwdTiles::kSmall) {
    message = c10::str(op, ": ", kSmallTilesChoice, " selects the small-tile backward, whose dK/dV kernel needs ",
                       plan.small_bytes, " bytes of shared memory per block at head_dim ", head_dim, ", but ", device,
                       " allows ", smem_optin_bytes);
  } else if (plan.small_bytes > smem_optin_bytes) {
    message = c10::str(op, ": the backward's dK/dV kernel needs ", plan.big_bytes,
                       " bytes of shared memory per block at head_dim ", head_dim, ", but ", device, " allows ",
                       smem_optin_bytes, ", and even its small tiles need ", plan.small_bytes);
  } else {
    message = c10::str(op, ": the backward's dK/dV kernel needs ", plan.big_bytes,
                       " bytes of shared memory per block at head_dim ", head_dim, ", but ", device, " allows ",
                       smem_optin_bytes, ". Its small tiles need ", plan.small_bytes,
                       " bytes and fit, but have not yet run on a GPU: ", kSmallTilesChoice,
                       " enables the not-yet-GPU-verified small-tile backward");
  }
  C10_THROW_ERROR(Error, message);
}

cuda::BwdTiles choose_bwd_tiles(const char* op, int head_dim, int device) {
  const int64_t limit = smem_optin_bytes(device);
  const BwdTilesPlan plan = plan_bwd_tiles(head_dim, limit, bwd_small_tiles_requested());
  if (!plan.fits) raise_bwd_tiles_error(op, plan, head_dim, limit, device_description(device));
  return plan.tiles;
}

namespace cuda {

void count_bwd_dkdv_launch(BwdTiles tiles) { dkdv_launches[tiles == BwdTiles::kSmall ? 1 : 0].fetch_add(1); }

}  // namespace cuda

TORCH_LIBRARY_FRAGMENT(ism, m) {
  m.def("_cuda_bwd_tiles_choice(int head_dim, int smem_optin_bytes, bool small_tiles, str device) -> str",
        &bwd_tiles_choice_op);
  m.def("_cuda_bwd_tiles_launches(str tiles) -> int", &bwd_tiles_launches_op);
}

}  // namespace ism
