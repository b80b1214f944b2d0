// Constants of the KV-cache op that Python must agree with. The Python package reads them from the
// compiled module (`ism_ext._C.PAGE_SIZE_MULTIPLE`), so each rule is written once, here.
#pragma once

namespace ism {

// A paged cache's page size (k_cache.size(1)) must be a multiple of this: one 16-row tile of the
// kernels never straddles two pages.
inline constexpr int kPageSizeMultiple = 16;

}  // namespace ism
