// The forward inner loop of the CPU kernels: one query tile against the key tiles it can see,
// with blocked online softmax (FlashAttention's algorithm). Shared by the packed varlen forward and
// the KV-cache attention, which differ only in where the rows live (tile_io.h accessors).
#pragma once

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "../tile_range.h"
#include "segment_attn_cpu.h"
#include "tile_io.h"
#include "tile_math.h"

namespace ism::cpu {

// Per-thread tile buffers of the forward (float32; no buffer grows with the sequence).
struct FwdScratch {
  std::vector<float> q, kt, v, s, acc, row_max, row_sum;
  std::vector<int> visible;
  explicit FwdScratch(int d_pad)
      : q(kTileQ * d_pad), kt(d_pad * kTileK), v(kTileK * d_pad), s(kTileQ * kTileK),
        acc(kTileQ * d_pad), row_max(kTileQ), row_sum(kTileQ), visible(kTileQ) {}
};

// Attends rows q(0..m) to keys/values k(j), v(j) for j < limit[r] (row r); writes out(0..m) and
// lse[0..m) (natural log; -inf and a zero output for rows that see nothing). `max_limit` is the
// largest limit of the m rows: key tiles at or past it are never read.
template <typename QRows, typename KRows, typename VRows, typename ORows>
void attend_query_tile(const QRows& q, int m, const int32_t* limit, int max_limit, const KRows& k, const VRows& v,
                       int d, float softmax_scale, const ORows& out, float* lse, FwdScratch& w) {
  const int d_pad = round_up_lanes(d);
  // Scores are formed in the log2 domain: fold softmax_scale * log2(e) into q once.
  load_tile(q, 0, m, d, softmax_scale * kLog2e, w.q.data(), d_pad);
  std::fill(w.acc.begin(), w.acc.end(), 0.f);
  std::fill(w.row_max.begin(), w.row_max.end(), -std::numeric_limits<float>::infinity());
  std::fill(w.row_sum.begin(), w.row_sum.end(), 0.f);

  const int n_tiles = key_tiles_to_visit(max_limit, kTileK);
  for (int t = 0; t < n_tiles; ++t) {
    const int k0 = t * kTileK;
    const int n = std::min(kTileK, max_limit - k0);  // keys past max_limit are invisible to all rows
    load_tile_transposed(k, k0, n, d, w.kt.data(), kTileK);
    load_tile(v, k0, n, d, 1.f, w.v.data(), d_pad);
    for (int r = 0; r < m; ++r) w.visible[r] = visible_keys(limit[r], k0, n);

    gemm_f32(m, kTileK, d, w.q.data(), d_pad, 1, w.kt.data(), kTileK, w.s.data(), kTileK, false);
    softmax_tile_update(w.s.data(), m, kTileK, w.visible.data(), w.row_max.data(), w.row_sum.data(),
                        w.acc.data(), d_pad, d_pad);
    gemm_f32(m, d_pad, n, w.s.data(), kTileK, 1, w.v.data(), d_pad, w.acc.data(), d_pad, true);
  }

  for (int r = 0; r < m; ++r) {
    const float l = w.row_sum[r];
    // An empty row (kv_limit = 0) has l = 0: output 0 and lse -inf, never 0/0.
    store_tile(w.acc.data() + r * d_pad, d_pad, 1, d, l > 0.f ? 1.f / l : 0.f, out, r);
    lse[r] = l > 0.f ? (w.row_max[r] + std::log2(l)) * kLn2 : -std::numeric_limits<float>::infinity();
  }
}

}  // namespace ism::cpu
