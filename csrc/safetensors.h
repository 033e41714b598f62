// Zero-copy reader for safetensors files and checkpoint directories.
//
// File layout: an 8-byte little-endian header length N, N bytes of JSON
// header {"name": {"dtype": "F32", "shape": [..], "data_offsets": [begin, end]},
// ..., "__metadata__": {"k": "v"}}, then the data section; offsets are
// relative to the start of the data section (byte 8 + N).
//
// The constructor maps the file read-only and validates the whole header
// before anything reads a tensor: every dtype, shape (no overflow), offset
// (inside the data section, begin <= end, no overlap) and byte length
// (== numel * dtype size). A corrupt or hostile file throws shortrt::Error
// naming the file and the problem; it never leads to an out-of-bounds read.
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
#include <unordered_map>
#include <vector>

#include "error.h"

namespace shortrt {

// F64..BOOL are the types the runtime reads; U16/U32/U64 exist so that files
// holding them still open (their tensors are simply not used by the engine).
enum class DType { F64, F32, F16, BF16, I64, I32, I16, I8, U8, BOOL, U16, U32, U64 };

const char* dtype_name(DType dtype);  // the safetensors spelling: "F32", "BF16", ...
size_t dtype_size(DType dtype);       // bytes per element
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
  void parse_header();

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
