// SafetensorsFile: mmap + header validation (Checkpoint is in checkpoint.cpp).
#include "safetensors.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>

namespace shortrt {

// The safetensors library's limit (MAX_HEADER_SIZE); a longer header is a
// corrupt or hostile file, and we refuse to parse it rather than try.
static constexpr uint64_t kMaxHeaderBytes = 100'000'000;

// ---- dtypes ---------------------------------------------------------------

namespace {
struct DTypeInfo {
  DType dtype;
  const char* name;
  size_t bits;
};
constexpr DTypeInfo kDTypes[] = {
    {DType::F64, "F64", 64},        {DType::F32, "F32", 32},          {DType::F16, "F16", 16},
    {DType::BF16, "BF16", 16},      {DType::I64, "I64", 64},          {DType::I32, "I32", 32},
    {DType::I16, "I16", 16},        {DType::I8, "I8", 8},             {DType::U8, "U8", 8},
    {DType::BOOL, "BOOL", 8},       {DType::U16, "U16", 16},          {DType::U32, "U32", 32},
    {DType::U64, "U64", 64},        {DType::F4, "F4", 4},             {DType::F6_E2M3, "F6_E2M3", 6},
    {DType::F6_E3M2, "F6_E3M2", 6}, {DType::F8_E5M2, "F8_E5M2", 8},   {DType::F8_E4M3, "F8_E4M3", 8},
    {DType::F8_E8M0, "F8_E8M0", 8}, {DType::F8_E4M3FNUZ, "F8_E4M3FNUZ", 8},
    {DType::F8_E5M2FNUZ, "F8_E5M2FNUZ", 8}, {DType::C64, "C64", 64},
};

const DTypeInfo& dtype_info(DType dtype) {
  for (const auto& info : kDTypes)
    if (info.dtype == dtype) return info;
  throw Error("invalid DType value " + std::to_string(static_cast<int>(dtype)));
}
}  // namespace

const char* dtype_name(DType dtype) { return dtype_info(dtype).name; }
size_t dtype_bits(DType dtype) { return dtype_info(dtype).bits; }
size_t dtype_size(DType dtype) { return dtype_info(dtype).bits % 8 == 0 ? dtype_info(dtype).bits / 8 : 0; }

DType dtype_from_name(const std::string& name) {
  for (const auto& info : kDTypes)
    if (name == info.name) return info.dtype;
  throw Error("unknown dtype '" + name + "'");
}

std::string shape_string(const std::vector<int64_t>& shape) {
  std::string s = "[";
  for (size_t i = 0; i < shape.size(); ++i) {
    if (i) s += ", ";
    s += std::to_string(shape[i]);
  }
  return s + "]";
}

int64_t TensorView::numel() const {
  // Validated at load: without a zero dim the product is the tensor's size in
  // bits over the element's bits, so it fits; with one, the dims before it may
  // multiply past int64 (the library allows [2^32, 2^31, 0]), so look first.
  if (std::find(shape.begin(), shape.end(), 0) != shape.end()) return 0;
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

// ---- SafetensorsFile ------------------------------------------------------

namespace {

// What a non-regular file is, for the message refusing it.
const char* file_kind(mode_t mode) {
  if (S_ISDIR(mode)) return "a directory";
  if (S_ISFIFO(mode)) return "a FIFO (named pipe)";
  if (S_ISSOCK(mode)) return "a socket";
  if (S_ISCHR(mode)) return "a character device";
  if (S_ISBLK(mode)) return "a block device";
  return "not a regular file";
}

// A directory is an IsADirectoryError in Python; a FIFO, socket or device a
// FormatError, like any other file that is not a safetensors file.
[[noreturn]] void refuse_non_regular(const std::string& path, mode_t mode) {
  std::string what = "cannot open " + path + ": it is " + file_kind(mode) + ", not a safetensors file";
  if (S_ISDIR(mode)) throw OsError(what, EISDIR);
  throw Error(what);
}

}  // namespace

SafetensorsFile::SafetensorsFile(const std::string& path) : path_(path) {
  // Look before opening: opening a FIFO for reading blocks until a writer
  // appears, and opening a device can have side effects.
  struct stat st;
  if (::stat(path.c_str(), &st) != 0) throw os_error("cannot open", path);
  if (!S_ISREG(st.st_mode)) refuse_non_regular(path, st.st_mode);
  // O_NONBLOCK in case the path was swapped for a FIFO since the stat; fstat
  // then checks what was really opened.
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NONBLOCK | O_NOCTTY);
  if (fd < 0) throw os_error("cannot open", path);
  if (::fstat(fd, &st) != 0) {
    OsError err = os_error("cannot stat", path);
    ::close(fd);
    throw err;
  }
  if (!S_ISREG(st.st_mode)) {
    ::close(fd);
    refuse_non_regular(path, st.st_mode);
  }
  file_size_ = static_cast<size_t>(st.st_size);
  if (file_size_ < 8) {
    ::close(fd);
    throw Error(path + ": file is " + std::to_string(file_size_) +
                " bytes, too short for a safetensors file (the header length alone takes 8)");
  }
  void* map = ::mmap(nullptr, file_size_, PROT_READ, MAP_PRIVATE, fd, 0);
  if (map == MAP_FAILED) {
    OsError err = os_error("cannot mmap", path);
    ::close(fd);
    throw err;
  }
  ::close(fd);  // the mapping keeps the file open
  map_ = static_cast<const uint8_t*>(map);
  try {
    SafetensorsContents contents = parse_safetensors(map_, file_size_, path_);
    header_size_ = contents.header_size;
    tensors_ = std::move(contents.tensors);
    metadata_ = std::move(contents.metadata);
  } catch (...) {
    ::munmap(const_cast<uint8_t*>(map_), file_size_);
    map_ = nullptr;
    throw;
  }
  for (size_t i = 0; i < tensors_.size(); ++i) index_.emplace(tensors_[i].name, i);
}

SafetensorsFile::~SafetensorsFile() {
  if (map_) ::munmap(const_cast<uint8_t*>(map_), file_size_);
}

SafetensorsFile::SafetensorsFile(SafetensorsFile&& other) noexcept
    : path_(std::move(other.path_)),
      map_(other.map_),
      file_size_(other.file_size_),
      header_size_(other.header_size_),
      tensors_(std::move(other.tensors_)),
      index_(std::move(other.index_)),
      metadata_(std::move(other.metadata_)) {
  other.map_ = nullptr;
  other.file_size_ = 0;
}

SafetensorsFile& SafetensorsFile::operator=(SafetensorsFile&& other) noexcept {
  if (this != &other) {
    if (map_) ::munmap(const_cast<uint8_t*>(map_), file_size_);
    path_ = std::move(other.path_);
    map_ = other.map_;
    file_size_ = other.file_size_;
    header_size_ = other.header_size_;
    tensors_ = std::move(other.tensors_);
    index_ = std::move(other.index_);
    metadata_ = std::move(other.metadata_);
    other.map_ = nullptr;
    other.file_size_ = 0;
  }
  return *this;
}

namespace {

// Rust's str::from_utf8: no overlong forms, no surrogates, nothing past U+10FFFF.
// Returns the offset of the first invalid byte, or npos.
size_t invalid_utf8_at(const uint8_t* s, size_t n) {
  for (size_t i = 0; i < n;) {
    uint8_t c = s[i];
    if (c < 0x80) { ++i; continue; }
    size_t len = c >= 0xc2 && c <= 0xdf ? 2 : c >= 0xe0 && c <= 0xef ? 3 : c >= 0xf0 && c <= 0xf4 ? 4 : 0;
    if (len == 0 || i + len > n) return i;
    uint8_t lo = 0x80, hi = 0xbf;  // allowed range of the second byte
    if (c == 0xe0) lo = 0xa0;
    if (c == 0xed) hi = 0x9f;
    if (c == 0xf0) lo = 0x90;
    if (c == 0xf4) hi = 0x8f;
    if (s[i + 1] < lo || s[i + 1] > hi) return i;
    for (size_t k = 2; k < len; ++k)
      if ((s[i + k] & 0xc0) != 0x80) return i;
    i += len;
  }
  return std::string::npos;
}

std::string range_string(uint64_t begin, uint64_t end) {
  return "[" + std::to_string(begin) + ", " + std::to_string(end) + "]";
}

// Header entry -> TensorView (data pointer and absolute offset left for the
// caller), with the library's size rules. Messages are relative to the tensor.
TensorView make_view(const HeaderTensor& h, uint64_t data_size) {
  TensorView view;
  view.name = h.name;
  view.dtype = h.dtype;
  // Like the library: numel multiplied out dim by dim with overflow checks
  // (so [0, 2^40, 2^40] is fine and [2^40, 2^40, 0] is not), then numel * bits.
  uint64_t numel = 1, nbits = 0;
  bool overflow = false;
  for (uint64_t dim : h.shape) overflow = overflow || __builtin_mul_overflow(numel, dim, &numel);
  overflow = overflow || __builtin_mul_overflow(numel, static_cast<uint64_t>(dtype_bits(h.dtype)), &nbits);
  std::string shape = "[";
  for (size_t i = 0; i < h.shape.size(); ++i) shape += (i ? ", " : "") + std::to_string(h.shape[i]);
  shape += "]";
  if (overflow) throw Error("shape " + shape + " is too large (element count overflows)");
  if (nbits % 8 != 0)
    throw Error("shape " + shape + " of " + dtype_name(h.dtype) + " is " + std::to_string(nbits) +
                " bits, not a whole number of bytes");
  for (size_t i = 0; i < h.shape.size(); ++i) {
    if (h.shape[i] > static_cast<uint64_t>(INT64_MAX))
      throw Error("shape dim " + std::to_string(i) + " is " + std::to_string(h.shape[i]) +
                  ", beyond the 2^63 - 1 shortrt supports");
    view.shape.push_back(static_cast<int64_t>(h.shape[i]));
  }
  const uint64_t nbytes = nbits / 8;
  const std::string range = range_string(h.begin, h.end);
  if (h.begin > h.end) throw Error("data_offsets " + range + " has begin > end");
  if (h.end > data_size)
    throw Error("data_offsets " + range + " extend beyond the data section (" + std::to_string(data_size) +
                " bytes; file truncated?)");
  if (h.end - h.begin != nbytes)
    throw Error("data_offsets " + range + " span " + std::to_string(h.end - h.begin) + " bytes, but shape " + shape +
                " of " + dtype_name(h.dtype) + " needs " + std::to_string(nbytes));
  view.offset = static_cast<size_t>(h.begin);
  view.nbytes = static_cast<size_t>(nbytes);
  return view;
}

}  // namespace

SafetensorsContents parse_safetensors(const uint8_t* data, size_t size, const std::string& name) {
  if (size < 8)
    throw Error(name + ": file is " + std::to_string(size) +
                " bytes, too short for a safetensors file (the header length alone takes 8)");
  uint64_t header_len = 0;
  for (int i = 7; i >= 0; --i) header_len = (header_len << 8) | data[i];  // little-endian
  if (header_len > kMaxHeaderBytes)
    throw Error(name + ": header length " + std::to_string(header_len) + " is larger than the limit of " +
                std::to_string(kMaxHeaderBytes) + " bytes (corrupt or not a safetensors file)");
  if (header_len > size - 8)
    throw Error(name + ": header length " + std::to_string(header_len) + " exceeds the " + std::to_string(size - 8) +
                " bytes after the length field (file truncated?)");
  SafetensorsContents out;
  out.header_size = static_cast<size_t>(header_len);
  const uint8_t* header = data + 8;
  size_t bad = invalid_utf8_at(header, out.header_size);
  if (bad != std::string::npos) {
    char byte[8];
    std::snprintf(byte, sizeof byte, "0x%02x", header[bad]);
    throw Error(name + ": header is not valid UTF-8 (byte " + byte + " at header byte " + std::to_string(bad) + ")");
  }
  HeaderContents parsed;
  try {
    parsed = parse_header_json(std::string_view(reinterpret_cast<const char*>(header), out.header_size));
  } catch (const Error& e) {
    throw Error(name + ": " + e.what());
  }
  out.metadata = std::move(parsed.metadata);

  const size_t data_start = 8 + out.header_size;
  const uint64_t data_size = size - data_start;
  for (const HeaderTensor& h : parsed.tensors) {
    try {
      out.tensors.push_back(make_view(h, data_size));
    } catch (const Error& e) {
      throw Error(name + ": tensor " + quoted(h.name) + ": " + e.what());
    }
  }
  std::sort(out.tensors.begin(), out.tensors.end(), [](const TensorView& a, const TensorView& b) {
    if (a.offset != b.offset) return a.offset < b.offset;
    if (a.nbytes != b.nbytes) return a.nbytes < b.nbytes;
    return a.name < b.name;
  });
  // Sorted by (begin, end), the tensors must tile the data section: each one
  // begins where the previous ended. Bytes no tensor covers are a wrong header
  // length or a corrupt writer (they once loaded as shifted, garbage weights).
  size_t covered = 0;  // end of the tiling so far
  const TensorView* prev = nullptr;
  for (const TensorView& t : out.tensors) {
    if (t.offset < covered)
      throw Error(name + ": tensors " + quoted(prev->name) + " and " + quoted(t.name) +
                  " overlap in the data section (" + quoted(t.name) + " begins at " + std::to_string(t.offset) +
                  ", before " + std::to_string(covered) + ")");
    if (t.offset > covered)
      throw Error(name + ": data bytes " + range_string(covered, t.offset) + " belong to no tensor (" +
                  (prev ? "a gap between " + quoted(prev->name) + " and " + quoted(t.name)
                        : "the first tensor, " + quoted(t.name) + ", must begin at 0") +
                  ")");
    covered = t.offset + t.nbytes;
    prev = &t;
  }
  if (covered != data_size)
    throw Error(name + ": data bytes " + range_string(covered, data_size) + " after " +
                (prev ? "the last tensor, " + quoted(prev->name) + "," : "the header") +
                " belong to no tensor (wrong header length, or trailing bytes)");
  for (TensorView& t : out.tensors) {
    t.offset += data_start;
    t.data = data + t.offset;
  }
  return out;
}

const TensorView* SafetensorsFile::find(const std::string& name) const {
  auto it = index_.find(name);
  return it == index_.end() ? nullptr : &tensors_[it->second];
}

const TensorView& SafetensorsFile::get(const std::string& name) const {
  const TensorView* t = find(name);
  if (!t) throw Error("tensor '" + name + "' not found in " + path_);
  return *t;
}

std::vector<std::string> SafetensorsFile::names() const {
  std::vector<std::string> out;
  out.reserve(tensors_.size());
  for (const auto& t : tensors_) out.push_back(t.name);
  return out;
}

void SafetensorsFile::prefetch() const {
  if (map_) ::madvise(const_cast<uint8_t*>(map_), file_size_, MADV_WILLNEED);
}

}  // namespace shortrt
