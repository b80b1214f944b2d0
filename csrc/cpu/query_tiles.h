// The query tiles of a packed batch and the largest kv_limit of each: the one number that decides
// which key tiles a query tile visits (tile_range.h). Computed once per call and shared by the
// forward, the dq pass and the dk/dv pass (which skips query tiles that cannot see its key tile).
#pragma once

#include <algorithm>
#include <vector>

#include "../ism_params.h"
#include "segment_attn_cpu.h"
#include "work_queue.h"

namespace ism::cpu {

struct QueryTiles {
  std::vector<int> offset;     // [batch + 1]: tiles of sequence b are offset[b] .. offset[b + 1] - 1
  std::vector<int> max_limit;  // [total tiles]

  explicit QueryTiles(const SegmentAttnFwdParams& p) : offset(p.batch + 1, 0) {
    for (int b = 0; b < p.batch; ++b) {
      const int q_begin = p.cu_seqlens_q[b], len = p.cu_seqlens_q[b + 1] - q_begin;
      offset[b + 1] = offset[b] + (len + kTileQ - 1) / kTileQ;
      for (int r0 = 0; r0 < len; r0 += kTileQ) {
        const int32_t* first = p.kv_limit + q_begin + r0;
        max_limit.push_back(*std::max_element(first, first + std::min(kTileQ, len - r0)));
      }
    }
  }

  int count(int seq) const { return offset[seq + 1] - offset[seq]; }
  int max_limit_of(int seq, int tile) const { return max_limit[offset[seq] + tile]; }

  // One work item per (sequence, query head, query tile), costed by rows x largest kv_limit.
  std::vector<WorkItem> items(const SegmentAttnFwdParams& p) const;
};

// Rows of query tile `tile` of a sequence with `len` queries.
inline int tile_rows(int len, int tile) { return std::min(kTileQ, len - tile * kTileQ); }

inline std::vector<WorkItem> QueryTiles::items(const SegmentAttnFwdParams& p) const {
  std::vector<WorkItem> out;
  for (int b = 0; b < p.batch; ++b) {
    const int len = p.cu_seqlens_q[b + 1] - p.cu_seqlens_q[b];
    for (int t = 0; t < count(b); ++t) {
      const int64_t cost = static_cast<int64_t>(tile_rows(len, t)) * max_limit_of(b, t) + 1;
      for (int h = 0; h < p.h_q; ++h) out.push_back({b, h, t, cost});
    }
  }
  return out;
}

}  // namespace ism::cpu
