// The forward inner loop for a few query rows: decode, where a GQA group's few rows meet the whole cache,
// with the keys in the vector lanes instead of the queries.
//
// attend_query_tile (attend_tile.h) puts one query per lane. With the 3 or 4 rows of a decode group most
// lanes idle: every key costs d broadcast FMAs and a full-width exp2 whatever the number of rows. Here
// each row is dotted with a block of W keys along the head dim (d / W FMAs a key, K read in place), the W
// sums are reduced in one transposing pass (Vec::sum_each), and the online softmax runs along the row, W
// keys a vector. P V stays the micro-kernel's product, V read in place too.
#pragma once

namespace ism::cpu::ISM_ISA_NS {

// The most rows the row path takes; taller tiles run attend_query_tile. Decode at 4 sequences x 2048 cached
// tokens measured the two paths even at about 3/4 of the lanes (AVX2: row path 5-10% faster at 5-7 rows, even
// at 8; AVX-512: even at 10-12 rows, the transposed tile 5-10% faster at 16).
constexpr int kRowPathMaxRows = 3 * Vec::W / 4;

// Scores of the m rows q (ld n_el) against `keys` (<= W) rows k (ld ldk), times out_scale, into s[r * lds + i].
// A row holds n_el elements of the operand type (micro_gemm.h): floats with FloatMadd, bfloat16 pairs with
// PairMadd. A short block repeats its last key in the idle lanes and stores only `keys` of them.
template <bool kFull, typename Madd>
inline void dot_block(const float* q, int m, int n_el, const float* k, int64_t ldk, int keys, float out_scale, float* s,
                      int64_t lds) {
  using V = typename Vec::V;
  constexpr int W = Vec::W;
  const int body = n_el / W * W, tail = n_el - body;
  const float* row[W];
  for (int i = 0; i < W; ++i) row[i] = k + (kFull ? i : std::min(i, keys - 1)) * ldk;
  const V scale = Vec::set1(out_scale);
  for (int r = 0; r < m; ++r) {
    const float* qr = q + static_cast<int64_t>(r) * n_el;
    V acc[W];
#pragma GCC unroll 16
    for (int i = 0; i < W; ++i) acc[i] = Vec::zero();
    for (int c = 0; c < body; c += W) {
      const V qc = Vec::load(qr + c);
#pragma GCC unroll 16
      for (int i = 0; i < W; ++i) acc[i] = Madd::madd(acc[i], Vec::load(row[i] + c), qc);
    }
    if (tail > 0) {
      const V qc = Vec::load_part(qr + body, tail);
#pragma GCC unroll 16
      for (int i = 0; i < W; ++i) acc[i] = Madd::madd(acc[i], Vec::load_part(row[i] + body, tail), qc);
    }
    if (kFull) {
      Vec::store(s + r * lds, Vec::mul(Vec::sum_each(acc), scale));
    } else {
      Vec::store_part(s + r * lds, Vec::mul(Vec::sum_each(acc), scale), keys);
    }
  }
}

// s[r * lds + j] = out_scale * <q row r, k row j> for r < m, j < n: block by block of W keys, so a block stays
// in L1 while every row reads it.
template <typename Madd>
inline void dot_rows(const float* q, int m, int n_el, const float* k, int64_t ldk, int n, float out_scale, float* s,
                     int64_t lds) {
  constexpr int W = Vec::W;
  int j = 0;
  for (; j + W <= n; j += W) dot_block<true, Madd>(q, m, n_el, k + j * ldk, ldk, W, out_scale, s + j, lds);
  if (j < n) dot_block<false, Madd>(q, m, n_el, k + j * ldk, ldk, n - j, out_scale, s + j, lds);
}

// One key tile's step of the online softmax for one row of scores s[0, n) (log2 domain), keys from `visible`
// on masked here: overwrites s with the unnormalised probabilities, updates the row's max and sum, and
// returns alpha, the factor that rescales the row's accumulator. s has room up to n rounded up to W. As in
// softmax_update_cols, a NaN score never becomes the max and stays NaN in its probability, and a row that
// has seen nothing keeps probability 0.
inline float softmax_update_row(float* s, int n, int visible, float* row_max, float* row_sum) {
  using V = typename Vec::V;
  constexpr int W = Vec::W;
  const float neg_inf = -std::numeric_limits<float>::infinity();
  const int n_pad = (n + W - 1) / W * W;
  std::fill(s + std::max(visible, 0), s + n_pad, neg_inf);
  V top = Vec::set1(neg_inf);
  for (int j = 0; j < n_pad; j += W) top = Vec::max(Vec::load(s + j), top);  // NaN first: never the max
  float lanes[W];
  Vec::store(lanes, top);
  float tile_max = neg_inf;
  for (const float x : lanes) tile_max = std::max(tile_max, x);
  const float new_max = std::max(*row_max, tile_max);
  const float ref = new_max == neg_inf ? 0.f : new_max;  // no (-inf) - (-inf) while the row has seen nothing
  const V ref_v = Vec::set1(ref);
  V sum = Vec::zero();
  for (int j = 0; j < n_pad; j += W) {
    const V p = exp2v(Vec::sub(Vec::load(s + j), ref_v));
    Vec::store(s + j, p);
    sum = Vec::add(sum, p);
  }
  Vec::store(lanes, sum);
  float tile_sum = 0.f;
  for (const float x : lanes) tile_sum += x;
  const float alpha = std::exp2(*row_max - ref);
  *row_sum = *row_sum * alpha + tile_sum;
  *row_max = new_max;
  return alpha;
}

// Vectors of C per row block in the row path's P V: as wide as the registers allow (m * NV accumulators, NV
// vectors of a V row, one broadcast) up to Vec::kFewRowsMaxNV. On AVX2 one row then keeps 7 FMA chains in
// flight where the square block's 2 would wait on the FMA latency (decode 1.1-1.3x faster at 1-4 rows,
// d = 128); on AVX-512 the square block's 4 measured as fast or faster.
template <int M>
constexpr int pv_vectors() {
  return std::max(Vec::kNV, std::min(Vec::kFewRowsMaxNV, (Vec::kRegs - 1) / (M + 1)));
}

// acc[m x d] (mode) P[m x k] V[k x d] with P and V as `pv` (float32: P rows at stride kTileK, V rows; k steps).
template <typename Ops>
inline void probs_times_values(int m, int d, int k, const Ops& pv, float* acc, CMode mode, const float* alpha) {
  switch (m) {
    case 1: gemm_ops<pv_vectors<1>()>(m, d, k, pv, acc, d, mode, alpha); break;
    case 2: gemm_ops<pv_vectors<2>()>(m, d, k, pv, acc, d, mode, alpha); break;
    case 3: gemm_ops<pv_vectors<3>()>(m, d, k, pv, acc, d, mode, alpha); break;
    case 4: gemm_ops<pv_vectors<4>()>(m, d, k, pv, acc, d, mode, alpha); break;
    default: gemm_ops(m, d, k, pv, acc, d, mode, alpha); break;
  }
}

// Whether P V reads half-precision V rows where they lie, converted in registers (ConvertBMadd), rather than a
// float32 copy: for a few rows the copy costs about as much as the product. Needs whole vectors of d.
template <typename VRows>
bool convert_values_in_registers(int d) {
  return !std::is_same_v<row_element_t<VRows>, float> && d % Vec::W == 0;
}

// Runs of evenly spaced rows of one key tile (a paged cache breaks at page ends), staged once: K as the path's
// row operand (in place where it can be), V as float32 rows unless P V converts it in registers.
struct KeyRuns {
  int count = 0;
  int start[kTileK];
  int len[kTileK];
  FloatTile k[kTileK], v[kTileK];
};

template <typename Path, typename KRows, typename VRows>
void stage_runs(const KRows& k, const VRows& v, int k0, int n, int d, FwdScratch& w, KeyRuns& runs) {
  const bool stage_v = !convert_values_in_registers<VRows>(d);
  runs.count = 0;
  for (int j = 0; j < n;) {
    const int len = std::min(k.run(k0 + j, n - j), v.run(k0 + j, n - j));
    const int64_t at = static_cast<int64_t>(j) * d;
    runs.start[runs.count] = j;
    runs.len[runs.count] = len;
    runs.k[runs.count] = Path::row_operand(k, k0 + j, len, d, w.k.data() + at);
    if (stage_v) runs.v[runs.count] = stage_rows(v, k0 + j, len, d, w.v.data() + at);
    ++runs.count;
    j += len;
  }
}

// acc (mode) P V for `len` keys: P rows at p (stride kTileK), V rows key .. key + len - 1 of v (one evenly spaced
// run), staged as float32 in vt, or read where they lie and converted in registers.
template <typename VRows>
void probs_times_value_run(int m, int d, int len, const float* p, const VRows& v, int64_t key, const FloatTile& vt,
                           float* acc, CMode mode, const float* alpha) {
  using T = row_element_t<VRows>;
  if constexpr (!std::is_same_v<T, float>) {
    if (convert_values_in_registers<VRows>(d)) {
      const StridedOperands<ConvertBMadd<T>> pv{p, kTileK, 1, v(key), v.run_stride()};
      return probs_times_values(m, d, len, pv, acc, mode, alpha);
    }
  }
  probs_times_values(m, d, len, FloatOperands{p, kTileK, 1, vt.p, vt.ld}, acc, mode, alpha);
}

// attend_few_rows's loop with the scores on a path's operands (float_path.h); P V stays float32.
template <typename Path, typename QRows, typename KRows, typename VRows, typename ORows>
void attend_few_rows_on(const QRows& q, int m, const int32_t* limit, int max_limit, const KRows& k, const VRows& v,
                        int d, float softmax_scale, const ORows& out, float* lse, FwdScratch& w) {
  const float log2_scale = softmax_scale * kLog2e;  // scores in the log2 domain
  float* qs = w.qt.data();                          // m rows of Path::depth(d)
  Path::copy_queries(q, m, d, log2_scale, qs);
  for (int r = 0; r < m; ++r) {
    w.row_max[r] = -std::numeric_limits<float>::infinity();
    w.row_sum[r] = 0.f;
  }
  float* s = w.st.data();  // m rows of kTileK scores, then probabilities
  KeyRuns runs;
  const int n_tiles = key_tiles_to_visit(max_limit, kTileK);
  for (int t = 0; t < n_tiles; ++t) {
    const int k0 = t * kTileK;
    const int n = std::min(kTileK, max_limit - k0);  // keys past max_limit are invisible to all rows
    stage_runs<Path>(k, v, k0, n, d, w, runs);
    for (int i = 0; i < runs.count; ++i) {
      dot_rows<typename Path::Madd>(qs, m, Path::depth(d), runs.k[i].p, runs.k[i].ld, runs.len[i],
                                    Path::score_scale(log2_scale), s + runs.start[i], kTileK);
    }
    for (int r = 0; r < m; ++r) {
      const int visible = std::min(limit[r] - k0, n);
      w.alpha[r] = softmax_update_row(s + r * kTileK, n, visible, &w.row_max[r], &w.row_sum[r]);
    }
    for (int i = 0; i < runs.count; ++i) {  // acc = diag(alpha) acc + P V, run by run; the first tile overwrites
      const CMode mode = i > 0 ? CMode::kAdd : t == 0 ? CMode::kSet : CMode::kScaleAdd;
      probs_times_value_run(m, d, runs.len[i], s + runs.start[i], v, k0 + runs.start[i], runs.v[i], w.acc.data(),
                            mode, w.alpha.data());
    }
  }
  if (n_tiles == 0) std::fill(w.acc.begin(), w.acc.begin() + static_cast<int64_t>(m) * d, 0.f);
  finish_rows(m, d, out, lse, w);
}

// attend_query_tile's contract (attend_tile.h) for m <= kRowPathMaxRows rows. The scores take choose_path.h's
// path only where P V converts V in registers (whole vectors of d): staging V for P V on pairs would cost about
// as much as the product with a few rows.
template <typename QRows, typename KRows, typename VRows, typename ORows>
void attend_few_rows(const QRows& q, int m, const int32_t* limit, int max_limit, const KRows& k, const VRows& v,
                     int d, float softmax_scale, const ORows& out, float* lse, FwdScratch& w) {
  const auto run = [&](auto path) {
    attend_few_rows_on<decltype(path)>(q, m, limit, max_limit, k, v, d, softmax_scale, out, lse, w);
  };
  if (convert_values_in_registers<VRows>(d)) return with_path<row_element_t<KRows>>(d, run);
  run(FloatPath{});
}

// The forward inner loop for m rows against the keys: the row path for a few rows, the transposed tile
// otherwise (same contract, attend_tile.h).
template <typename QRows, typename KRows, typename VRows, typename ORows>
void attend_rows(const QRows& q, int m, const int32_t* limit, int max_limit, const KRows& k, const VRows& v, int d,
                 float softmax_scale, const ORows& out, float* lse, FwdScratch& w) {
  if (m <= kRowPathMaxRows) {
    attend_few_rows(q, m, limit, max_limit, k, v, d, softmax_scale, out, lse, w);
  } else {
    attend_query_tile(q, m, limit, max_limit, k, v, d, softmax_scale, out, lse, w);
  }
}

}  // namespace ism::cpu::ISM_ISA_NS
