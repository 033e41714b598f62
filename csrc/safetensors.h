// Zero-copy reader for safetensors files and checkpoint directories.
//
// File layout: an 8-byte little-endian header length N, N bytes of JSON
// header {"name": {"dtype": "F32", "shape": [..], "data_offsets": [begin, end]},
// ..., "__metadata__": {"k": "v"}}, then the data section; offsets are
// relative to the start of the data section (byte 8 + N).
//
// The reader accepts exactly the files the `safetensors` library (0.8.0, the
// oracle tests/test_safetensors.py checks us against) accepts, so a file that
// loads here loads there and vice versa. Its rules, established by probing the
// library (see tests/data/make_safetensors_corpus.py):
//   - N <= 100,000,000 and 8 + N <= file size; the header is valid UTF-8 and
//     one JSON object, optionally followed by spaces/tabs/newlines (the
//     library's padding); nothing else may follow it.
//   - JSON as serde_json reads it: at most 127 nested containers, numbers that
//     overflow a double are an error, lone surrogates are an error.
//   - "__metadata__" at most once: null or an object of string -> string
//     (a repeated key inside it: the last one wins).
//   - Every other key is a tensor (a repeated name: the last one wins, but
//     every copy must be well formed): an object with exactly one each of
//     "dtype", "shape", "data_offsets" (other keys ignored), or the array
//     [dtype, shape, data_offsets]. dtype is a known name (or {"NAME": null});
//     dims and offsets are non-negative integers written without sign,
//     fraction or exponent, up to 2^64 - 1.
//   - Sorted by (begin, end), the tensors tile the data section exactly: the
//     first begins at 0, each begins where the previous ended, the last ends at
//     the end of the file. No gaps, no overlaps, no trailing bytes.
//   - end - begin == numel * bits / 8, numel computed dim by dim without
//     overflow, and a whole number of bytes for the 4- and 6-bit types.
// One deliberate difference: a dim above 2^63 - 1 (the library allows it in
// an empty tensor, e.g. [2^64 - 1, 0]) is refused, since shapes here are int64.
//
// A corrupt or hostile file throws shortrt::Error with one line naming the
// file and the problem; it never leads to an out-of-bounds read. Paths that
// are not regular files (directories, FIFOs, devices) are refused before
// anything reads from them, without blocking.
//
// Alignment: TensorView::data is only as aligned as the writer made it. The
// safetensors library pads the header to a multiple of 8 and lays tensors out
// back to back, so data is aligned to its element size in practice, but a
// reader must not assume more than byte alignment for arbitrary files.
#pragma once

#include <cstddef>
#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

#include "error.h"

namespace shortrt {

// F64..BOOL are the types the runtime reads; the others exist so that files
// holding them still open (their tensors are simply not used by the engine).
// F4 is 4 bits and F6_* 6 bits per element, packed.
enum class DType {
  F64, F32, F16, BF16, I64, I32, I16, I8, U8, BOOL, U16, U32, U64,
  F4, F6_E2M3, F6_E3M2, F8_E5M2, F8_E4M3, F8_E8M0, F8_E4M3FNUZ, F8_E5M2FNUZ, C64,
};

const char* dtype_name(DType dtype);  // the safetensors spelling: "F32", "BF16", ...
size_t dtype_bits(DType dtype);       // bits per element
size_t dtype_size(DType dtype);       // bytes per element; 0 for the sub-byte F4 and F6_* types
// Throws Error("unknown dtype '<name>'") for names outside DType.
DType dtype_from_name(const std::string& name);

// "[a, b, c]" for messages.
std::string shape_string(const std::vector<int64_t>& shape);

struct TensorView {
  std::string name;
  DType dtype = DType::F32;
  std::vector<int64_t> shape;
  const uint8_t* data = nullptr;  // zero-copy pointer into the file mapping
  size_t nbytes = 0;
  size_t offset = 0;              // byte offset of data within the file
  int64_t numel() const;          // product of shape; 1 for a scalar
};

// A whole safetensors file image, parsed and validated (see the rules above).
struct SafetensorsContents {
  size_t header_size = 0;                     // N, the JSON header's length
  std::vector<TensorView> tensors;            // data-offset order; data points into the image
  std::map<std::string, std::string> metadata;
};

// Parses a file image held in memory (the path-based reader maps the file and
// calls this). `name` starts every error message. The views point into
// `data`, which must outlive them.
SafetensorsContents parse_safetensors(const uint8_t* data, size_t size, const std::string& name);

// The JSON header alone, as the safetensors library reads it (in
// safetensors_header.cpp). Throws Error with a message relative to the header
// ("header is not valid JSON (...)", "tensor 'a': ..."); the caller adds the
// file name. Dims and offsets are unchecked against each other and the file.
struct HeaderTensor {
  std::string name;
  DType dtype = DType::F32;
  std::vector<uint64_t> shape;
  uint64_t begin = 0, end = 0;
};
struct HeaderContents {
  std::vector<HeaderTensor> tensors;  // header order; a repeated name keeps its last entry
  std::map<std::string, std::string> metadata;
};
HeaderContents parse_header_json(std::string_view text);

// `s` in single quotes for a one-line message: control bytes escaped, and cut
// with "..." past 120 bytes.
std::string quoted(const std::string& s);

class SafetensorsFile {
 public:
  explicit SafetensorsFile(const std::string& path);  // throws Error / OsError
  ~SafetensorsFile();
  SafetensorsFile(const SafetensorsFile&) = delete;
  SafetensorsFile& operator=(const SafetensorsFile&) = delete;
  // Moving keeps every TensorView::data valid: the mapping itself stays put.
  SafetensorsFile(SafetensorsFile&& other) noexcept;
  SafetensorsFile& operator=(SafetensorsFile&& other) noexcept;

  const std::string& path() const { return path_; }
  size_t file_size() const { return file_size_; }
  size_t header_size() const { return header_size_; }  // N, the JSON header's length
  size_t size() const { return tensors_.size(); }      // number of tensors
  bool has(const std::string& name) const { return index_.count(name) != 0; }
  const TensorView& get(const std::string& name) const;  // Error("tensor 'x' not found in <path>")
  const TensorView* find(const std::string& name) const;  // nullptr if absent
  const std::vector<TensorView>& tensors() const { return tensors_; }  // data-offset order
  std::vector<std::string> names() const;                              // data-offset order
  const std::map<std::string, std::string>& metadata() const { return metadata_; }

  // Ask the kernel to read the whole file ahead (madvise WILLNEED); a hint only.
  void prefetch() const;

 private:
  std::string path_;
  const uint8_t* map_ = nullptr;
  size_t file_size_ = 0;
  size_t header_size_ = 0;
  std::vector<TensorView> tensors_;
  std::unordered_map<std::string, size_t> index_;  // name -> position in tensors_
  std::map<std::string, std::string> metadata_;
};

// All tensors of a checkpoint directory: the shards listed in
// model.safetensors.index.json if it exists, else model.safetensors, else
// every *.safetensors file in the directory (sorted by name).
class Checkpoint {
 public:
  // Error if the directory has no safetensors file, an index is malformed or
  // names a missing shard (or a tensor its shard lacks), or two files hold
  // the same tensor. A path to a single .safetensors file is accepted too.
  explicit Checkpoint(const std::string& dir);

  const std::string& dir() const { return dir_; }
  bool has(const std::string& name) const { return index_.count(name) != 0; }
  const TensorView& get(const std::string& name) const;  // Error("tensor 'x' not found in checkpoint <dir>")
  const TensorView* find(const std::string& name) const;  // nullptr if absent
  // Checked accessors for the engine:
  // Error("tensor 'x' in <file>: expected shape [a, b], found [c, d]").
  const TensorView& get(const std::string& name, const std::vector<int64_t>& expected_shape) const;
  // ... and Error("tensor 'x' in <file>: expected dtype F32, found BF16").
  const TensorView& get(const std::string& name, const std::vector<int64_t>& expected_shape,
                        DType expected_dtype) const;
  // Path of the file holding the tensor (for messages).
  const std::string& file_of(const std::string& name) const;

  std::vector<std::string> names() const;  // file by file, data-offset order within each
  size_t size() const { return index_.size(); }
  size_t total_bytes() const { return total_bytes_; }  // sum of tensor nbytes
  const std::vector<std::unique_ptr<SafetensorsFile>>& files() const { return files_; }
  void prefetch() const;

 private:
  void add_file(const std::string& path);
  void check_index(const std::string& index_path, const std::map<std::string, std::string>& weight_map) const;

  std::string dir_;
  std::vector<std::unique_ptr<SafetensorsFile>> files_;  // unique_ptr: views stay put as files_ grows
  std::unordered_map<std::string, std::pair<size_t, const TensorView*>> index_;  // name -> (file, view)
  size_t total_bytes_ = 0;
};

}  // namespace shortrt
