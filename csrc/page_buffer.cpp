#include "page_buffer.h"

#include <cstdlib>
#include <string>
#include <utility>

#include "error.h"

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace shortrt {

namespace {
constexpr size_t kHugePage = size_t{2} << 20;
}

PageBuffer::PageBuffer(size_t bytes, bool huge_pages) : size_(bytes) {
  // Rounded up to whole huge pages, so the advice covers the tail as well.
  const size_t rounded = (bytes + kHugePage - 1) / kHugePage * kHugePage;
  if (posix_memalign(&data_, kHugePage, rounded == 0 ? kHugePage : rounded) != 0) {
    data_ = nullptr;
    throw Error("out of memory: cannot allocate " + std::to_string(bytes) + " bytes for weights");
  }
#if defined(__linux__)
  if (rounded > 0) ::madvise(data_, rounded, huge_pages ? MADV_HUGEPAGE : MADV_NOHUGEPAGE);  // a hint; failure is harmless
#endif
}

PageBuffer::~PageBuffer() { std::free(data_); }

PageBuffer::PageBuffer(PageBuffer&& other) noexcept
    : data_(std::exchange(other.data_, nullptr)), size_(std::exchange(other.size_, 0)) {}

PageBuffer& PageBuffer::operator=(PageBuffer&& other) noexcept {
  if (this != &other) {
    std::free(data_);
    data_ = std::exchange(other.data_, nullptr);
    size_ = std::exchange(other.size_, 0);
  }
  return *this;
}

}  // namespace shortrt
