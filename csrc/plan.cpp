#include "plan.h"

#include <sys/stat.h>

#include <string>

#include "error.h"
#include "json.h"

namespace shortrt {
namespace {

bool file_exists(const std::string& path) {
  struct stat st;
  return ::stat(path.c_str(), &st) == 0 && S_ISREG(st.st_mode);
}

bool flag(const json::Value& entry, const char* key, size_t i) {
  const json::Value* v = entry.find(key);
  if (!v || v->is_null()) return true;
  if (!v->is_bool())
    throw Error("shortrt.json: layers[" + std::to_string(i) + "]." + key + " must be true or false");
  return v->as_bool();
}

}  // namespace

LayerPlan build_plan(const std::string& checkpoint_dir, int n_layers, const std::vector<int>& skip_layers) {
  std::vector<PlannedLayer> all(n_layers);
  for (int i = 0; i < n_layers; ++i) all[i].index = i;

  std::string map_path = checkpoint_dir + "/shortrt.json";
  if (file_exists(map_path)) {
    json::Value root = json::parse_file(map_path);
    if (!root.is_object()) throw Error("shortrt.json: top level must be an object");
    if (const json::Value* fmt = root.find("format")) {
      if (!fmt->is_string() || fmt->as_string() != "shortrt.layermap/1")
        throw Error("shortrt.json: unsupported format (expected \"shortrt.layermap/1\")");
    }
    const json::Value* layers = root.find("layers");
    if (!layers || !layers->is_array()) throw Error("shortrt.json: 'layers' must be a list");
    const json::Value::Array& entries = layers->as_array();
    if (static_cast<int>(entries.size()) != n_layers)
      throw Error("shortrt.json lists " + std::to_string(entries.size()) +
                  " layers but config.json has num_hidden_layers = " + std::to_string(n_layers));
    for (size_t i = 0; i < entries.size(); ++i) {
      if (!entries[i].is_object())
        throw Error("shortrt.json: layers[" + std::to_string(i) + "] must be an object");
      all[i].attention = flag(entries[i], "attention", i);
      all[i].mlp = flag(entries[i], "mlp", i);
    }
  }

  std::vector<bool> skipped(n_layers, false);
  for (int s : skip_layers) {
    if (s < 0 || s >= n_layers)
      throw Error("skip_layers: layer " + std::to_string(s) + " is out of range for a checkpoint of " +
                  std::to_string(n_layers) + " layers");
    if (skipped[s]) throw Error("skip_layers: layer " + std::to_string(s) + " is listed twice");
    skipped[s] = true;
  }

  LayerPlan plan;
  for (int i = 0; i < n_layers; ++i) {
    if (skipped[i]) continue;
    PlannedLayer layer = all[i];
    if (layer.attention) layer.kv_slot = plan.n_kv_slots++;
    plan.layers.push_back(layer);
  }
  return plan;
}

}  // namespace shortrt
