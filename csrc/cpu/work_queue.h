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
#include <utility>
#include <vector>

namespace ism::cpu {

struct WorkItem {
  int32_t seq;    // sequence index
  int32_t head;   // query head (forward, dq) or key/value head (dk/dv)
  int32_t tile;   // tile index inside the sequence
  int64_t cost;   // estimate used for ordering only
};

// Calls fn(item, scratch) once per item, in the order of `items`, each thread taking the next one;
// `make_scratch()` builds one scratch per thread.
template <typename MakeScratch, typename Fn>
void run_in_order(const std::vector<WorkItem>& items, MakeScratch make_scratch, Fn fn) {
  std::atomic<size_t> next{0};
  const int64_t n_workers = std::min<int64_t>(at::get_num_threads(), static_cast<int64_t>(items.size()));
  at::parallel_for(0, n_workers, 1, [&](int64_t, int64_t) {
    auto scratch = make_scratch();
    for (size_t i = next.fetch_add(1); i < items.size(); i = next.fetch_add(1)) fn(items[i], scratch);
  });
}

// The items, largest cost first.
template <typename MakeScratch, typename Fn>
void run_heavy_first(std::vector<WorkItem>& items, MakeScratch make_scratch, Fn fn) {
  std::stable_sort(items.begin(), items.end(), [](const WorkItem& a, const WorkItem& b) { return a.cost > b.cost; });
  run_in_order(items, make_scratch, fn);
}

// The items of one (sequence, head) together, so that a thread's next tile reads the keys and values its last
// one left in its cache; the heaviest (sequence, head) first and, inside one, the heaviest tile first, so the
// run still ends on the lightest tiles.
template <typename MakeScratch, typename Fn>
void run_by_head_heavy_first(std::vector<WorkItem>& items, MakeScratch make_scratch, Fn fn) {
  std::vector<std::pair<int64_t, int64_t>> totals;  // ((seq, head) key, summed cost)
  auto key = [](const WorkItem& w) { return (static_cast<int64_t>(w.seq) << 32) | static_cast<uint32_t>(w.head); };
  std::vector<WorkItem> sorted_items(items);
  std::sort(sorted_items.begin(), sorted_items.end(),
            [&](const WorkItem& a, const WorkItem& b) { return key(a) < key(b); });
  for (const WorkItem& w : sorted_items) {
    if (totals.empty() || totals.back().first != key(w)) totals.push_back({key(w), 0});
    totals.back().second += w.cost;
  }
  auto total_of = [&](const WorkItem& w) {
    return std::lower_bound(totals.begin(), totals.end(), std::make_pair(key(w), INT64_MIN))->second;
  };
  std::stable_sort(items.begin(), items.end(), [&](const WorkItem& a, const WorkItem& b) {
    const int64_t ta = total_of(a), tb = total_of(b);
    if (ta != tb) return ta > tb;
    if (key(a) != key(b)) return key(a) < key(b);
    return a.cost > b.cost;
  });
  run_in_order(items, make_scratch, fn);
}

}  // namespace ism::cpu
