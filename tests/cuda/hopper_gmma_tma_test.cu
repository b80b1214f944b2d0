// Minimal tests of the Hopper forward kernel's building blocks, with exactly the kernel's types
// (csrc/cuda/hopper_fwd_traits.cuh) and helpers (hopper_fwd_kernel.cuh), each in isolation:
//
//   host   the fragment layouts the kernel's code assumes (runs anywhere, no GPU needed):
//          accumulator element e of a consumer thread is row r0 + 8 ((e / 2) % 2), column
//          c0 + 8 (e / 4) + e % 2 (the softmax's quad reductions and row halves), for S and for O;
//          and element i of the register A operand of O += P V is the same (row, column) of the tile
//          as element i of S (scores_to_operand converts elementwise in order).
//   tma    a TMA load of a Q tile and of a K tile into stage 1, at unaligned packed rows of a
//          [rows, heads, d] tensor (varlen offsets), the tile running past the tensor's end:
//          checks the tensor maps, the transaction byte counts (a wrong count never completes the
//          barrier: the wait gives up after a bound and the test fails), and that the 128-byte
//          swizzle TMA writes is the one CuTe's layouts read back.
//   gmma   S = Q K^T on wgmma from shared memory (SS, K-major Q and K, K in stage 1) and
//          O = P V with P converted from S in registers (RS) and V an MN-major operand in stage 1,
//          against host products: checks the shared-memory matrix descriptors and the fragments.
//
//   nvcc -std=c++17 -O2 --expt-relaxed-constexpr -gencode arch=compute_90a,code=sm_90a \
//        -Icsrc -I"$CUTLASS_INCLUDE_DIR" tests/cuda/hopper_gmma_tma_test.cu -o hopper_gmma_tma_test
//   ./hopper_gmma_tma_test          # exit 0 when every test that could run passed
//
// Without a compute capability 9.0 device only the host checks run. CMake's cuda_compile_check
// compiles this file with the Hopper kernel's (when CUTLASS is found).
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "cuda/hopper_fwd_kernel.cuh"
#include "cuda/hopper_fwd_traits.cuh"

// A named namespace: nvcc's host stubs for kernels in an anonymous one clash with CuTe's own.
namespace hopper_test {

using namespace cute;
using ism::cuda::hopper::HopperFwdTraits;

using Element = cutlass::bfloat16_t;

int g_failures = 0;

void report(const char* test, int head_dim, bool ok, const char* detail) {
  std::printf("%-5s d=%-3d %s%s%s\n", test, head_dim, ok ? "PASS" : "FAIL", detail[0] ? ": " : "", detail);
  if (!ok) ++g_failures;
}

#define CHECK_CUDA(x)                                                                          \
  do {                                                                                         \
    cudaError_t err_ = (x);                                                                    \
    if (err_ != cudaSuccess) {                                                                 \
      std::printf("CUDA error %s at %s:%d\n", cudaGetErrorString(err_), __FILE__, __LINE__); \
      std::exit(2);                                                                            \
    }                                                                                          \
  } while (0)

uint16_t bf16_bits(float x) {  // round to nearest even, as cvt.rn.bf16 (finite inputs)
  uint32_t u;
  std::memcpy(&u, &x, 4);
  return static_cast<uint16_t>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}
float bf16_value(uint16_t b) {
  const uint32_t u = static_cast<uint32_t>(b) << 16;
  float x;
  std::memcpy(&x, &u, 4);
  return x;
}

// ---- host: fragment layouts.
template <int kHeadDim>
void host_layout_checks() {
  using Kt = HopperFwdTraits<kHeadDim, Element>;
  using M = typename Kt::BlockM;
  using N = typename Kt::BlockN;
  using D = typename Kt::HeadDim;
  typename Kt::TiledMmaQK mma_qk;
  typename Kt::TiledMmaPV mma_pv;
  int bad = 0;
  for (int t = 0; t < Kt::kConsumerThreads; ++t) {
    const int r0 = 64 * (t / 128) + 16 * ((t % 128) / 32) + (t % 32) / 4, c0 = 2 * (t % 4);
    Tensor s = mma_qk.get_thread_slice(t).partition_C(make_identity_tensor(make_shape(M{}, N{})));
    Tensor o = mma_pv.get_thread_slice(t).partition_C(make_identity_tensor(make_shape(M{}, D{})));
    Tensor a = mma_pv.get_thread_slice(t).partition_A(make_identity_tensor(make_shape(M{}, N{})));
    if (size(s) != Kt::kBlockN / 2 || size(o) != kHeadDim / 2 || size(a) != size(s)) ++bad;
    for (int e = 0; e < size(s); ++e) {
      if (get<0>(s(e)) != r0 + 8 * ((e / 2) % 2) || get<1>(s(e)) != c0 + 8 * (e / 4) + e % 2) ++bad;
      if (get<0>(a(e)) != get<0>(s(e)) || get<1>(a(e)) != get<1>(s(e))) ++bad;
    }
    for (int e = 0; e < size(o); ++e) {
      if (get<0>(o(e)) != r0 + 8 * ((e / 2) % 2) || get<1>(o(e)) != c0 + 8 * (e / 4) + e % 2) ++bad;
    }
  }
  char detail[96];
  std::snprintf(detail, sizeof(detail), "%d mismatches over %d threads", bad, Kt::kConsumerThreads);
  report("host", kHeadDim, bad == 0, detail);
}

// ---- tma.
// Waits for phase `parity` of an mbarrier for at most ~2^26 polls; false when it never completed.
__device__ bool bounded_wait(uint64_t* bar, uint32_t parity) {
  for (int i = 0; i < (1 << 26); ++i) {
    if (cutlass::arch::ClusterBarrier::try_wait(bar, parity)) return true;
  }
  return false;
}

template <typename Kt>
struct TmaTestParams {
  typename Kt::TmaQ tma_q;
  typename Kt::TmaKV tma_k;
  int total_q, h_q, q_row0, q_head;
  int total_k, h_kv, k_begin, kv_head, key_tile;
  Element* q_out;  // [kBlockM, d]: the Q tile as read back through SmemLayoutQ
  Element* k_out;  // [kBlockN, d]: stage 1 of K through SmemLayoutK
  int* ok;
};

template <typename Kt>
__global__ void __launch_bounds__(128) tma_test_kernel(const __grid_constant__ TmaTestParams<Kt> tp) {
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using TxBarrier = cutlass::arch::ClusterTransactionBarrier;
  extern __shared__ __align__(1024) unsigned char smem_raw[];
  unsigned char* smem = smem_raw + (1024 - ism::cuda::smem_u32(smem_raw) % 1024) % 1024;
  Element* q_smem = reinterpret_cast<Element*>(smem);
  Element* k_smem = reinterpret_cast<Element*>(smem + Kt::kQBytes);
  uint64_t* bars = reinterpret_cast<uint64_t*>(smem + Kt::kQBytes + Kt::kStages * Kt::kKVBytes);
  Tensor sQ = make_tensor(make_smem_ptr(q_smem), typename Kt::SmemLayoutQ{});
  Tensor sK = make_tensor(make_smem_ptr(k_smem), typename Kt::SmemLayoutK{});
  if (threadIdx.x == 0) {
    cutlass::arch::ClusterBarrier::init(&bars[0], 1);
    cutlass::arch::ClusterBarrier::init(&bars[1], 1);
    cutlass::arch::fence_barrier_init();
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    Tensor mQ = tp.tma_q.get_tma_tensor(make_shape(tp.total_q, typename Kt::HeadDim{}, tp.h_q));
    Tensor mK = tp.tma_k.get_tma_tensor(make_shape(tp.total_k, typename Kt::HeadDim{}, tp.h_kv));
    Tensor gQ = local_tile(domain_offset(make_coord(tp.q_row0, _0{}), mQ(_, _, tp.q_head)),
                           make_shape(typename Kt::BlockM{}, typename Kt::HeadDim{}), make_coord(_0{}, _0{}));
    Tensor gK = local_tile(domain_offset(make_coord(tp.k_begin, _0{}), mK(_, _, tp.kv_head)),
                           make_shape(typename Kt::BlockN{}, typename Kt::HeadDim{}), make_coord(_, _0{}));
    auto tq = tp.tma_q.get_slice(_0{});
    auto tk = tp.tma_k.get_slice(_0{});
    Tensor tQgQ = tq.partition_S(gQ);
    Tensor tQsQ = tq.partition_D(sQ);
    Tensor tKgK = tk.partition_S(gK);
    Tensor tKsK = tk.partition_D(sK);
    TxBarrier::arrive_and_expect_tx(&bars[0], Kt::kQBytes);
    copy(tp.tma_q.with(bars[0]), tQgQ, tQsQ);
    TxBarrier::arrive_and_expect_tx(&bars[1], Kt::kKVBytes);
    copy(tp.tma_k.with(bars[1]), tKgK(_, _, _, tp.key_tile), tKsK(_, _, _, 1));
  }
  const bool landed = bounded_wait(&bars[0], 0) && bounded_wait(&bars[1], 0);
  if (!landed) {
    if (threadIdx.x == 0) *tp.ok = 0;
    return;
  }
  for (int i = threadIdx.x; i < Kt::kBlockM * Kt::kHeadDim; i += blockDim.x) {
    tp.q_out[i] = sQ(i / Kt::kHeadDim, i % Kt::kHeadDim);
  }
  for (int i = threadIdx.x; i < Kt::kBlockN * Kt::kHeadDim; i += blockDim.x) {
    tp.k_out[i] = sK(i / Kt::kHeadDim, i % Kt::kHeadDim, 1);
  }
#endif
}

// The value of element (row, head, col) of the test tensors: small integers, exact in bf16.
float pattern(int row, int head, int col, int salt) { return static_cast<float>((row * 7 + head * 13 + col * 3 + salt) % 17 - 8); }

template <int kHeadDim>
void tma_test() {
  using Kt = HopperFwdTraits<kHeadDim, Element>;
  const int total_q = 300, h_q = 3, total_k = 250, h_kv = 2;
  const int q_row0 = 200, q_head = 1, k_begin = 37, kv_head = 1, key_tile = 1;
  // q as a view with padded rows: row stride (h_q + 1) * d, head stride d (the op hands such views over).
  const int64_t q_row_stride = (h_q + 1) * kHeadDim, k_row_stride = h_kv * kHeadDim;
  std::vector<uint16_t> q(total_q * q_row_stride), k(total_k * k_row_stride);
  for (int r = 0; r < total_q; ++r)
    for (int h = 0; h < h_q; ++h)
      for (int c = 0; c < kHeadDim; ++c) q[r * q_row_stride + h * kHeadDim + c] = bf16_bits(pattern(r, h, c, 1));
  for (int r = 0; r < total_k; ++r)
    for (int h = 0; h < h_kv; ++h)
      for (int c = 0; c < kHeadDim; ++c) k[r * k_row_stride + h * kHeadDim + c] = bf16_bits(pattern(r, h, c, 5));
  Element *dq, *dk, *q_out, *k_out;
  int* ok;
  CHECK_CUDA(cudaMalloc(&dq, q.size() * 2));
  CHECK_CUDA(cudaMalloc(&dk, k.size() * 2));
  CHECK_CUDA(cudaMalloc(&q_out, Kt::kQBytes));
  CHECK_CUDA(cudaMalloc(&k_out, Kt::kKVBytes));
  CHECK_CUDA(cudaMalloc(&ok, sizeof(int)));
  CHECK_CUDA(cudaMemcpy(dq, q.data(), q.size() * 2, cudaMemcpyHostToDevice));
  CHECK_CUDA(cudaMemcpy(dk, k.data(), k.size() * 2, cudaMemcpyHostToDevice));
  const int one = 1;
  CHECK_CUDA(cudaMemcpy(ok, &one, sizeof(int), cudaMemcpyHostToDevice));
  TmaTestParams<Kt> tp{Kt::make_tma_q(Kt::make_gmem_tensor(dq, total_q, h_q, q_row_stride, kHeadDim)),
                       Kt::make_tma_kv(Kt::make_gmem_tensor(dk, total_k, h_kv, k_row_stride, kHeadDim)),
                       total_q, h_q, q_row0, q_head, total_k, h_kv, k_begin, kv_head, key_tile, q_out, k_out, ok};
  const int smem = Kt::kQBytes + Kt::kStages * Kt::kKVBytes + 64 + 1024;
  CHECK_CUDA(cudaFuncSetAttribute(tma_test_kernel<Kt>, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
  tma_test_kernel<Kt><<<1, 128, smem>>>(tp);
  CHECK_CUDA(cudaGetLastError());
  CHECK_CUDA(cudaDeviceSynchronize());
  int landed = 0;
  std::vector<uint16_t> qo(Kt::kBlockM * kHeadDim), ko(Kt::kBlockN * kHeadDim);
  CHECK_CUDA(cudaMemcpy(&landed, ok, sizeof(int), cudaMemcpyDeviceToHost));
  CHECK_CUDA(cudaMemcpy(qo.data(), q_out, qo.size() * 2, cudaMemcpyDeviceToHost));
  CHECK_CUDA(cudaMemcpy(ko.data(), k_out, ko.size() * 2, cudaMemcpyDeviceToHost));
  int bad = 0;
  for (int r = 0; r < Kt::kBlockM; ++r)
    for (int c = 0; c < kHeadDim; ++c) {
      const int row = q_row0 + r;  // past total_q: zeros (TMA's out-of-bounds fill)
      const float want = row < total_q ? pattern(row, q_head, c, 1) : 0.f;
      if (bf16_value(qo[r * kHeadDim + c]) != want) ++bad;
    }
  for (int r = 0; r < Kt::kBlockN; ++r)
    for (int c = 0; c < kHeadDim; ++c) {
      const int row = k_begin + key_tile * Kt::kBlockN + r;
      const float want = row < total_k ? pattern(row, kv_head, c, 5) : 0.f;
      if (bf16_value(ko[r * kHeadDim + c]) != want) ++bad;
    }
  char detail[128];
  std::snprintf(detail, sizeof(detail), "%s, %d wrong elements of %d", landed ? "barriers completed" : "TIMEOUT",
                bad, (Kt::kBlockM + Kt::kBlockN) * kHeadDim);
  report("tma", kHeadDim, landed && bad == 0, detail);
  cudaFree(dq), cudaFree(dk), cudaFree(q_out), cudaFree(k_out), cudaFree(ok);
}

// ---- gmma.
template <typename Kt>
__global__ void __launch_bounds__(256) gmma_test_kernel(const Element* q, const Element* k, const Element* v,
                                                        float p_scale, float* s_out, float* o_out) {
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using namespace ism::cuda::hopper;
  constexpr int kM = Kt::kBlockM, kN = Kt::kBlockN, kD = Kt::kHeadDim;
  extern __shared__ __align__(1024) unsigned char smem_raw[];
  unsigned char* smem = smem_raw + (1024 - ism::cuda::smem_u32(smem_raw) % 1024) % 1024;
  Tensor sQ = make_tensor(make_smem_ptr(reinterpret_cast<Element*>(smem)), typename Kt::SmemLayoutQ{});
  Tensor sK = make_tensor(make_smem_ptr(reinterpret_cast<Element*>(smem + Kt::kQBytes)), typename Kt::SmemLayoutK{});
  Element* v_smem = reinterpret_cast<Element*>(smem + Kt::kQBytes + Kt::kStages * Kt::kKVBytes);
  Tensor sV = make_tensor(make_smem_ptr(v_smem), typename Kt::SmemLayoutV{});
  Tensor sVt = make_tensor(make_smem_ptr(v_smem), typename Kt::SmemLayoutVt{});
  // Plain stores through the layouts (not TMA: this test is about the descriptors), into stage 1.
  for (int i = threadIdx.x; i < kM * kD; i += blockDim.x) sQ(i / kD, i % kD) = q[i];
  for (int i = threadIdx.x; i < kN * kD; i += blockDim.x) {
    sK(i / kD, i % kD, 1) = k[i];
    sV(i / kD, i % kD, 1) = v[i];
  }
  cutlass::arch::fence_view_async_shared();  // generic-proxy stores, read by wgmma (async proxy)
  __syncthreads();

  const int ctid = threadIdx.x;
  typename Kt::TiledMmaQK mma_qk;
  typename Kt::TiledMmaPV mma_pv;
  auto thr_qk = mma_qk.get_thread_slice(ctid);
  auto thr_pv = mma_pv.get_thread_slice(ctid);
  Tensor tSrQ = thr_qk.partition_fragment_A(sQ);
  Tensor tSrK = thr_qk.partition_fragment_B(sK);
  Tensor tOrV = thr_pv.partition_fragment_B(sVt);
  Tensor tSrS = partition_fragment_C(mma_qk, make_shape(typename Kt::BlockM{}, typename Kt::BlockN{}));
  Tensor tOrO = partition_fragment_C(mma_pv, make_shape(typename Kt::BlockM{}, typename Kt::HeadDim{}));
  Tensor tOrP = make_tensor<Element>(partition_shape_A(mma_pv, make_shape(typename Kt::BlockM{}, typename Kt::BlockN{})));
  Tensor tScS = thr_qk.partition_C(make_identity_tensor(make_shape(typename Kt::BlockM{}, typename Kt::BlockN{})));
  Tensor tOcO = thr_pv.partition_C(make_identity_tensor(make_shape(typename Kt::BlockM{}, typename Kt::HeadDim{})));

  warpgroup_gemm<true, false>(mma_qk, tSrQ, tSrK(_, _, _, 1), tSrS);
  warpgroup_wait<0>();
  warpgroup_fence_operand(tSrS);
  for (int e = 0; e < size(tSrS); ++e) s_out[get<0>(tScS(e)) * kN + get<1>(tScS(e))] = tSrS(e);
  for (int e = 0; e < size(tSrS); ++e) tSrS(e) *= p_scale;
  scores_to_operand<RawElement<Element>>(tSrS, tOrP);
  clear(tOrO);
  warpgroup_gemm<false, true>(mma_pv, tOrP, tOrV(_, _, _, 1), tOrO);
  warpgroup_wait<0>();
  warpgroup_fence_operand(tOrO);
  for (int e = 0; e < size(tOrO); ++e) o_out[get<0>(tOcO(e)) * kD + get<1>(tOcO(e))] = tOrO(e);
#endif
}

template <int kHeadDim>
void gmma_test() {
  using Kt = HopperFwdTraits<kHeadDim, Element>;
  constexpr int kM = Kt::kBlockM, kN = Kt::kBlockN, kD = kHeadDim;
  std::vector<uint16_t> q(kM * kD), k(kN * kD), v(kN * kD);
  for (int i = 0; i < kM * kD; ++i) q[i] = bf16_bits(static_cast<float>((i * 5 + i / kD) % 5 - 2));
  for (int i = 0; i < kN * kD; ++i) k[i] = bf16_bits(static_cast<float>((i * 3 + i / kD * 7) % 5 - 2));
  for (int i = 0; i < kN * kD; ++i) v[i] = bf16_bits(static_cast<float>((i * 11 + i / kD) % 7 - 3));
  const float p_scale = 1.f / 64;
  Element *dq, *dk, *dv;
  float *ds, *dout;
  CHECK_CUDA(cudaMalloc(&dq, q.size() * 2));
  CHECK_CUDA(cudaMalloc(&dk, k.size() * 2));
  CHECK_CUDA(cudaMalloc(&dv, v.size() * 2));
  CHECK_CUDA(cudaMalloc(&ds, kM * kN * 4));
  CHECK_CUDA(cudaMalloc(&dout, kM * kD * 4));
  CHECK_CUDA(cudaMemcpy(dq, q.data(), q.size() * 2, cudaMemcpyHostToDevice));
  CHECK_CUDA(cudaMemcpy(dk, k.data(), k.size() * 2, cudaMemcpyHostToDevice));
  CHECK_CUDA(cudaMemcpy(dv, v.data(), v.size() * 2, cudaMemcpyHostToDevice));
  CHECK_CUDA(cudaMemset(ds, 0xff, kM * kN * 4));  // NaN: an element the kernel does not write shows
  CHECK_CUDA(cudaMemset(dout, 0xff, kM * kD * 4));
  const int smem = Kt::kQBytes + 2 * Kt::kStages * Kt::kKVBytes + 1024;
  CHECK_CUDA(cudaFuncSetAttribute(gmma_test_kernel<Kt>, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
  gmma_test_kernel<Kt><<<1, 256, smem>>>(dq, dk, dv, p_scale, ds, dout);
  CHECK_CUDA(cudaGetLastError());
  CHECK_CUDA(cudaDeviceSynchronize());
  std::vector<float> s(kM * kN), o(kM * kD);
  CHECK_CUDA(cudaMemcpy(s.data(), ds, s.size() * 4, cudaMemcpyDeviceToHost));
  CHECK_CUDA(cudaMemcpy(o.data(), dout, o.size() * 4, cudaMemcpyDeviceToHost));
  // S: integer products, exact in fp32; P as the kernel rounds it; O in double.
  int bad_s = 0;
  double err_o = 0, max_o = 0;
  std::vector<float> p(kM * kN);
  for (int r = 0; r < kM; ++r)
    for (int c = 0; c < kN; ++c) {
      double acc = 0;
      for (int x = 0; x < kD; ++x) acc += bf16_value(q[r * kD + x]) * bf16_value(k[c * kD + x]);
      if (!(s[r * kN + c] == static_cast<float>(acc))) ++bad_s;
      p[r * kN + c] = bf16_value(bf16_bits(static_cast<float>(acc) * p_scale));
    }
  for (int r = 0; r < kM; ++r)
    for (int c = 0; c < kD; ++c) {
      double acc = 0;
      for (int x = 0; x < kN; ++x) acc += static_cast<double>(p[r * kN + x]) * bf16_value(v[x * kD + c]);
      err_o = std::isnan(o[r * kD + c]) ? INFINITY : std::fmax(err_o, std::fabs(o[r * kD + c] - acc));
      max_o = std::fmax(max_o, std::fabs(acc));
    }
  const bool ok = bad_s == 0 && err_o <= 1e-4 * std::fmax(1.0, max_o);
  char detail[128];
  std::snprintf(detail, sizeof(detail), "S: %d wrong of %d; O = P V: max error %.3g (max |O| %.3g)", bad_s, kM * kN,
                err_o, max_o);
  report("gmma", kHeadDim, ok, detail);
  cudaFree(dq), cudaFree(dk), cudaFree(dv), cudaFree(ds), cudaFree(dout);
}

}  // namespace hopper_test

int main() {
  using namespace hopper_test;
  host_layout_checks<64>();
  host_layout_checks<128>();
  int devices = 0, major = 0, minor = 0;
  if (cudaGetDeviceCount(&devices) != cudaSuccess || devices == 0) {
    std::printf("no CUDA device: device tests skipped\n");
  } else {
    CHECK_CUDA(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, 0));
    CHECK_CUDA(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, 0));
    if (major != 9 || minor != 0) {
      std::printf("compute capability %d.%d, not 9.0: device tests skipped\n", major, minor);
    } else {
      tma_test<64>();
      tma_test<128>();
      gmma_test<64>();
      gmma_test<128>();
    }
  }
  std::printf("%s\n", g_failures == 0 ? "hopper_gmma_tma_test: OK" : "hopper_gmma_tma_test: FAILED");
  return g_failures == 0 ? 0 : 1;
}
