// Large, page-aligned memory for weights that are streamed every token.
//
// Decode reads every weight once per token, so it runs at the speed memory
// can be streamed. In 4 KB pages that stream crosses a page (a TLB miss, and a
// stop for the hardware prefetchers) every 4 KB; backed by transparent 2 MB
// pages it measured 1.3-1.5x the read bandwidth on this project's machine
// (benchmarks/kernels.py prints both). Linux only backs a region with huge
// pages when it is 2 MB-aligned and advised so (THP "madvise" mode), which is
// what this buffer does.
#pragma once

#include <cstddef>

namespace shortrt {

class PageBuffer {
 public:
  PageBuffer() = default;
  // Uninitialized, 2 MB-aligned storage of `bytes` bytes; huge_pages asks the
  // kernel to back it with transparent huge pages (a hint: it may decline).
  // Throws shortrt::Error when the memory cannot be had.
  explicit PageBuffer(size_t bytes, bool huge_pages = true);
  ~PageBuffer();
  PageBuffer(PageBuffer&& other) noexcept;
  PageBuffer& operator=(PageBuffer&& other) noexcept;
  PageBuffer(const PageBuffer&) = delete;
  PageBuffer& operator=(const PageBuffer&) = delete;

  void* data() const { return data_; }
  template <class T>
  T* as() const { return static_cast<T*>(data_); }
  size_t size() const { return size_; }

 private:
  void* data_ = nullptr;
  size_t size_ = 0;
};

}  // namespace shortrt
