// Per-thread tile buffers that are not zeroed when allocated: every kernel writes a buffer's elements before it
// reads them (padding lanes included), and zeroing the forward's ~200 KB of tiles cost more than a decode step's
// attention over a short cache. Build with -DISM_POISON_SCRATCH to fill them with NaN instead, which makes a
// read before a write show up in the tests' outputs.
//
// Included before any instruction-set pragma (see isa_prelude.h): plain code.
#pragma once

#include <cstddef>
#include <limits>
#include <memory>

namespace ism::cpu {

template <typename T>
class ScratchBuffer {
 public:
  explicit ScratchBuffer(size_t n) : data_(new T[n]), size_(n) {
#if defined(ISM_POISON_SCRATCH)
    for (size_t i = 0; i < n; ++i) data_[i] = poison();
#endif
  }
  T* data() { return data_.get(); }
  T* begin() { return data_.get(); }
  T* end() { return data_.get() + size_; }
  T& operator[](size_t i) { return data_[i]; }
  const T& operator[](size_t i) const { return data_[i]; }

 private:
  static T poison() {
    if constexpr (std::numeric_limits<T>::has_quiet_NaN) {
      return std::numeric_limits<T>::quiet_NaN();
    } else {
      return std::numeric_limits<T>::min();
    }
  }
  std::unique_ptr<T[]> data_;
  size_t size_;
};

}  // namespace ism::cpu
