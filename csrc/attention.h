// Causal attention of n new tokens (positions pos..pos+n-1) of one sequence
// over its KV cache region [pos][kv_head][head_dim], which already holds the
// rotated keys and the values of positions 0..pos+n-1.
#pragma once

#include <cstdint>
#include <memory>

#include "threadpool.h"

namespace shortrt {

struct AttentionArgs {
  const float* qkv = nullptr;      // [n][qkv_dim]; the q heads come first in each row (rotated)
  int64_t qkv_dim = 0;
  const float* keys = nullptr;     // [pos + n][n_kv_heads][head_dim]
  const float* values = nullptr;   // [pos + n][n_kv_heads][head_dim]
  int n = 0, pos = 0;
  int n_heads = 0, n_kv_heads = 0, head_dim = 0;
  float* out = nullptr;            // [n][n_heads * head_dim]
};

// Scratch of the matrix-matrix path, allocated once for max_seq positions.
struct AttentionScratch {
  AttentionScratch(int max_seq, int n_heads, int n_kv_heads, int head_dim);
  float* keys;      // [max_seq][head_dim]       one kv head's keys, contiguous
  float* values_t;  // [head_dim][max_seq]       its values transposed (row stride = keys in use)
  float* queries;   // [block rows][head_dim]    queries of a token block x the heads sharing the kv head
  float* scores;    // [block rows][max_seq]     scores, then probabilities
  float* out;       // [block rows][head_dim]
  struct Free { void operator()(float* p) const; };
  std::unique_ptr<float, Free> storage;
};

// One query head over n_keys cached keys / values whose rows are `stride`
// floats apart: out[head_dim] = softmax(scale * K q) V, an online softmax over
// blocks of keys (no score buffer). attend_head_ref is the scalar reference;
// attend_head_avx2 (attention_avx2.cpp) needs head_dim % 8 == 0 and AVX2+FMA.
void attend_head_ref(const float* q, const float* keys, const float* values, int64_t stride, int64_t n_keys,
                     int head_dim, float scale, float* out);
namespace detail {
void attend_head_avx2(const float* q, const float* keys, const float* values, int64_t stride, int64_t n_keys,
                      int head_dim, float scale, float* out);
}  // namespace detail

// One (token, head) pair per work item with an online softmax over blocks of
// keys: no scratch, reads each key once per head. Used for decoding. Runs the
// AVX2 head kernel (attention_avx2.cpp) when kernels() is on the avx2 path.
void attention_online(const AttentionArgs& a, ThreadPool& pool);

// Blocks of tokens at a time as two matmuls per kv head (scores = K q, out =
// V^T p), keys beyond a block's last position skipped. Used for prefill.
void attention_matmul(const AttentionArgs& a, AttentionScratch& scratch, ThreadPool& pool);

}  // namespace shortrt
