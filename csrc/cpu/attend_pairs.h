// bfloat16 on the AVX512_BF16 dot product (VDPBF16PS): the pair operands and the staging of rows as pairs, and
// the forward on them (attend_query_tile's and attend_few_rows's loops with both products on bfloat16 pairs,
// twice the multiply-adds per instruction of float32 FMAs; segment_attn_bwd_pairs.h is the backward). Only the
// avx512_bf16 build has it (kernels_avx512_bf16.cpp defines ISM_ISA_NATIVE_BF16); attend_tile.h and
// attend_rows.h send bfloat16 rows of an even head dim here.
//
// VDPBF16PS adds a.lo * b.lo + a.hi * b.hi into a float32 lane, where a and b are 32-bit words of two bfloat16
// each: the pairs run along k, the reduced dimension. So
// - S^T = K Q^T reduces over the head dim: K's rows already are pairs (read in place), Q^T is packed as words
//   of a query row (a 32-bit transpose, bits unchanged); the softmax scale is applied to the float32 scores
//   in the product's epilogue, so q is never rounded again;
// - P V reduces over keys: the softmax step rounds P to bfloat16 as key pairs (keys 2p and 2p + 1 of a lane in
//   one word, written over S^T's first rows), and V is staged as the same key pairs of its rows.
// Rounding P to bfloat16 is the one step the float32 path does not take (as PyTorch's and FlashAttention's
// bfloat16 kernels do); the row sums and the accumulator stay float32.
#pragma once

namespace ism::cpu::ISM_ISA_NS {

// A and B of a product on bfloat16 pairs: A(i, p) is the word at a + i * a_rs + p * a_cs (bfloat16 2p and
// 2p + 1 of a k index pair), B row p at b + p * ldb, one word per column. Words sit in float slots and are read
// only as bits; each k step is one pair, two products a lane (VDPBF16PS).
struct PairMadd {
  using BElem = float;
  static typename Vec::V load_b(const float* p) { return Vec::load(p); }
  static typename Vec::V load_b_part(const float* p, int n) { return Vec::load_part(p, n); }
  static typename Vec::V broadcast(const float* p) { return Vec::broadcast_pair(p); }
  static typename Vec::V madd(typename Vec::V acc, typename Vec::V a, typename Vec::V b) {
    return Vec::dot_pairs(acc, a, b);
  }
};
using PairOperands = StridedOperands<PairMadd>;

// The word of bfloat16 lo (low half) and hi.
inline uint32_t pair_word(c10::BFloat16 lo, c10::BFloat16 hi) {
  return static_cast<uint32_t>(lo.x) | (static_cast<uint32_t>(hi.x) << 16);
}

inline void store_word(float* slot, uint32_t word) { std::memcpy(slot, &word, sizeof(word)); }

// dst[p * ld + i] = word p of query row i (its bfloat16 2p and 2p + 1) for i < m, p < d / 2, zero words for
// lanes [m, ld): pack_transposed on 32-bit words, W x W blocks transposed in registers.
template <typename Rows>
void pack_pairs_transposed(const Rows& rows, int m, int d, float* dst, int64_t ld) {
  constexpr int W = Vec::W;
  const float* src[kTileQ];  // row i as words
  for (int i = 0; i < m; ++i) src[i] = reinterpret_cast<const float*>(rows(i));
  const int words = d / 2, m_full = m / W * W, w_full = words / W * W;
  for (int i0 = 0; i0 < m_full; i0 += W) {
    for (int p0 = 0; p0 < w_full; p0 += W) {
      typename Vec::V block[W];
      for (int i = 0; i < W; ++i) block[i] = Vec::load(src[i0 + i] + p0);
      Vec::transpose(block);
      for (int p = 0; p < W; ++p) Vec::store(dst + (p0 + p) * ld + i0, block[p]);
    }
  }
  for (int p = 0; p < words; ++p) {
    float* out = dst + p * ld;
    for (int i = p < w_full ? m_full : 0; i < m; ++i) std::memcpy(out + i, src[i] + p, sizeof(float));
    std::fill(out + m, out + ld, 0.f);  // +0.f is the zero word
  }
}

// Rows [r0, r0 + n) as key pairs: word row p holds rows 2p and 2p + 1 (the last one zero when n is odd), column
// by column, at leading dimension ld (words). The B panel of P V (and of the backward's products over lanes).
// n <= kTileK. The row addresses are taken run by run (one accessor call a run: a paged cache's page lookup
// divides), since with a small head dim the lookups cost as much as the interleave.
template <typename Rows>
FloatTile stage_pairs(const Rows& rows, int64_t r0, int n, int d, float* buf, int64_t ld) {
  constexpr int W = Vec::W;
  static_assert(kTileQ <= kTileK, "stage_pairs also stages query tiles");
  const c10::BFloat16* row[kTileK];
  for (int j = 0; j < n;) {
    const int len = rows.run(r0 + j, n - j);
    const c10::BFloat16* first = rows(r0 + j);
    for (int i = 0; i < len; ++i) row[j + i] = first + i * rows.run_stride();
    j += len;
  }
  const int d_full = d / W * W;
  for (int p = 0; 2 * p < n; ++p) {
    const c10::BFloat16* lo = row[2 * p];
    float* out = buf + p * ld;
    if (2 * p + 1 < n) {
      const c10::BFloat16* hi = row[2 * p + 1];
      for (int c = 0; c < d_full; c += W) Vec::store(out + c, Vec::interleave_pairs(lo + c, hi + c));
      for (int c = d_full; c < d; ++c) store_word(out + c, pair_word(lo[c], hi[c]));
    } else {
      for (int c = 0; c < d; ++c) store_word(out + c, pair_word(lo[c], c10::BFloat16(0.f)));
    }
  }
  return {buf, ld};
}

// Rows [r0, r0 + n) of even length d as words (A of S^T: row i at p + i * ld): in place when they are evenly
// spaced at an even stride, else copied into buf (n x d / 2 words).
template <typename Rows>
FloatTile stage_pair_rows(const Rows& rows, int64_t r0, int n, int d, float* buf) {
  if (n > 0 && rows.run(r0, n) == n && rows.run_stride() % 2 == 0) {
    return {reinterpret_cast<const float*>(rows(r0)), rows.run_stride() / 2};
  }
  for (int i = 0; i < n; ++i) std::memcpy(buf + i * (d / 2), rows(r0 + i), sizeof(c10::BFloat16) * d);
  return {buf, d / 2};
}

// The softmax step's store (softmax_cols.h) for P V on pairs: the probabilities of key rows j and j + 1 as one
// word row, row j / 2 of the same buffer. Row j / 2 of a vector of lanes has been read by then (j / 2 <= j, and
// rows are read in order), so P overwrites only scores already used.
struct ProbsAsPairs {
  static void two(float* col, int j, int64_t ld, typename Vec::V p0, typename Vec::V p1) {
    Vec::store(col + (j / 2) * ld, Vec::round_to_pairs(p0, p1));
  }
  static void one(float* col, int j, int64_t ld, typename Vec::V p0) {
    Vec::store(col + (j / 2) * ld, Vec::round_to_pairs(p0, Vec::zero()));
  }
};

// Rows [0, n) of a float32 tile (lanes [0, cols), cols a multiple of W), each rounded to bfloat16 in place: row j's
// lanes 2l and 2l + 1 become word l of the same row, so the row is A of a product reducing over lanes
// (A(j, l) at t + j * ld + l). Each write lands on lanes already read.
inline void round_rows_in_place(float* t, int n, int64_t ld, int cols) {
  constexpr int W = Vec::W;
  for (int j = 0; j < n; ++j) {
    float* row = t + j * ld;
    int c = 0;
    for (; c + 2 * W <= cols; c += 2 * W) {
      Vec::store(row + c / 2, Vec::round_in_order(Vec::load(row + c), Vec::load(row + c + W)));
    }
    if (c < cols) Vec::store_part(row + c / 2, Vec::round_in_order(Vec::load(row + c), Vec::zero()), W / 2);
  }
}

// Key pairs of a float32 tile: dst row p, lane l = (src[2p][l], src[2p + 1][l]) rounded to bfloat16 (the odd last row
// paired with 0), for rows [0, n) and lanes [0, cols) of src; both at leading dimension ld. A of a product reducing
// over the keys (A(l, p) at dst + p * ld + l).
inline void key_pairs(const float* src, int n, int64_t ld, int cols, float* dst) {
  constexpr int W = Vec::W;
  for (int j = 0; j < n; j += 2) {
    const float* lo = src + j * ld;
    float* out = dst + (j / 2) * ld;
    for (int c = 0; c < cols; c += W) {
      const auto hi = j + 1 < n ? Vec::load(lo + ld + c) : Vec::zero();
      Vec::store(out + c, Vec::round_to_pairs(Vec::load(lo + c), hi));
    }
  }
}

// The epilogue of an S^T product on pairs: scores times softmax_scale * log2(e) in float32 (the float32 path folds
// it into q instead), then `then` (the forward's mask and column max; nothing in the backward).
template <typename Then>
struct ScaleThen {
  float scale;
  Then then;
  template <int MR, int NV, typename V>
  void block(int row0, int col0, V (&acc)[MR][NV]) const {
    const V s = Vec::set1(scale);
    for (int i = 0; i < MR; ++i) {
      for (int v = 0; v < NV; ++v) acc[i][v] = Vec::mul(acc[i][v], s);
    }
    then.template block<MR, NV>(row0, col0, acc);
  }
};

// attend_query_tile (attend_tile.h) for bfloat16 rows of even head dim d, both products on pairs. The same
// tiles, sub-tiles, masking and online softmax; the scratch buffers hold words where the float32 path holds
// floats (each as large or larger).
template <typename QRows, typename KRows, typename VRows, typename ORows>
void attend_query_tile_pairs(const QRows& q, int m, const int32_t* limit, int max_limit, const KRows& k,
                             const VRows& v, int d, float softmax_scale, const ORows& out, float* lse, FwdScratch& w) {
  const int m_pad = pad_lanes(m), ld = padded_ld(m_pad), words = d / 2, v_ld = padded_ld(d);
  pack_pairs_transposed(q, m, d, w.qt.data(), ld);
  const int min_limit = start_lanes(limit, m, max_limit, w);
  AccRows acc_rows;
  const int n_tiles = key_tiles_to_visit(max_limit, kTileK);
  for (int t = 0; t < n_tiles; ++t) {
    const int k0 = t * kTileK;
    const int n = std::min(kTileK, max_limit - k0);
    const FloatTile kt = stage_pair_rows(k, k0, n, d, w.k.data());
    const FloatTile vt = stage_pairs(v, k0, n, d, w.v.data(), v_ld);
    const bool masked = !key_tile_is_full(min_limit, k0, n);
    const int step = masked ? kSubTileK : n;  // kSubTileK is even: a sub-tile starts on a whole pair of V
    for (int s0 = 0; s0 < n; s0 += step) {
      const int ks = k0 + s0, ns = std::min(step, n - s0);
      const int c0 = first_lanes_seeing(w.limit.data(), m, ks), cols = m_pad - c0;
      if (c0 == m) continue;
      std::fill(w.tile_max.begin() + c0, w.tile_max.begin() + m_pad, -std::numeric_limits<float>::infinity());
      const ScaleThen<MaskAndColumnMax> epi{softmax_scale * kLog2e,
                                            {w.limit.data() + c0, ks, masked, w.tile_max.data() + c0}};
      gemm_ops(ns, cols, words, PairOperands{kt.p + s0 * kt.ld, kt.ld, 1, w.qt.data() + c0, ld}, w.st.data() + c0,
               ld, CMode::kSet, nullptr, epi);
      const SoftmaxState state{w.row_max.data() + c0, w.row_sum.data() + c0, w.alpha.data() + c0};
      softmax_update_cols<ProbsAsPairs>(w.st.data() + c0, ns, ld, cols, w.tile_max.data() + c0, state);
      float* acc = w.acc.data();
      const CMode mode = acc_rows.before_product(c0, d, acc, CMode::kScaleAdd);
      gemm_ops(m - c0, d, (ns + 1) / 2, PairOperands{w.st.data() + c0, 1, ld, vt.p + (s0 / 2) * vt.ld, vt.ld},
               acc + static_cast<int64_t>(c0) * d, d, mode, w.alpha.data() + c0);
    }
  }
  acc_rows.zero_unwritten(m, d, w.acc.data());
  finish_rows(m, d, out, lse, w);
}

// attend_few_rows (attend_rows.h) for bfloat16 rows whose head dim d is whole vectors: the scores of each row
// against W keys at a time on pairs along the head dim (K read in place, the softmax scale applied to the sums);
// P V as attend_few_rows does it, P in float32 and V converted in registers.
template <typename QRows, typename KRows, typename VRows, typename ORows>
void attend_few_rows_pairs(const QRows& q, int m, const int32_t* limit, int max_limit, const KRows& k,
                           const VRows& v, int d, float softmax_scale, const ORows& out, float* lse, FwdScratch& w) {
  const int words = d / 2;
  float* qw = w.qt.data();  // m rows of d / 2 words
  for (int r = 0; r < m; ++r) std::memcpy(qw + static_cast<int64_t>(r) * words, q(r), sizeof(c10::BFloat16) * d);
  for (int r = 0; r < m; ++r) {
    w.row_max[r] = -std::numeric_limits<float>::infinity();
    w.row_sum[r] = 0.f;
  }
  float* s = w.st.data();  // m rows of kTileK scores, then probabilities
  const int n_tiles = key_tiles_to_visit(max_limit, kTileK);
  for (int t = 0; t < n_tiles; ++t) {
    const int k0 = t * kTileK;
    const int n = std::min(kTileK, max_limit - k0);
    for (int j = 0; j < n;) {  // run by run of evenly spaced keys (a paged cache breaks at page ends)
      const int len = k.run(k0 + j, n - j);
      const FloatTile kr = stage_pair_rows(k, k0 + j, len, d, w.k.data() + static_cast<int64_t>(j) * words);
      dot_rows<PairMadd>(qw, m, words, kr.p, kr.ld, len, softmax_scale * kLog2e, s + j, kTileK);
      j += len;
    }
    for (int r = 0; r < m; ++r) {
      const int visible = std::min(limit[r] - k0, n);
      w.alpha[r] = softmax_update_row(s + r * kTileK, n, visible, &w.row_max[r], &w.row_sum[r]);
    }
    // P stays float32 and V is converted in registers, run by run (attend_rows.h: convert_values_in_registers).
    const CMode first = t == 0 ? CMode::kSet : CMode::kScaleAdd;
    for (int j = 0; j < n;) {
      const int len = v.run(k0 + j, n - j);
      probs_times_value_run(m, d, len, s + j, v, k0 + j, FloatTile{}, w.acc.data(), j == 0 ? first : CMode::kAdd,
                            w.alpha.data());
      j += len;
    }
  }
  if (n_tiles == 0) std::fill(w.acc.begin(), w.acc.begin() + static_cast<int64_t>(m) * d, 0.f);
  finish_rows(m, d, out, lse, w);
}

}  // namespace ism::cpu::ISM_ISA_NS
