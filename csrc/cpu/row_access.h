// Where the rows of a tensor live: small accessors, `rows(i)` -> pointer to row i, so that one kernel
// serves strided tensors, a query group of several heads and paged KV caches. `run(r0, n)` is how many of
// rows r0 .. r0 + n - 1, from r0 on, are evenly spaced, `run_stride()` their spacing: a kernel reads a run
// in place instead of copying it into a tile buffer.
//
// Included before any instruction-set pragma (see kernels_avx2.cpp): these are plain code, shared by all
// instruction-set builds.
#pragma once

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <utility>

namespace ism::cpu {

// Row i at base + i * stride (elements).
template <typename T>
struct StridedRows {
  T* base;
  int64_t stride;
  T* operator()(int64_t i) const { return base + i * stride; }
  int run(int64_t, int n) const { return n; }
  int64_t run_stride() const { return stride; }
};

template <typename T>
StridedRows<T> strided_rows(T* base, int64_t stride) {
  return {base, stride};
}

// Row i of one head of a paged cache: page table[i / page_size], slot i % page_size.
template <typename T>
struct PagedRows {
  T* pages;  // cache base already offset to the head
  int64_t page_stride, row_stride;
  const int32_t* table;  // this sequence's block-table row
  int page_size;
  T* operator()(int64_t i) const { return pages + table[i / page_size] * page_stride + (i % page_size) * row_stride; }
  int run(int64_t r0, int n) const { return std::min<int64_t>(n, page_size - r0 % page_size); }
  int64_t run_stride() const { return row_stride; }
};

// Row r of the query heads h0 .. h0 + group - 1 that share one K/V head, head-major: head h0 + r / seqlen,
// position r % seqlen. Decode packs a GQA group into one tile this way, so the group reads each K/V tile
// of the cache once instead of once per query head.
template <typename T>
struct GroupedRows {
  T* base;  // row 0 of head h0
  int64_t row_stride, head_stride;
  int seqlen;
  T* operator()(int64_t r) const { return base + (r % seqlen) * row_stride + (r / seqlen) * head_stride; }
  int run(int64_t, int) const { return 1; }  // head-major rows: never read as one run
  int64_t run_stride() const { return row_stride; }
};

// Rows i0, i0 + 1, ... of an accessor as rows 0, 1, ...: one key chunk of a split cache.
template <typename Rows>
struct OffsetRows {
  Rows rows;
  int64_t i0;
  auto operator()(int64_t i) const { return rows(i0 + i); }
  int run(int64_t r0, int n) const { return rows.run(i0 + r0, n); }
  int64_t run_stride() const { return rows.run_stride(); }
};

template <typename Rows>
using row_element_t = std::remove_const_t<std::remove_pointer_t<decltype(std::declval<Rows>()(0))>>;

}  // namespace ism::cpu
