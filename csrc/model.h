// The model: weights of the planned layers, the RoPE table, and the forward
// pass over the rows of one step: runs of consecutive tokens, each of one
// sequence at its own positions (a decode token, or a chunk of a prompt), so
// each weight is read once per step for all of them. Prefill and decode are
// the same code. All scratch and the KV cache live in State, allocated once;
// forward allocates nothing.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <vector>

#include "attention.h"
#include "kernels.h"
#include "contract.h"
#include "kv_cache.h"
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

// One run of consecutive rows of a step that belong to one sequence.
struct Segment {
  int seq = 0;        // the sequence's KV region, 0 .. max_batch-1
  int pos = 0;        // position of the segment's first token
  int first_row = 0;  // its first row in the step
  int n = 0;          // its tokens
  bool logits = false;  // forward_step writes the logits of its last token
  // Phi-3's longrope: rotate with the long factors (the sequence is, or will be in this step, longer than
  // original_max_position_embeddings; Model::has_long_rope). Else the short ones.
  bool long_rope = false;
};

struct State {
  // slot_sliding: per KV slot, 1 for a sliding-window layer (its cache holds the window, a ring); empty: none.
  State(const ModelConfig& c, int n_kv_slots, int max_seq, int max_batch, int max_chunk,
        KvType kv_type = KvType::F32, const std::vector<char>& slot_sliding = {});

  int max_seq, max_batch, max_chunk;  // max_chunk: most rows (tokens) one forward pass takes
  int64_t qkv_dim;                    // (n_heads + 2 n_kv_heads) * head_dim
  FloatBuffer x;        // [max_chunk][hidden]        residual stream
  FloatBuffer xn;       // [max_chunk][hidden]        normalised input of a sublayer
  FloatBuffer delta;    // [max_chunk][hidden]        sublayer output before the residual add
  FloatBuffer qkv;      // [max_chunk][qkv_dim]       q|k|v, rotated in place
  FloatBuffer attn;     // [max_chunk][n_heads*head_dim]
  FloatBuffer gate_up;  // [max_chunk][2*intermediate]
  FloatBuffer act;      // [max_chunk][intermediate]  silu(gate) * up
  std::vector<BlockQ8> xq;  // [max_chunk][max width / 32]  activation quantized once per matmul input (int8)
  std::vector<float> xq_sum;  // [max_chunk][max width / 32]  scale * sum(q) of each xq block (int4 weights)
  std::vector<uint16_t> xb;   // [max_chunk][max width]  activation rounded to bf16 once per matmul input (avx512bf16)
  FloatBuffer logits;   // [max_batch][vocab]         logits of the rows that asked for them
  std::vector<int> row_seq, row_pos;  // [max_chunk]   each row's KV region and position
  std::vector<char> row_long;         // [max_chunk]   1: rotate with longrope's long factors (Phi-3)
  std::vector<AttentionArgs> decode_args;  // [max_batch] the decode segments of a step, attended together
  // KV cache: [slot][seq][kv_head][pos][head_dim] in the kv_dtype (kv_cache.h), slots =
  // retained attentions only: each kv head's keys (values) of a sequence are one stream.
  KvCache kv;
  size_t kv_bytes = 0;
  AttentionScratch attention;  // prefill's K / V^T / scores for one kv head; decode's partial states
};

class Model {
 public:
  Model(const ModelConfig& config, Weights weights, int n_kv_slots, int max_seq);

  const ModelConfig& config() const { return config_; }
  const Weights& weights() const { return weights_; }
  int n_kv_slots() const { return n_kv_slots_; }

  // One step: segs[0..n_segs) cover rows 0..n_rows of tokens (n_rows <= state.max_chunk,
  // each segment's pos + n <= state.max_seq, each sequence at most once), filling each
  // sequence's KV cache. Then writes the logits of the last token of each segment that
  // asks for them to state.logits, one row per such segment in segment order. A
  // sequence's numbers do not depend on the other segments of the step.
  void forward_step(State& state, ThreadPool& pool, const int* tokens, const Segment* segs, int n_segs) const;

  // Tokens[0..n) of sequence `seq` at positions pos..pos+n-1 alone, with the logits
  // of every position written to all_logits[n][vocab].
  void forward_all_logits(State& state, ThreadPool& pool, int seq, const int* tokens, int n, int pos,
                          float* all_logits, bool long_rope = false) const;
  // Whether the model has longrope's long-context tables (Phi-3 with max_seq past the original context).
  bool has_long_rope() const { return !rope_long_cos_.empty(); }

 private:
  void run_layers(State& s, ThreadPool& pool, const int* tokens, const Segment* segs, int n_segs, int n_rows) const;
  void attention_block(State& s, ThreadPool& pool, const LayerWeights& lw, const Segment* segs, int n_segs,
                       int n_rows) const;
  void mlp_block(State& s, ThreadPool& pool, const LayerWeights& lw, int n) const;
  void post_norm_rows(State& s, ThreadPool& pool, const float* weight, int n) const;
  bool sliding(const LayerWeights& lw) const;  // a sliding_attention layer (Gemma 3)
  // y = W x for n tokens; quantizes x first when W is int8 or int4 (with block sums for int4).
  void project(State& s, ThreadPool& pool, const WeightMatrix& W, const float* x, int n, float* y, int64_t ldy) const;

  ModelConfig config_;
  Weights weights_;
  int n_kv_slots_;
  std::vector<float> rope_cos_, rope_sin_;  // [max_seq][head_dim/2]
  std::vector<float> rope_local_cos_, rope_local_sin_;  // the same for Gemma 3's sliding layers, or empty
  // Phi-3's longrope with max_seq beyond the original context: the long factors' tables (else empty);
  // rope_cos_ / rope_sin_ then hold the short factors'. Both carry the attention factor.
  std::vector<float> rope_long_cos_, rope_long_sin_;
};

}  // namespace shortrt
