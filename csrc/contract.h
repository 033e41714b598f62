// The checkpoint contract, C++ side: the twin of shortrt/checkpoint.py.
//
// What a checkpoint directory must hold for the runtime to run it, read the
// same way and refused with the same messages as the Python reader
// (docs/internals.md states the rules; tests/test_contract.py runs a table of
// malformed checkpoints through both and asserts they agree):
//   - config.json: a supported architecture and every field the runtime uses;
//   - shortrt.json (when present): a layer map whose types are exact (booleans
//     are JSON booleans, indices integer literals), sources in range and not
//     repeated, known kinds, every original layer kept or removed;
//   - the tensors: exactly the ones config.json and the layer map say (no
//     layer beyond num_hidden_layers, no attention tensors in an attention-less
//     layer), each with its shape and a float dtype.
// The plan built from it lists the executed layers with their KV slots.
#pragma once

#include <string>
#include <vector>

#include "shortrt/engine.h"

namespace shortrt {
namespace json { class Value; }
class Checkpoint;

// The architectures the runtime runs (shortrt.checkpoint.ARCHITECTURES is the same list, tested).
const std::vector<std::string>& supported_architectures();

// Validates every field the runtime depends on; an unsupported architecture,
// activation, rope type or contradictory size throws Error naming the field.
ModelConfig parse_config(const json::Value& root);
ModelConfig load_config(const std::string& checkpoint_dir);  // <dir>/config.json

// One layer of the checkpoint as its layer map describes it.
struct LayerFlags {
  bool attention = true;  // has input_layernorm + self_attn.*
  bool mlp = true;        // has post_attention_layernorm + mlp.*
};

// <dir>/shortrt.json validated (see above) into one LayerFlags per checkpoint
// layer; every layer with both sublayers when the file is absent.
std::vector<LayerFlags> load_layer_map(const std::string& checkpoint_dir, int n_layers);

struct PlannedLayer {
  int index = 0;          // checkpoint layer i (tensors model.layers.{i}.*)
  bool attention = true;  // has input_layernorm + self_attn.*
  bool mlp = true;        // has post_attention_layernorm + mlp.*
  int kv_slot = -1;       // compact index of this attention in the KV cache; -1 without attention
};

struct LayerPlan {
  std::vector<PlannedLayer> layers;  // executed in this order
  int n_kv_slots = 0;                // attentions that keep a KV cache
};

// The tensor set of `ckpt` is exactly what `config` and `layers` say; throws
// Error naming the first tensor at fault (in the Python reader's order).
void check_tensors(const Checkpoint& ckpt, const ModelConfig& config, const std::vector<LayerFlags>& layers);

// The layer map minus skip_layers (checkpoint indices), KV slots in order.
// Throws Error for a skip index outside [0, n_layers), one listed twice, or a
// plan with no layer left.
LayerPlan make_plan(const std::vector<LayerFlags>& layers, const std::vector<int>& skip_layers);

// The whole read: config (given), layer map, tensor set, plan.
LayerPlan build_plan(const std::string& checkpoint_dir, const ModelConfig& config,
                     const std::vector<int>& skip_layers);

}  // namespace shortrt
