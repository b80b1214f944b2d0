// The pair path: bfloat16 attention on the AVX512_BF16 dot product (VDPBF16PS), twice the multiply-adds per
// instruction of float32 FMAs. The pair operands, the staging of rows as pairs, and PairPath (float_path.h says
// what a path provides), which the forward and backward loops run for bfloat16 rows of an even head dim. Only the
// avx512_bf16 build has it (kernels_avx512_bf16.cpp defines ISM_ISA_NATIVE_BF16).
//
// VDPBF16PS adds a.lo * b.lo + a.hi * b.hi into a float32 lane, where a and b are 32-bit words of two bfloat16
// each: the pairs run along k, the reduced dimension of each product.
//   S^T = K Q^T, dP^T = V dO^T   over the head dim: K and V rows are words already (read in place), Q^T and dO^T
//                                are packed as words of a query row (a 32-bit transpose, bits unchanged); the
//                                softmax scale is applied to the float32 scores in the product's epilogue, so q
//                                is never rounded again;
//   P V, dQ += dS K              over keys: the softmax step rounds P to bfloat16 as key pairs (keys 2p and
//                                2p + 1 of a lane in one word, written over S^T's first rows), dS likewise; V
//                                and K are staged as the same key pairs of their rows;
//   dV += P^T dO, dK += dS^T Q   over the query lanes: P^T and dS^T rows rounded to bfloat16 in place, dO and Q
//                                staged as query pairs (two rows interleaved).
// Rounding P and dS to bfloat16 is the one step the float32 path does not take (as PyTorch's and
// FlashAttention's bfloat16 kernels do); the softmax, delta, dS itself and every accumulator stay float32. The
// row path of decode (attend_rows.h) takes only the scores on pairs: P stays float32 and V is converted in
// registers there.
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

// The pair path (float_path.h lists what a path provides): for bfloat16 rows of an even head dim.
struct PairPath {
  using Madd = PairMadd;
  using Operands = PairOperands;
  using ProbStore = ProbsAsPairs;  // P V reduces over keys: P as key pairs

  static int depth(int n) { return (n + 1) / 2; }

  // Rows as words, transposed (the scale is not folded in: the S^T product applies it to its sums).
  template <typename Rows>
  static void pack_queries(const Rows& rows, int m, int d, float, float* dst, int ld) {
    pack_pairs_transposed(rows, m, d, dst, ld);
  }

  // m rows of d / 2 words.
  template <typename Rows>
  static void copy_queries(const Rows& rows, int m, int d, float, float* dst) {
    for (int r = 0; r < m; ++r) {
      std::memcpy(dst + static_cast<int64_t>(r) * (d / 2), rows(r), sizeof(c10::BFloat16) * d);
    }
  }

  template <typename Rows>
  static FloatTile row_operand(const Rows& rows, int64_t r0, int n, int d, float* buf) {
    return stage_pair_rows(rows, r0, n, d, buf);
  }

  // Always staged as row pairs (the reduction over rows needs them interleaved), at a padded stride.
  template <typename Rows>
  static FloatTile panel_operand(const Rows& rows, int64_t r0, int n, int d, int, float* buf) {
    return stage_pairs(rows, r0, n, d, buf, padded_ld(d));
  }

  // K and V as words (copies, where needed, both in v_buf: kTileK x d floats hold two tiles of n x d / 2 words),
  // K's key pairs in k_buf (kTileK / 2 x padded_ld(d) words) when a dQ product follows (a_rows > 0).
  template <typename Rows>
  static BwdKeyTile bwd_key_tile(const Rows& k, const Rows& v, int64_t k0, int n, int d, int a_rows, float* k_buf,
                                 float* v_buf) {
    return {stage_pair_rows(k, k0, n, d, v_buf), stage_pair_rows(v, k0, n, d, v_buf + kTileK * d / 2),
            a_rows > 0 ? panel_operand(k, k0, n, d, a_rows, k_buf) : FloatTile{}};
  }

  static float score_scale(float scale) { return scale; }

  template <typename Epi>
  static ScaleThen<Epi> score_epilogue(float scale, const Epi& then) {
    return {scale, then};
  }

  // Rows of lanes rounded in place to words of lane pairs (A(j, l) at t + j * ld + l).
  static void prepare_lanes(float* t, int n, int64_t ld, int cols) { round_rows_in_place(t, n, ld, cols); }

  // dS's key pairs, into `spare` (a tile of S^T's shape no longer needed).
  static const float* dscores_by_keys(const float* ds, int n, int64_t ld, int cols, float* spare) {
    key_pairs(ds, n, ld, cols, spare);
    return spare;
  }
};

}  // namespace ism::cpu::ISM_ISA_NS
