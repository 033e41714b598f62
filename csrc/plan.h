// The runtime plan: which checkpoint layers run, in what order, with which
// sublayers, and which KV slot each attention writes (docs/internals.md).
#pragma once

#include <string>
#include <vector>

namespace shortrt {

struct PlannedLayer {
  int index = 0;         // checkpoint layer i (tensors model.layers.{i}.*)
  bool attention = true; // has input_layernorm + self_attn.*
  bool mlp = true;       // has post_attention_layernorm + mlp.*
  int kv_slot = -1;      // compact index of this attention in the KV cache; -1 without attention
};

struct LayerPlan {
  std::vector<PlannedLayer> layers;  // executed in this order
  int n_kv_slots = 0;                // attentions that keep a KV cache
};

// From <dir>/shortrt.json when present (per-entry attention/mlp flags), else
// every layer with both sublayers; then the layers in skip_layers are left
// out. Throws Error for a malformed shortrt.json, a layer count contradicting
// config.json, or a skip index outside [0, n_layers).
LayerPlan build_plan(const std::string& checkpoint_dir, int n_layers, const std::vector<int>& skip_layers);

}  // namespace shortrt
