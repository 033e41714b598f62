// The KV cache and its storage formats (kv_dtype): fp32, f16, bf16 or int8.
//
// Layout (docs/internals.md is the truth): for each KV slot (retained
// attention) and KV region (a running sequence), keys and values are
// [kv_head][position][head_dim] elements of the format, so each kv head's keys
// of a sequence are one contiguous stream. int8 keeps one fp32 scale per row
// (kv head, position) of head_dim values, for K and for V, in separate arrays
// [slot][region][kv_head][position]: value = scale * q, scale = max|x| / 127,
// q = round-half-even(x / scale) in [-127, 127].
//
// Rows are converted once, when written (after RoPE), by the scalar functions
// below on every kernel path, so the cache holds the same bits whatever the
// path; the attention kernels convert back in registers as they read.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "kernels.h"

namespace shortrt {

struct AttentionArgs;

enum class KvType { F32, F16, BF16, Q8 };

// "fp32" | "f16" | "bf16" | "int8"; anything else throws Error naming the value.
KvType kv_type_of(const std::string& name);
const char* kv_type_name(KvType type);
// Bytes of one element (4, 2, 2, 1), and of one row (a kv head's key, or value,
// at one position): head_dim elements, plus its fp32 scale for int8.
size_t kv_element_bytes(KvType type);
size_t kv_row_bytes(KvType type, int head_dim);

// One row of n values into the format: dst holds n elements of it; *scale is
// set for int8 (and left alone otherwise). kv_load_row is the inverse (the
// reference dequantization the kernels are held to).
void kv_store_row(KvType type, const float* x, int n, void* dst, float* scale);
void kv_load_row(KvType type, const void* src, float scale, int n, float* out);
// Element i of a row of the format as float (int8: without its scale).
inline float kv_element(KvType type, const void* row, int64_t i);

// Each slot holds slot_positions[s] positions per region: max_seq for a full-attention layer, fewer for
// a sliding-window one (Gemma 3), whose region is then a ring: position p lives at row p % positions.
class KvCache {
 public:
  KvCache(KvType type, int n_slots, int max_batch, int max_seq, int n_kv_heads, int head_dim);
  KvCache(KvType type, std::vector<int> slot_positions, int max_batch, int n_kv_heads, int head_dim);
  KvType type() const { return type_; }
  size_t bytes() const { return bytes_; }  // K, V and (int8) their scales, every slot and region

  // Converts and stores the key and value rows of position `pos` of region `seq` in
  // `slot`: k and v are [n_kv_heads][head_dim]. Rows of different positions may be
  // written from different threads at once.
  void write(int slot, int seq, int pos, const float* k, const float* v);
  // Points args' kv fields (type, keys, values, scales and strides) at region `seq` of `slot`.
  void view(int slot, int seq, AttentionArgs& args) const;

 private:
  struct Free { void operator()(uint8_t* p) const; };
  KvType type_;
  int max_batch_, n_kv_heads_, head_dim_;
  std::vector<int> positions_;          // [slot] positions a region of the slot holds
  std::vector<size_t> first_row_;       // [slot] its first row ([slot][seq][kv_head][position] rows)
  size_t elem_bytes_, bytes_;
  std::unique_ptr<uint8_t, Free> storage_;  // keys, values, key scales, value scales
  uint8_t* keys_ = nullptr;
  uint8_t* values_ = nullptr;
  float* key_scales_ = nullptr;
  float* value_scales_ = nullptr;
};

// ---- inline -----------------------------------------------------------------


inline float kv_element(KvType type, const void* row, int64_t i) {
  switch (type) {
    case KvType::F32: return static_cast<const float*>(row)[i];
    case KvType::F16: return f16_to_f32(static_cast<const uint16_t*>(row)[i]);
    case KvType::BF16: {
      const uint32_t u = static_cast<uint32_t>(static_cast<const uint16_t*>(row)[i]) << 16;
      float f;
      __builtin_memcpy(&f, &u, sizeof f);
      return f;
    }
    case KvType::Q8: return static_cast<float>(static_cast<const int8_t*>(row)[i]);
  }
  return 0.0f;
}

}  // namespace shortrt
