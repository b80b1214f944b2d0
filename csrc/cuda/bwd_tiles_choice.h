// Which dK/dV tiles (bwd_kernel_traits.h) a backward call runs on its device.
//
// The big tiles need 134432 (d = 64) and 149280 (d = 128) bytes of shared memory per block, more
// than the 99 KiB that sm_86, sm_89 and sm_120 GPUs allow; the small tiles fit there but have not
// yet run on a GPU. So the small tiles are opt-in: ism_ext.config's bwd_small_tiles (default from
// ISM_EXT_BWD_SMALL_TILES; kernel_choice(), cuda_op_utils.h) selects them on any GPU; without it a device whose
// opt-in limit is below the big tiles' need gets an error that says so. The choice itself is plain
// data (plan_bwd_tiles), so a test can run it for any limit.
#pragma once

#include <cstdint>
#include <string>

#include "bwd_kernel_traits.h"

namespace ism {

struct BwdTilesPlan {
  cuda::BwdTiles tiles;  // the tiles to run
  bool fits;             // false: the tiles allowed do not fit the device; raise_bwd_tiles_error says why
  int64_t big_bytes;     // shared memory per block of the big and the small dK/dV kernel
  int64_t small_bytes;
};

// True when the kernel configuration asks for the small tiles (kernel_choice()).
bool bwd_small_tiles_requested();

// The small tiles when requested, else the big ones; `fits` tells whether they fit in
// `smem_optin_bytes` (the device's cudaDevAttrMaxSharedMemoryPerBlockOptin). head_dim must be one of
// static_switch.h.
BwdTilesPlan plan_bwd_tiles(int head_dim, int64_t smem_optin_bytes, bool small_tiles_requested);

// The RuntimeError of a plan that does not fit: names the device, the bytes the tiles need, the
// device's limit and, when the big tiles were refused, the small tiles' bytes and the switch.
[[noreturn]] void raise_bwd_tiles_error(const char* op, const BwdTilesPlan& plan, int head_dim,
                                        int64_t smem_optin_bytes, const std::string& device);

// plan_bwd_tiles for `device` and the environment, raising when the plan does not fit.
cuda::BwdTiles choose_bwd_tiles(const char* op, int head_dim, int device);

}  // namespace ism
