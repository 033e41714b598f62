// Checkpoint: every safetensors file of a checkpoint directory, one name space.
#include <sys/stat.h>

#include <algorithm>
#include <filesystem>
#include <map>
#include <set>

#include "error.h"
#include "json.h"
#include "safetensors.h"

namespace shortrt {

namespace fs = std::filesystem;

namespace {

// A regular file, or Error: a FIFO would block the JSON reader forever. (Weight files
// are checked by SafetensorsFile itself.)
void check_regular(const std::string& path) {
  struct stat st;
  if (::stat(path.c_str(), &st) != 0) throw os_error("cannot open", path);
  if (S_ISDIR(st.st_mode)) throw Error(path + " is a directory; expected a regular file");
  if (!S_ISREG(st.st_mode)) throw Error(path + " is not a regular file; expected a regular file");
}

std::string join(const std::vector<std::string>& names) {
  std::string out;
  for (const auto& n : names) out += (out.empty() ? "" : ", ") + n;
  return out;
}

void check_stray(const std::string& dir, const std::set<std::string>& used) {
  std::error_code ec;
  std::vector<std::string> stray;
  for (fs::directory_iterator it(fs::path(dir), ec), end; !ec && it != end; it.increment(ec)) {
    const std::string name = it->path().filename().string();
    if (it->path().extension() == ".safetensors" && !used.count(name)) stray.push_back(name);
  }
  if (ec) throw Error("cannot list checkpoint directory " + dir + ": " + ec.message());
  if (stray.empty()) return;
  std::sort(stray.begin(), stray.end());
  throw Error(dir + ": stray weights file '" + stray[0] +
              "' is neither model.safetensors nor a shard the index names; move or delete it");
}

}  // namespace

// The file-set rule (shortrt.checkpoint.weight_files is its twin): the shards the
// index names, else model.safetensors; any other *.safetensors beside them is an
// error, so no reader merges a stray file that another ignores.
Checkpoint::Checkpoint(const std::string& dir) : dir_(dir) {
  struct stat st;
  if (::stat(dir.c_str(), &st) != 0) throw os_error("cannot open checkpoint", dir);
  if (S_ISREG(st.st_mode)) {
    add_file(dir);
    return;
  }
  if (!S_ISDIR(st.st_mode)) throw Error("checkpoint " + dir + " is neither a directory nor a file");

  const fs::path root(dir);
  const fs::path index_path = root / "model.safetensors.index.json";
  const fs::path single_path = root / "model.safetensors";
  std::error_code ec;
  if (fs::exists(fs::symlink_status(index_path, ec))) {
    const std::string index_name = index_path.string();
    check_regular(index_name);
    json::Value index = json::parse_file(index_name);
    const json::Value* weight_map = index.is_object() ? index.find("weight_map") : nullptr;
    if (!weight_map || !weight_map->is_object() || weight_map->as_object().empty())
      throw Error(index_name + ": missing the 'weight_map' object (or it is empty)");
    std::map<std::string, std::string> tensor_to_shard;
    std::set<std::string> shards;
    for (const auto& [tensor, shard] : weight_map->as_object()) {
      if (!shard.is_string()) throw Error(index_name + ": weight_map entry for '" + tensor + "' is not a string");
      const std::string& file = shard.as_string();
      // Shards live beside the index; a path component would let an index
      // reach files outside the checkpoint.
      if (file.empty() || file.find('/') != std::string::npos || file == "." || file == "..")
        throw Error(index_name + ": shard name '" + file + "' is not a plain file name");
      tensor_to_shard[tensor] = file;
      shards.insert(file);
    }
    for (const std::string& shard : shards) {
      const fs::path shard_path = root / shard;
      if (!fs::exists(fs::symlink_status(shard_path, ec))) throw Error(index_name + " names missing shard '" + shard + "'");
    }
    check_stray(dir, shards);
    for (const std::string& shard : shards) add_file((root / shard).string());
    check_index(index_name, tensor_to_shard);
    return;
  }
  if (fs::exists(fs::symlink_status(single_path, ec))) {
    check_stray(dir, {"model.safetensors"});
    add_file(single_path.string());
    return;
  }
  std::vector<std::string> found;
  for (fs::directory_iterator it(root, ec), end; !ec && it != end; it.increment(ec))
    if (it->path().extension() == ".safetensors") found.push_back(it->path().filename().string());
  if (ec) throw Error("cannot list checkpoint directory " + dir + ": " + ec.message());
  std::sort(found.begin(), found.end());
  std::string hint;
  if (!found.empty()) hint = " (found " + join(found) + ")";
  throw Error(dir + " has no weights: expected model.safetensors or model.safetensors.index.json" + hint);
}

void Checkpoint::add_file(const std::string& path) {
  files_.push_back(std::make_unique<SafetensorsFile>(path));
  const size_t file_index = files_.size() - 1;
  for (const TensorView& t : files_.back()->tensors()) {
    auto [it, inserted] = index_.emplace(t.name, std::make_pair(file_index, &t));
    if (!inserted)
      throw Error("tensor '" + t.name + "' is in both " + files_[it->second.first]->path() + " and " + path);
    total_bytes_ += t.nbytes;
  }
}

void Checkpoint::check_index(const std::string& index_path,
                             const std::map<std::string, std::string>& weight_map) const {
  for (const auto& [tensor, shard] : weight_map) {
    auto it = index_.find(tensor);
    bool in_named_shard = it != index_.end() && fs::path(files_[it->second.first]->path()).filename() == shard;
    if (!in_named_shard)
      throw Error(index_path + " lists tensor '" + tensor + "' in shard '" + shard + "', which does not hold it");
  }
  for (const auto& file : files_)
    for (const TensorView& t : file->tensors())
      if (!weight_map.count(t.name))
        throw Error(index_path + " does not list tensor '" + t.name + "' of " +
                    fs::path(file->path()).filename().string());
}

const TensorView* Checkpoint::find(const std::string& name) const {
  auto it = index_.find(name);
  return it == index_.end() ? nullptr : it->second.second;
}

const TensorView& Checkpoint::get(const std::string& name) const {
  const TensorView* t = find(name);
  if (!t) throw Error("tensor '" + name + "' not found in checkpoint " + dir_);
  return *t;
}

const std::string& Checkpoint::file_of(const std::string& name) const {
  auto it = index_.find(name);
  if (it == index_.end()) throw Error("tensor '" + name + "' not found in checkpoint " + dir_);
  return files_[it->second.first]->path();
}

const TensorView& Checkpoint::get(const std::string& name, const std::vector<int64_t>& expected_shape) const {
  const TensorView& t = get(name);
  if (t.shape != expected_shape)
    throw Error("tensor '" + name + "' in " + file_of(name) + ": expected shape " + shape_string(expected_shape) +
                ", found " + shape_string(t.shape));
  return t;
}

const TensorView& Checkpoint::get(const std::string& name, const std::vector<int64_t>& expected_shape,
                                  DType expected_dtype) const {
  const TensorView& t = get(name, expected_shape);
  if (t.dtype != expected_dtype)
    throw Error("tensor '" + name + "' in " + file_of(name) + ": expected dtype " + dtype_name(expected_dtype) +
                ", found " + dtype_name(t.dtype));
  return t;
}

std::vector<std::string> Checkpoint::names() const {
  std::vector<std::string> out;
  out.reserve(index_.size());
  for (const auto& file : files_)
    for (const auto& t : file->tensors()) out.push_back(t.name);
  return out;
}

void Checkpoint::prefetch() const {
  for (const auto& file : files_) file->prefetch();
}

}  // namespace shortrt
