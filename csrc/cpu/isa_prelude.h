// Everything an instruction-set build of the kernels includes, included before its target pragma (see
// isa_kernels.h): nothing compiled from these headers may carry the wider instructions.
#pragma once

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#endif

#include "../ism_params.h"
#include "../tile_range.h"
#include "dtype_switch.h"
#include "isa_kernels.h"
#include "query_tiles.h"
#include "row_access.h"
#include "scratch_buffer.h"
#include "segment_attn_cpu.h"
#include "work_queue.h"
