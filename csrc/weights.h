// Weights of the layers a plan runs: views into the checkpoint's mmap (fp32
// on disk, run as fp32) or copies packed at load (bf16, int8, or converted).
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <vector>

#include "kernels.h"
#include "plan.h"
#include "shortrt/engine.h"

namespace shortrt {

class Checkpoint;

// A matrix stored as one or more row blocks stacked vertically: q|k|v and
// gate|up are one packed block in bf16/int8, but three (two) zero-copy views
// into the mmap in fp32, so that fp32 needs no second copy of the weights.
struct StackedMatrix {
  std::vector<WeightMatrix> parts;  // parts[i] covers the next parts[i].rows output rows
  int64_t rows = 0, cols = 0;
  size_t bytes() const;
};

struct LayerWeights {
  PlannedLayer plan;
  // attention (plan.attention)
  const float* attn_norm = nullptr;  // [hidden]
  StackedMatrix qkv;                 // [(n_heads + 2 n_kv_heads) * head_dim, hidden]
  const float* qkv_bias = nullptr;   // [(n_heads + 2 n_kv_heads) * head_dim] (Qwen2) or null
  WeightMatrix o;                    // [hidden, n_heads * head_dim]
  // mlp (plan.mlp)
  const float* mlp_norm = nullptr;   // [hidden]
  StackedMatrix gate_up;             // [2 * intermediate, hidden]
  WeightMatrix down;                 // [hidden, intermediate]
};

struct Weights {
  WeightType type = WeightType::F32;
  WeightMatrix embed;                // [vocab, hidden]; tied: the same storage as lm_head
  WeightMatrix lm_head;              // [vocab, hidden]
  const float* final_norm = nullptr; // [hidden]
  std::vector<LayerWeights> layers;  // in plan order

  size_t bytes = 0;           // every weight held for the plan (embedding counted once when tied)
  size_t bytes_per_token = 0; // weights read per decoded token (all but the untied embedding table)

  // Storage: packed copies, and the checkpoint mapping while views point into it.
  std::vector<std::unique_ptr<uint8_t[]>> owned;
  std::shared_ptr<Checkpoint> mapping;
};

// Reads exactly the tensors the plan needs (shapes checked against the
// config), packing them to `type`. Tensors may be F32, BF16 or F16 on disk.
Weights load_weights(const std::string& checkpoint_dir, const ModelConfig& config, const LayerPlan& plan,
                     WeightType type);

// Copies row `row` of an embedding matrix (any layout) into out[cols] as floats.
void embedding_row(const WeightMatrix& embed, int64_t row, float* out);

}  // namespace shortrt
