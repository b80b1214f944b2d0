// Float32 tile routines of the CPU kernels (see tile_math.h).
//
// Written with GCC/Clang vector extensions instead of intrinsics: a 16-float vector type lowers to
// SSE2, AVX2 or AVX-512 instructions depending on the target, and `target_clones` compiles every
// routine once per x86-64 level with a run-time dispatch, so one binary is fast on any machine and
// still runs on a baseline x86-64 CPU. exp2 is a polynomial because a call to libm's exp per
// element would cost more than the matrix products around it.
#include "tile_math.h"

#include <cmath>
#include <cstring>
#include <limits>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__)) && defined(__linux__)
#define ISM_CPU_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define ISM_CPU_CLONES
#endif

namespace ism::cpu {
namespace {

typedef float vf __attribute__((vector_size(kLanes * sizeof(float))));
typedef int32_t vi __attribute__((vector_size(kLanes * sizeof(int32_t))));

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// always_inline: the helpers must be compiled inside each clone, with that clone's instructions.
#define ISM_INLINE inline __attribute__((always_inline))

ISM_INLINE vf load(const float* p) {
  vf v;
  std::memcpy(&v, p, sizeof(vf));
  return v;
}

ISM_INLINE void store(float* p, vf v) { std::memcpy(p, &v, sizeof(vf)); }

ISM_INLINE vf splat(float x) { return vf{} + x; }

ISM_INLINE vi lane_index(int start) {
  vi v;
  for (int i = 0; i < kLanes; ++i) v[i] = start + i;
  return v;
}

// 2^x for x <= 128; returns 0 below -126 (and for -inf). Max relative error about 2e-7.
ISM_INLINE vf exp2v(vf x) {
  const vf xc = x < splat(-126.f) ? splat(-126.f) : (x > splat(127.f) ? splat(127.f) : x);
  // Round to nearest with the 1.5 * 2^23 trick (exact for |x| < 2^22, no rounding-mode calls).
  const vf shifter = splat(12582912.f);
  const vf n = (xc + shifter) - shifter;
  const vf f = xc - n;  // in [-0.5, 0.5]
  // Taylor series of 2^f = e^(f ln 2) to degree 7.
  vf p = splat(1.5252734e-5f);
  p = p * f + splat(1.5403530e-4f);
  p = p * f + splat(1.3333558e-3f);
  p = p * f + splat(9.6181291e-3f);
  p = p * f + splat(5.5504109e-2f);
  p = p * f + splat(2.4022651e-1f);
  p = p * f + splat(6.9314718e-1f);
  p = p * f + splat(1.0f);
  const vi bits = (__builtin_convertvector(n, vi) + 127) << 23;
  vf scale;
  std::memcpy(&scale, &bits, sizeof(vf));
  const vf r = p * scale;
  return x < splat(-126.f) ? splat(0.f) : r;
}

ISM_INLINE float hmax(vf v) {
  float r = v[0];
  for (int i = 1; i < kLanes; ++i) r = v[i] > r ? v[i] : r;
  return r;
}

ISM_INLINE float hsum(vf v) {
  float r = 0.f;
  for (int i = 0; i < kLanes; ++i) r += v[i];
  return r;
}

// MR rows x kLanes columns of C, kept in registers over the whole k loop.
template <int MR>
ISM_INLINE void micro_tile(int k, const float* a, int64_t a_rs, int64_t a_cs, const float* b,
                           int64_t ldb, float* c, int64_t ldc, bool accumulate) {
  vf acc[MR];
  for (int i = 0; i < MR; ++i) acc[i] = accumulate ? load(c + i * ldc) : splat(0.f);
  for (int p = 0; p < k; ++p) {
    const vf bp = load(b + p * ldb);
    const float* ap = a + p * a_cs;
    for (int i = 0; i < MR; ++i) acc[i] += ap[i * a_rs] * bp;
  }
  for (int i = 0; i < MR; ++i) store(c + i * ldc, acc[i]);
}

}  // namespace

ISM_CPU_CLONES
void gemm_f32(int m, int n, int k, const float* a, int64_t a_rs, int64_t a_cs, const float* b,
              int64_t ldb, float* c, int64_t ldc, bool accumulate) {
  constexpr int MR = 6;  // 6 x 16 accumulators fill 12 of AVX2's 16 vector registers
  for (int j = 0; j < n; j += kLanes) {
    int i = 0;
    for (; i + MR <= m; i += MR)
      micro_tile<MR>(k, a + i * a_rs, a_rs, a_cs, b + j, ldb, c + i * ldc + j, ldc, accumulate);
    const float* ai = a + i * a_rs;
    float* ci = c + i * ldc + j;
    switch (m - i) {
      case 5: micro_tile<5>(k, ai, a_rs, a_cs, b + j, ldb, ci, ldc, accumulate); break;
      case 4: micro_tile<4>(k, ai, a_rs, a_cs, b + j, ldb, ci, ldc, accumulate); break;
      case 3: micro_tile<3>(k, ai, a_rs, a_cs, b + j, ldb, ci, ldc, accumulate); break;
      case 2: micro_tile<2>(k, ai, a_rs, a_cs, b + j, ldb, ci, ldc, accumulate); break;
      case 1: micro_tile<1>(k, ai, a_rs, a_cs, b + j, ldb, ci, ldc, accumulate); break;
      default: break;
    }
  }
}

ISM_CPU_CLONES
void softmax_tile_update(float* s, int m, int n_pad, const int* visible, float* row_max,
                         float* row_sum, float* acc, int64_t ld_acc, int d_pad) {
  for (int r = 0; r < m; ++r) {
    float* sr = s + static_cast<int64_t>(r) * n_pad;
    const vi vis = vi{} + visible[r];
    vf vmax = splat(kNegInf);
    for (int j = 0; j < n_pad; j += kLanes) {
      const vf x = load(sr + j);
      const vf xm = lane_index(j) < vis ? x : splat(kNegInf);
      vmax = xm > vmax ? xm : vmax;
    }
    const float old_max = row_max[r];
    const float tile_max = hmax(vmax);
    const float new_max = tile_max > old_max ? tile_max : old_max;
    if (new_max == kNegInf) {  // nothing visible so far: keep zeros, avoid (-inf) - (-inf)
      for (int j = 0; j < n_pad; j += kLanes) store(sr + j, splat(0.f));
      continue;
    }
    const vf vnew = splat(new_max);
    vf vsum = splat(0.f);
    for (int j = 0; j < n_pad; j += kLanes) {
      const vf e = exp2v(load(sr + j) - vnew);
      const vf p = lane_index(j) < vis ? e : splat(0.f);
      store(sr + j, p);
      vsum += p;
    }
    const float alpha = old_max == kNegInf ? 0.f : std::exp2(old_max - new_max);
    if (alpha != 1.f) {
      float* ar = acc + r * ld_acc;
      const vf va = splat(alpha);
      for (int d = 0; d < d_pad; d += kLanes) store(ar + d, load(ar + d) * va);
    }
    row_sum[r] = row_sum[r] * alpha + hsum(vsum);
    row_max[r] = new_max;
  }
}

ISM_CPU_CLONES
void probs_from_lse(float* s, int m, int n_pad, const int* visible, const float* lse2) {
  for (int r = 0; r < m; ++r) {
    float* sr = s + static_cast<int64_t>(r) * n_pad;
    const vi vis = vi{} + visible[r];
    // A row with nothing visible has lse = -inf; its probabilities are all masked to 0 below, and
    // the offset is replaced so that no inf - inf is ever formed.
    const vf off = splat(visible[r] > 0 ? lse2[r] : 0.f);
    for (int j = 0; j < n_pad; j += kLanes) {
      const vf e = exp2v(load(sr + j) - off);
      store(sr + j, lane_index(j) < vis ? e : splat(0.f));
    }
  }
}

ISM_CPU_CLONES
void score_grad(const float* p, float* dp, int m, int n_pad, const float* delta) {
  for (int r = 0; r < m; ++r) {
    const float* pr = p + static_cast<int64_t>(r) * n_pad;
    float* dr = dp + static_cast<int64_t>(r) * n_pad;
    const vf dl = splat(delta[r]);
    for (int j = 0; j < n_pad; j += kLanes) store(dr + j, load(pr + j) * (load(dr + j) - dl));
  }
}

}  // namespace ism::cpu
