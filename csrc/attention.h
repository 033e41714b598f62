// Causal attention of n new tokens (positions pos..pos+n-1) of one sequence
// over its KV cache region, which already holds the rotated keys and the
// values of positions 0..pos+n-1. The engine's region is [kv_head][position]
// [head_dim] (docs/internals.md); the strides below also describe other layouts.
// Two paths: attention_decode for a few tokens (one pass over the keys per kv
// head, key ranges spread over the threads), attention_matmul for a prompt
// chunk. Neither allocates: their scratch is an AttentionScratch made at load.
#pragma once

#include <cstdint>
#include <memory>

#include "kv_cache.h"
#include "threadpool.h"

namespace shortrt {

struct KernelTable;

struct AttentionArgs {
  const float* qkv = nullptr;      // [n][qkv_dim]; the q heads come first in each row (rotated)
  int64_t qkv_dim = 0;
  // Key (value) of position j for kv head h: element h * kv_head_stride + j * kv_row_stride
  // of keys (values), an array of kv_type (float, f16 or bf16 bits, int8), positions
  // 0..pos+n-1; the engine's cache is [kv_head][position][head_dim] (KvCache::view). int8
  // rows have their scale at key_scales[h * scale_head_stride + j * scale_row_stride]
  // (value_scales likewise).
  KvType kv_type = KvType::F32;
  const void* keys = nullptr;
  const void* values = nullptr;
  int64_t kv_row_stride = 0, kv_head_stride = 0;
  const float* key_scales = nullptr;
  const float* value_scales = nullptr;
  int64_t scale_row_stride = 0, scale_head_stride = 0;
  int n = 0, pos = 0;
  int n_heads = 0, n_kv_heads = 0, head_dim = 0;
  float scale = 0.0f;  // scores = scale * q.k; 0: 1/sqrt(head_dim) (Gemma 3: query_pre_attn_scalar ** -0.5)
  // Sliding-window attention (Gemma 3): window > 0 lets the query at position p see keys p-window+1..p only.
  // ring > 0: the cache holds `ring` positions per kv head and position j lives at row j % ring
  // (KvCache::view sets it; a full-attention slot's ring is max_seq, so j % ring = j).
  int window = 0;
  int64_t ring = 0;
  float* out = nullptr;            // [n][n_heads * head_dim]
};

// Up to this many query heads that share one kv head run through the decode
// kernel together (more are split into groups of this size).
constexpr int kMaxAttendGroup = 8;

// attention_decode takes at most this many new tokens; more go through
// attention_matmul (two matmuls per kv head pay off from 4 tokens on).
constexpr int kMaxDecodeTokens = 3;

// Keys per decode work item: a long context spreads over the threads.
constexpr int64_t kAttendChunk = 128;

// Scratch of both paths, allocated once for max_seq positions.
struct AttentionScratch {
  // max_segments: decode segments (sequences) attention_decode_batch takes at once.
  AttentionScratch(int max_seq, int n_heads, int n_kv_heads, int head_dim, int max_segments = 1);
  // Matrix-matrix path (prefill), one kv head at a time.
  float* keys;      // one kv head's keys as fp32: [max_seq][head_dim] (windowed), or attend_tile's blocks
  float* values_t;  // [head_dim][max_seq] its values transposed (windowed), or [max_seq][head_dim] as fp32
  float* queries;   // [block rows][head_dim]    queries of a token block x the heads sharing the kv head
  float* scores;    // [block rows][max_seq]     scores, then probabilities
  float* out;       // [block rows][head_dim]
  // Decode path: one partial online-softmax state per work item, an item being
  // (token, kv head, sub-group of its q heads, range of kAttendChunk keys).
  int64_t decode_items;  // capacity: max_segments x kMaxDecodeTokens x n_kv_heads x sub-groups x ceil(max_seq / kAttendChunk)
  int64_t decode_item_floats;  // sub-group size x (head_dim + 2): acc [sub][head_dim], then m [sub], l [sub]
  float* decode_state;   // [decode_items][decode_item_floats]
  struct Free { void operator()(float* p) const; };
  std::unique_ptr<float, Free> storage;
};

// The decode kernel: `group` query heads (q + g * head_dim) that share one kv
// head, over n_keys cached keys / values whose rows are `stride` floats apart,
// as an online softmax over blocks of keys. It leaves each head's partial
// state: m[g] the largest scaled score, l[g] = sum_j exp(s_j - m[g]) and
// acc[g * head_dim ..] = sum_j exp(s_j - m[g]) v_j, so ranges of keys done
// separately can be merged. It is the KernelTable's attend_partial entry:
// attend_partial_ref is the scalar reference; attend_partial_avx2
// (attention_avx2.cpp, AVX2+FMA) runs the reference when head_dim % 8 != 0.
void attend_partial_ref(const float* q, int group, const float* keys, const float* values, int64_t stride,
                        int64_t n_keys, int head_dim, float scale, float* acc, float* m, float* l);
// The same over a compact cache (one twin pair per kv_dtype): each element is
// converted to float as it is read (f16, bf16), or converted and scaled by its
// row's scale (int8: score = (q . k_int) * k_scale * scale, and the value
// weight p * v_scale multiplies v_int), with no fp32 copy of the rows.
void attend_partial_f16_ref(const float* q, int group, const uint16_t* keys, const uint16_t* values, int64_t stride,
                            int64_t n_keys, int head_dim, float scale, float* acc, float* m, float* l);
void attend_partial_bf16_ref(const float* q, int group, const uint16_t* keys, const uint16_t* values,
                             int64_t stride, int64_t n_keys, int head_dim, float scale, float* acc, float* m,
                             float* l);
void attend_partial_q8_ref(const float* q, int group, const int8_t* keys, const int8_t* values, int64_t stride,
                           const float* key_scales, const float* value_scales, int64_t scale_stride,
                           int64_t n_keys, int head_dim, float scale, float* acc, float* m, float* l);
// f16 bits to float (exact, so both give the same bits): the KernelTable's f16_to_f32_row.
void f16_to_f32_row_ref(const uint16_t* x, int64_t n, float* out);
namespace detail {
void f16_to_f32_row_avx2(const uint16_t* x, int64_t n, float* out);
void attend_partial_avx2(const float* q, int group, const float* keys, const float* values, int64_t stride,
                         int64_t n_keys, int head_dim, float scale, float* acc, float* m, float* l);
void attend_partial_f16_avx2(const float* q, int group, const uint16_t* keys, const uint16_t* values,
                             int64_t stride, int64_t n_keys, int head_dim, float scale, float* acc, float* m,
                             float* l);
void attend_partial_bf16_avx2(const float* q, int group, const uint16_t* keys, const uint16_t* values,
                              int64_t stride, int64_t n_keys, int head_dim, float scale, float* acc, float* m,
                              float* l);
void attend_partial_q8_avx2(const float* q, int group, const int8_t* keys, const int8_t* values, int64_t stride,
                            const float* key_scales, const float* value_scales, int64_t scale_stride,
                            int64_t n_keys, int head_dim, float scale, float* acc, float* m, float* l);
}  // namespace detail

// Prefill attention tile (the KernelTable's attend_tile): n_tok consecutive
// query tokens x the `group` q heads sharing one kv head, over that head's
// keys in blocks of kTileKeys, as an online softmax. Row r of the tile is
// token r / group, head r % group: its query at q + (r / group) * ldq +
// (r % group) * head_dim, its output at out + (r / group) * ldo + (r % group) *
// head_dim; token tt sits at position pos0 + tt and sees keys 0..pos0 + tt.
// kt holds the keys as fp32 blocks [ceil(keys / kTileKeys)][head_dim][kTileKeys]
// (transposed per block, so kTileKeys scores of a row are one vector
// expression; a partial last block zero-padded); value j is the fp32 row
// v + j * ldv. n_tok * group <= kMaxTileRows. Per row and key block b in
// order: s_j = scale * (q . k_j), masked past the row's last key; m' = max(m,
// max_j s_j); p_j = exp(s_j - m'); c = exp(m - m') (0 on the first block);
// l = l c + sum_j p_j; acc = acc c + sum_j p_j v_j (in key order); then out =
// acc / l. A row's arithmetic does not depend on the other rows of its tile,
// so prefill results do not depend on the chunking, tiling or thread count.
constexpr int kTileKeys = 32;
constexpr int kMaxTileRows = 64;
void attend_tile_ref(const float* q, int64_t ldq, float* out, int64_t ldo, int n_tok, int group, int head_dim,
                     float scale, const float* kt, const float* v, int64_t ldv, int64_t pos0);
namespace detail {
// AVX2/FMA (attention_avx2.cpp); the reference when head_dim % 16 != 0.
void attend_tile_avx2(const float* q, int64_t ldq, float* out, int64_t ldo, int n_tok, int group, int head_dim,
                      float scale, const float* kt, const float* v, int64_t ldv, int64_t pos0);
// AVX-512 (attention_avx512.cpp); the avx2 kernel when head_dim % 32 != 0.
void attend_tile_avx512(const float* q, int64_t ldq, float* out, int64_t ldo, int n_tok, int group, int head_dim,
                        float scale, const float* kt, const float* v, int64_t ldv, int64_t pos0);
}  // namespace detail

// Decode attention of a.n <= kMaxDecodeTokens tokens: for each new token and
// kv head, the query heads sharing it in one pass over each range of
// kAttendChunk keys (one work item each, so a long context spreads over the
// threads), then the ranges merged in key order, so the result does not depend
// on the thread count. Reads each cached key and value once per kv head. Runs
// the kernels() path, or the given table's (tests).
void attention_decode(const AttentionArgs& a, AttentionScratch& scratch, ThreadPool& pool);
void attention_decode(const AttentionArgs& a, AttentionScratch& scratch, ThreadPool& pool, const KernelTable& kernels);
// The same for several sequences' decode tokens at once (a batched step: one
// parallel loop over all their work items instead of one per sequence). Each
// sequence's result is bit for bit what attention_decode gives it alone.
void attention_decode_batch(const AttentionArgs* segments, int n_segments, AttentionScratch& scratch,
                            ThreadPool& pool, const KernelTable& kernels);

// Prefill attention. Per kv head: its keys converted (kv_load_row, or the
// kernel path's f16 converter) into the scratch as transposed fp32 blocks, its
// values used in place when the cache is fp32, else converted into fp32 rows;
// then tiles of query tokens x the heads sharing the kv head (attend_tile) run
// in parallel, the costliest (last) tiles handed out first. A sliding window
// (Gemma 3) runs the older path instead: blocks of tokens as two matmuls per
// kv head (scores = K q, out = V^T p). Runs the kernels() path, or the given
// table's (tests).
void attention_matmul(const AttentionArgs& a, AttentionScratch& scratch, ThreadPool& pool);
void attention_matmul(const AttentionArgs& a, AttentionScratch& scratch, ThreadPool& pool, const KernelTable& kernels);
// The matmul path alone, for any args (what a sliding window runs; tests and benchmarks).
void attention_matmul_blocks(const AttentionArgs& a, AttentionScratch& scratch, ThreadPool& pool,
                             const KernelTable& kernels);

}  // namespace shortrt
