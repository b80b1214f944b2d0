// Heavy-first dynamic scheduling of tiles over ATen's intra-op thread pool.
//
// Under ISM and causal layouts the work of a tile varies by orders of magnitude (the last query
// tiles of a long sequence see all keys, the first see a few). A static split of the tile range
// leaves threads idle at the end, so the tiles are sorted by their cost, largest first, and each
// thread takes the next one from a shared counter (longest-processing-time-first scheduling).
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <vector>

namespace ism::cpu {

struct WorkItem {
  int32_t seq;    // sequence index
  int32_t head;   // query head (forward, dq) or key/value head (dk/dv)
  int32_t tile;   // tile index inside the sequence
  int64_t cost;   // estimate used for ordering only
};

// Calls fn(item, scratch) once per item; `make_scratch()` builds one scratch per thread.
template <typename MakeScratch, typename Fn>
void run_heavy_first(std::vector<WorkItem>& items, MakeScratch make_scratch, Fn fn) {
  std::stable_sort(items.begin(), items.end(),
                   [](const WorkItem& a, const WorkItem& b) { return a.cost > b.cost; });
  std::atomic<size_t> next{0};
  const int64_t n_workers = std::min<int64_t>(at::get_num_threads(), static_cast<int64_t>(items.size()));
  at::parallel_for(0, n_workers, 1, [&](int64_t, int64_t) {
    auto scratch = make_scratch();
    for (size_t i = next.fetch_add(1); i < items.size(); i = next.fetch_add(1)) fn(items[i], scratch);
  });
}

}  // namespace ism::cpu
