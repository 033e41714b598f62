// Weights of the layers a plan runs, copied at load into huge-page arenas in the
// engine's type (fp32, bf16, int8 or int4; the LM head in its own), each source tensor's file pages dropped
// as soon as it is copied, so peak memory stays near one copy.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <vector>

#include "kernels.h"
#include "page_buffer.h"
#include "contract.h"
#include "shortrt/engine.h"

namespace shortrt {


struct LayerWeights {
  PlannedLayer plan;
  // attention (plan.attention)
  const float* attn_norm = nullptr;  // [hidden]: input_layernorm, or (OLMo-2) post_attention_layernorm on its output
  WeightMatrix qkv;                  // [(n_heads + 2 n_kv_heads) * head_dim, hidden]
  const float* qkv_bias = nullptr;   // [(n_heads + 2 n_kv_heads) * head_dim] (Qwen2) or null
  const float* q_norm = nullptr;     // [head_dim] (Qwen3: every q head), [n_heads * head_dim] (OLMo-2) or null
  const float* k_norm = nullptr;     // [head_dim] (Qwen3: every k head), [n_kv_heads * head_dim] (OLMo-2) or null
  WeightMatrix o;                    // [hidden, n_heads * head_dim]
  const float* attn_post_norm = nullptr;  // [hidden] (Gemma 3) post_attention_layernorm on its output, or null
  // mlp (plan.mlp)
  const float* mlp_norm = nullptr;   // [hidden]: post_attention_layernorm, or (OLMo-2) post_feedforward_layernorm after
  WeightMatrix gate_up;              // [2 * intermediate, hidden]
  WeightMatrix down;                 // [hidden, intermediate]
  const float* mlp_post_norm = nullptr;   // [hidden] (Gemma 3) post_feedforward_layernorm on its output, or null
};

struct Weights {
  WeightType type = WeightType::F32;
  WeightMatrix embed;                // [vocab, hidden]; tied: the same storage as lm_head when in one type
  WeightMatrix lm_head;              // [vocab, hidden], in the LM head's type
  const float* final_norm = nullptr; // [hidden]
  std::vector<LayerWeights> layers;  // in plan order

  size_t bytes = 0;           // every weight held for the plan (embedding counted once when it is the LM head)
  size_t bytes_per_token = 0; // weights read per decoded token (all but an embedding table that is not the LM head)

  // Storage: every weight copied into 2 MB-aligned arenas advised for transparent
  // huge pages (see page_buffer.h), filled front to back; `arena_used` bytes of the
  // last one are taken.
  std::vector<PageBuffer> arenas;
  size_t arena_used = 0;
};

// Reads exactly the tensors the plan needs (shapes checked against the
// config), packing them to `type`, the LM head to `lm_head_type` (with tied
// embeddings the embedding stays in `type`, and one copy serves both when the
// types agree). Tensors may be F32, BF16 or F16 on disk.
Weights load_weights(const std::string& checkpoint_dir, const ModelConfig& config, const LayerPlan& plan,
                     WeightType type, WeightType lm_head_type);

// Copies row `row` of an embedding matrix (any layout) into out[cols] as floats.
void embedding_row(const WeightMatrix& embed, int64_t row, float* out);

}  // namespace shortrt
