// Float32 tile routines of the CPU kernels (see tile_math.h).
//
// Written with GCC/Clang vector extensions instead of intrinsics: a 16-float vector type lowers to
// SSE2, AVX2 or AVX-512 instructions depending on the target. Each routine is compiled once per
// x86-64 level (target_clones for the softmax steps, hand-picked register blocking for the GEMM)
// with a run-time dispatch, so one binary is fast on any machine and still runs on a baseline CPU.
// exp2 is a polynomial because a call to libm's exp per element would cost more than the matrix
// products around it.
#include "tile_math.h"

// The vector helpers below are always inlined into same-target callers, so the ABI note GCC
// gives for 64-byte vector arguments does not apply.
#pragma GCC diagnostic ignored "-Wpsabi"

#include <cmath>
#include <cstring>
#include <limits>

// Run-time dispatch needs GCC >= 11 (x86-64-v3/v4 names) and ifunc support (glibc on Linux).
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 11 && defined(__linux__)
#define ISM_X86_DISPATCH 1
#define ISM_CPU_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define ISM_X86_DISPATCH 0
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

static_assert(kLanes == 16, "kIota and the reductions below are written for 16 lanes");
constexpr vi kIota = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};

// Lane j of the vector starting at column `start` is visible iff start + j < visible.
ISM_INLINE vi visible_lanes(int start, int visible) { return kIota < (vi{} + (visible - start)); }

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

// Horizontal reductions as a tree of half-width vectors (a lane-by-lane loop would be scalarised).
typedef float vf8 __attribute__((vector_size(8 * sizeof(float))));
typedef float vf4 __attribute__((vector_size(4 * sizeof(float))));

template <typename Half, typename Full>
ISM_INLINE void split(const Full& v, Half& lo, Half& hi) {
  std::memcpy(&lo, &v, sizeof(Half));
  std::memcpy(&hi, reinterpret_cast<const char*>(&v) + sizeof(Half), sizeof(Half));
}

ISM_INLINE float hmax(vf v) {
  vf8 a, b;
  split(v, a, b);
  a = a > b ? a : b;
  vf4 c, d;
  split(a, c, d);
  c = c > d ? c : d;
  const float x = c[0] > c[1] ? c[0] : c[1], y = c[2] > c[3] ? c[2] : c[3];
  return x > y ? x : y;
}

ISM_INLINE float hsum(vf v) {
  vf8 a, b;
  split(v, a, b);
  a += b;
  vf4 c, d;
  split(a, c, d);
  c += d;
  return (c[0] + c[1]) + (c[2] + c[3]);
}

// MR rows x (NV * kLanes) columns of C, kept in registers over the whole k loop.
template <int MR, int NV>
ISM_INLINE void micro_tile(int k, const float* a, int64_t a_rs, int64_t a_cs, const float* b, int64_t ldb,
                           float* c, int64_t ldc, bool accumulate) {
  vf acc[MR][NV];
  for (int i = 0; i < MR; ++i)
    for (int v = 0; v < NV; ++v) acc[i][v] = accumulate ? load(c + i * ldc + v * kLanes) : splat(0.f);
  for (int p = 0; p < k; ++p) {
    vf bp[NV];
    for (int v = 0; v < NV; ++v) bp[v] = load(b + p * ldb + v * kLanes);
    const float* ap = a + p * a_cs;
    for (int i = 0; i < MR; ++i) {
      const float ai = ap[i * a_rs];
      for (int v = 0; v < NV; ++v) acc[i][v] += ai * bp[v];
    }
  }
  for (int i = 0; i < MR; ++i)
    for (int v = 0; v < NV; ++v) store(c + i * ldc + v * kLanes, acc[i][v]);
}

// The last `rows` (< MR) rows of a panel: picks the micro tile of exactly that height.
template <int R, int NV>
ISM_INLINE void leftover_rows(int rows, int k, const float* a, int64_t a_rs, int64_t a_cs, const float* b,
                              int64_t ldb, float* c, int64_t ldc, bool accumulate) {
  if constexpr (R > 0) {
    if (rows == R)
      micro_tile<R, NV>(k, a, a_rs, a_cs, b, ldb, c, ldc, accumulate);
    else
      leftover_rows<R - 1, NV>(rows, k, a, a_rs, a_cs, b, ldb, c, ldc, accumulate);
  }
}

// C = A * B: column panels of NV vectors (then single vectors), each swept by MR-row micro tiles.
template <int MR, int NV>
ISM_INLINE void gemm_body(int m, int n, int k, const float* a, int64_t a_rs, int64_t a_cs, const float* b,
                          int64_t ldb, float* c, int64_t ldc, bool accumulate) {
  int j = 0;
  for (; j + NV * kLanes <= n; j += NV * kLanes) {
    int i = 0;
    for (; i + MR <= m; i += MR)
      micro_tile<MR, NV>(k, a + i * a_rs, a_rs, a_cs, b + j, ldb, c + i * ldc + j, ldc, accumulate);
    leftover_rows<MR - 1, NV>(m - i, k, a + i * a_rs, a_rs, a_cs, b + j, ldb, c + i * ldc + j, ldc, accumulate);
  }
  if constexpr (NV > 1) {
    if (j < n) gemm_body<MR, 1>(m, n - j, k, a, a_rs, a_cs, b + j, ldb, c + j, ldc, accumulate);
  }
}

using GemmFn = void (*)(int, int, int, const float*, int64_t, int64_t, const float*, int64_t, float*, int64_t,
                        bool);

// The register blocking depends on the register file, so each level gets its own shape instead of
// one target_clones body: 8 x 32 floats use 16 of AVX-512's 32 registers, 6 x 16 use 12 of AVX2's
// 16, 2 x 16 use 8 of SSE2's 16. Enough independent accumulators hide the FMA latency.
#if ISM_X86_DISPATCH
__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,bmi2"))) void gemm_avx512(
    int m, int n, int k, const float* a, int64_t a_rs, int64_t a_cs, const float* b, int64_t ldb, float* c,
    int64_t ldc, bool accumulate) {
  gemm_body<8, 2>(m, n, k, a, a_rs, a_cs, b, ldb, c, ldc, accumulate);
}

__attribute__((target("avx2,fma,bmi2"))) void gemm_avx2(int m, int n, int k, const float* a, int64_t a_rs,
                                                         int64_t a_cs, const float* b, int64_t ldb, float* c,
                                                         int64_t ldc, bool accumulate) {
  gemm_body<6, 1>(m, n, k, a, a_rs, a_cs, b, ldb, c, ldc, accumulate);
}
#endif

void gemm_baseline(int m, int n, int k, const float* a, int64_t a_rs, int64_t a_cs, const float* b, int64_t ldb,
                   float* c, int64_t ldc, bool accumulate) {
  gemm_body<2, 1>(m, n, k, a, a_rs, a_cs, b, ldb, c, ldc, accumulate);
}

GemmFn pick_gemm() {
#if ISM_X86_DISPATCH
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq"))
    return gemm_avx512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return gemm_avx2;
#endif
  return gemm_baseline;
}

}  // namespace

void gemm_f32(int m, int n, int k, const float* a, int64_t a_rs, int64_t a_cs, const float* b, int64_t ldb,
              float* c, int64_t ldc, bool accumulate) {
  static const GemmFn fn = pick_gemm();
  fn(m, n, k, a, a_rs, a_cs, b, ldb, c, ldc, accumulate);
}

ISM_CPU_CLONES
void softmax_tile_update(float* s, int m, int n_pad, const int* visible, float* row_max, float* row_sum,
                         float* acc, int64_t ld_acc, int d_pad) {
  for (int r = 0; r < m; ++r) {
    float* sr = s + static_cast<int64_t>(r) * n_pad;
    const int vis = visible[r];
    // Masked lanes only occur in the vector holding column `vis` and the ones after it.
    const int full_end = vis / kLanes * kLanes;
    vf vmax = splat(kNegInf);
    for (int j = 0; j < full_end; j += kLanes) {
      const vf x = load(sr + j);
      vmax = x > vmax ? x : vmax;
    }
    for (int j = full_end; j < n_pad; j += kLanes) {
      const vf x = visible_lanes(j, vis) ? load(sr + j) : splat(kNegInf);
      vmax = x > vmax ? x : vmax;
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
    for (int j = 0; j < full_end; j += kLanes) {
      const vf p = exp2v(load(sr + j) - vnew);
      store(sr + j, p);
      vsum += p;
    }
    for (int j = full_end; j < n_pad; j += kLanes) {
      const vf p = visible_lanes(j, vis) ? exp2v(load(sr + j) - vnew) : splat(0.f);
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
    // A row with nothing visible has lse = -inf; its probabilities are all masked to 0 below, and
    // the offset is replaced so that no inf - inf is ever formed.
    const vf off = splat(visible[r] > 0 ? lse2[r] : 0.f);
    for (int j = 0; j < n_pad; j += kLanes) {
      const vf e = exp2v(load(sr + j) - off);
      store(sr + j, visible_lanes(j, visible[r]) ? e : splat(0.f));
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
