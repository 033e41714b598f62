// The model: weights of the planned layers, the RoPE table, and the forward
// pass over n tokens of one sequence at positions pos..pos+n-1 (prefill and
// decode are the same code). All scratch and the KV cache live in State,
// allocated once; forward allocates nothing.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <vector>

#include "attention.h"
#include "kernels.h"
#include "plan.h"
#include "shortrt/engine.h"
#include "threadpool.h"
#include "weights.h"

namespace shortrt {

// A float array allocated once, 64-byte aligned, pages touched only when used
// (so a large KV cache costs memory only for the positions actually filled).
class FloatBuffer {
 public:
  FloatBuffer() = default;
  explicit FloatBuffer(size_t n);
  float* data() { return data_.get(); }
  const float* data() const { return data_.get(); }
  size_t size() const { return n_; }

 private:
  struct Free { void operator()(float* p) const; };
  std::unique_ptr<float, Free> data_;
  size_t n_ = 0;
};

struct State {
  State(const ModelConfig& c, int n_kv_slots, int max_seq, int max_batch, int max_chunk);

  int max_seq, max_batch, max_chunk;  // max_chunk: most tokens one forward() call takes
  int64_t qkv_dim;                    // (n_heads + 2 n_kv_heads) * head_dim
  FloatBuffer x;        // [max_chunk][hidden]        residual stream
  FloatBuffer xn;       // [max_chunk][hidden]        normalised input of a sublayer
  FloatBuffer delta;    // [max_chunk][hidden]        sublayer output before the residual add
  FloatBuffer qkv;      // [max_chunk][qkv_dim]       q|k|v, rotated in place
  FloatBuffer attn;     // [max_chunk][n_heads*head_dim]
  FloatBuffer gate_up;  // [max_chunk][2*intermediate]
  FloatBuffer act;      // [max_chunk][intermediate]  silu(gate) * up
  std::vector<BlockQ8> xq;  // [max_chunk][max width / 32]  activation quantized once per matmul input (int8)
  FloatBuffer logits;   // [vocab]                    last position's logits
  // KV cache: [slot][seq][kv_head][pos][head_dim], slots = retained attentions only:
  // each kv head's keys (values) of a sequence are one contiguous stream.
  FloatBuffer key_cache, value_cache;
  size_t kv_bytes = 0;
  AttentionScratch attention;  // prefill's K / V^T / scores for one kv head; decode's partial states
};

class Model {
 public:
  Model(const ModelConfig& config, Weights weights, int n_kv_slots, int max_seq);

  const ModelConfig& config() const { return config_; }
  const Weights& weights() const { return weights_; }
  int n_kv_slots() const { return n_kv_slots_; }

  // Runs tokens[0..n) of sequence `seq` at positions pos..pos+n-1 (n <= state.max_chunk,
  // pos+n <= state.max_seq), filling that sequence's KV cache. Then writes the logits
  // of the last position to state.logits, or, when all_logits is given, the logits of
  // every position to all_logits[n][vocab].
  void forward(State& state, ThreadPool& pool, int seq, const int* tokens, int n, int pos,
               float* all_logits = nullptr) const;

 private:
  void attention_block(State& s, ThreadPool& pool, const LayerWeights& lw, int seq, int n, int pos) const;
  void mlp_block(State& s, ThreadPool& pool, const LayerWeights& lw, int n) const;
  // y = W x for n tokens; quantizes x first when W is int8.
  void project(State& s, ThreadPool& pool, const WeightMatrix& W, const float* x, int n, float* y, int64_t ldy) const;

  ModelConfig config_;
  Weights weights_;
  int n_kv_slots_;
  std::vector<float> rope_cos_, rope_sin_;  // [max_seq][head_dim/2]
};

}  // namespace shortrt
