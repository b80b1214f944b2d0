// The CPU kernels for any CPU: 4-lane vectors of the baseline instruction set (see isa_kernels.h).
#include "isa_prelude.h"

#define ISM_ISA_NS generic
#define ISM_ISA_SIMD "simd_generic.h"
#include "kernel_bodies.h"
