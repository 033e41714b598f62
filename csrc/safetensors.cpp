// SafetensorsFile: mmap + header validation (Checkpoint is in checkpoint.cpp).
#include "safetensors.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>

#include "json.h"

namespace shortrt {

// A real header is a few KB per thousand tensors; a length beyond this is a
// corrupt or hostile file, and we refuse to parse it rather than try.
static constexpr uint64_t kMaxHeaderBytes = 100u << 20;

// ---- dtypes ---------------------------------------------------------------

namespace {
struct DTypeInfo {
  DType dtype;
  const char* name;
  size_t size;
};
constexpr DTypeInfo kDTypes[] = {
    {DType::F64, "F64", 8}, {DType::F32, "F32", 4}, {DType::F16, "F16", 2},   {DType::BF16, "BF16", 2},
    {DType::I64, "I64", 8}, {DType::I32, "I32", 4}, {DType::I16, "I16", 2},   {DType::I8, "I8", 1},
    {DType::U8, "U8", 1},   {DType::BOOL, "BOOL", 1}, {DType::U16, "U16", 2}, {DType::U32, "U32", 4},
    {DType::U64, "U64", 8},
};

const DTypeInfo& dtype_info(DType dtype) {
  for (const auto& info : kDTypes)
    if (info.dtype == dtype) return info;
  throw Error("invalid DType value " + std::to_string(static_cast<int>(dtype)));
}
}  // namespace

const char* dtype_name(DType dtype) { return dtype_info(dtype).name; }
size_t dtype_size(DType dtype) { return dtype_info(dtype).size; }

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
  int64_t n = 1;
  for (int64_t d : shape) {
    if (d == 0) return 0;
    n *= d;  // validated at load: the product of non-zero dims fits int64
  }
  return n;
}

// ---- SafetensorsFile ------------------------------------------------------

SafetensorsFile::SafetensorsFile(const std::string& path) : path_(path) {
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) throw os_error("cannot open", path);
  struct stat st;
  if (::fstat(fd, &st) != 0) {
    OsError err = os_error("cannot stat", path);
    ::close(fd);
    throw err;
  }
  if (S_ISDIR(st.st_mode)) {
    ::close(fd);
    throw OsError("cannot open " + path + ": is a directory, not a safetensors file", EISDIR);
  }
  if (!S_ISREG(st.st_mode)) {
    ::close(fd);
    throw Error(path + ": not a regular file");
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
    parse_header();
  } catch (...) {
    ::munmap(const_cast<uint8_t*>(map_), file_size_);
    map_ = nullptr;
    throw;
  }
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

// Reads a JSON number that must be a non-negative integer (a dim or offset).
uint64_t non_negative_int(const json::Value& v, const std::string& what) {
  if (!v.is_number() || !v.is_integer()) throw Error(what + " is not an integer");
  int64_t i = v.as_int();
  if (i < 0) throw Error(what + " is negative (" + std::to_string(i) + ")");
  return static_cast<uint64_t>(i);
}

const json::Value& required(const json::Value& entry, const char* key) {
  const json::Value* v = entry.find(key);
  if (!v) throw Error(std::string("missing '") + key + "'");
  return *v;
}

// One header entry -> a TensorView (without its data pointer). Messages are
// relative; the caller prefixes the file and tensor name.
TensorView parse_entry(const std::string& name, const json::Value& entry, uint64_t data_size) {
  if (!entry.is_object()) throw Error(std::string("entry is a JSON ") + json::type_name(entry.type()) + ", not an object");
  TensorView view;
  view.name = name;

  const json::Value& dtype = required(entry, "dtype");
  if (!dtype.is_string()) throw Error("'dtype' is not a string");
  view.dtype = dtype_from_name(dtype.as_string());

  const json::Value& shape = required(entry, "shape");
  if (!shape.is_array()) throw Error("'shape' is not an array");
  // The product of the non-zero dims must fit, even when a zero dim makes the
  // tensor empty, so that numel() can never overflow later.
  uint64_t nonzero_product = 1;
  bool has_zero = false, overflow = false;
  for (size_t i = 0; i < shape.as_array().size(); ++i) {
    uint64_t dim = non_negative_int(shape.as_array()[i], "shape dim " + std::to_string(i));
    view.shape.push_back(static_cast<int64_t>(dim));
    if (dim == 0) has_zero = true;
    else overflow = overflow || __builtin_mul_overflow(nonzero_product, dim, &nonzero_product);
  }
  uint64_t nbytes = 0;
  overflow = overflow || nonzero_product > static_cast<uint64_t>(INT64_MAX) ||
             __builtin_mul_overflow(nonzero_product, dtype_size(view.dtype), &nbytes);
  if (overflow) throw Error("shape " + shape_string(view.shape) + " is too large (element count overflows)");
  if (has_zero) nbytes = 0;

  const json::Value& offsets = required(entry, "data_offsets");
  if (!offsets.is_array() || offsets.as_array().size() != 2)
    throw Error("'data_offsets' is not an array of two integers");
  uint64_t begin = non_negative_int(offsets.as_array()[0], "data_offsets[0]");
  uint64_t end = non_negative_int(offsets.as_array()[1], "data_offsets[1]");
  std::string range = "[" + std::to_string(begin) + ", " + std::to_string(end) + "]";
  if (begin > end) throw Error("data_offsets " + range + " has begin > end");
  if (end > data_size)
    throw Error("data_offsets " + range + " extend beyond the data section (" + std::to_string(data_size) +
                " bytes; file truncated?)");
  if (end - begin != nbytes)
    throw Error("data_offsets " + range + " span " + std::to_string(end - begin) + " bytes, but shape " +
                shape_string(view.shape) + " of " + dtype_name(view.dtype) + " needs " + std::to_string(nbytes));
  view.offset = static_cast<size_t>(begin);  // relative for now; made absolute by the caller
  view.nbytes = static_cast<size_t>(nbytes);
  return view;
}

}  // namespace

void SafetensorsFile::parse_header() {
  uint64_t header_len = 0;
  for (int i = 7; i >= 0; --i) header_len = (header_len << 8) | map_[i];  // little-endian
  if (header_len > kMaxHeaderBytes)
    throw Error(path_ + ": header length " + std::to_string(header_len) + " is larger than the " +
                std::to_string(kMaxHeaderBytes >> 20) + " MB limit (corrupt or not a safetensors file)");
  if (header_len > file_size_ - 8)
    throw Error(path_ + ": header length " + std::to_string(header_len) + " exceeds the " +
                std::to_string(file_size_ - 8) + " bytes after the length field (file truncated?)");
  header_size_ = static_cast<size_t>(header_len);

  json::Value header;
  try {
    header = json::parse(std::string_view(reinterpret_cast<const char*>(map_ + 8), header_size_));
  } catch (const Error& e) {
    throw Error(path_ + ": header is not valid JSON (" + e.what() + ")");
  }
  if (!header.is_object())
    throw Error(path_ + ": header is a JSON " + json::type_name(header.type()) + ", not an object");

  const size_t data_start = 8 + header_size_;
  const uint64_t data_size = file_size_ - data_start;
  for (const auto& [key, entry] : header.as_object()) {
    if (key == "__metadata__") {
      if (!entry.is_object()) throw Error(path_ + ": __metadata__ is not a JSON object");
      for (const auto& [mkey, mvalue] : entry.as_object()) {
        if (!mvalue.is_string())
          throw Error(path_ + ": __metadata__ value for '" + mkey + "' is a " + json::type_name(mvalue.type()) +
                      ", not a string");
        metadata_[mkey] = mvalue.as_string();
      }
      continue;
    }
    try {
      tensors_.push_back(parse_entry(key, entry, data_size));
    } catch (const Error& e) {
      throw Error(path_ + ": tensor '" + key + "': " + e.what());
    }
  }

  std::sort(tensors_.begin(), tensors_.end(), [](const TensorView& a, const TensorView& b) {
    return a.offset != b.offset ? a.offset < b.offset : a.name < b.name;
  });
  // Sorted by begin, non-empty tensors overlap iff one begins before the
  // furthest end seen so far. Empty tensors occupy no bytes and never overlap.
  const TensorView* furthest = nullptr;
  for (const TensorView& t : tensors_) {
    if (t.nbytes == 0) continue;
    if (furthest && t.offset < furthest->offset + furthest->nbytes)
      throw Error(path_ + ": tensors '" + furthest->name + "' and '" + t.name + "' overlap in the data section");
    if (!furthest || t.offset + t.nbytes > furthest->offset + furthest->nbytes) furthest = &t;
  }
  for (size_t i = 0; i < tensors_.size(); ++i) {
    TensorView& t = tensors_[i];
    t.offset += data_start;
    t.data = map_ + t.offset;
    index_.emplace(t.name, i);
  }
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
