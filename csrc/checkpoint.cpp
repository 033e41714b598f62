// Checkpoint: every safetensors file of a checkpoint directory, one name space.
#include <sys/stat.h>

#include <algorithm>
#include <filesystem>
#include <map>
#include <set>

#include "json.h"
#include "safetensors.h"

namespace shortrt {

namespace fs = std::filesystem;

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
  if (fs::exists(index_path, ec)) {
    const std::string index_name = index_path.string();
    json::Value index = json::parse_file(index_name);
    const json::Value* weight_map = index.find("weight_map");
    if (!weight_map || !weight_map->is_object())
      throw Error(index_name + ": missing the 'weight_map' object");
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
    if (shards.empty()) throw Error(index_name + ": weight_map is empty");
    for (const std::string& shard : shards) {
      const fs::path shard_path = root / shard;
      if (!fs::exists(shard_path, ec)) throw Error(index_name + " names missing shard '" + shard + "'");
      add_file(shard_path.string());
    }
    check_index(index_name, tensor_to_shard);
    return;
  }
  if (fs::exists(single_path, ec)) {
    add_file(single_path.string());
    return;
  }
  std::vector<std::string> found;
  for (fs::directory_iterator it(root, ec), end; !ec && it != end; it.increment(ec))
    if (it->path().extension() == ".safetensors") found.push_back(it->path().string());
  if (ec) throw Error("cannot list checkpoint directory " + dir + ": " + ec.message());
  if (found.empty())
    throw Error("no safetensors file in " + dir + " (expected model.safetensors or model.safetensors.index.json)");
  std::sort(found.begin(), found.end());
  for (const auto& path : found) add_file(path);
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
