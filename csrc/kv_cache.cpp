#include "kv_cache.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>

#include "attention.h"
#include "error.h"
#include "kernels.h"

namespace shortrt {

KvType kv_type_of(const std::string& name) {
  if (name == "fp32") return KvType::F32;
  if (name == "f16") return KvType::F16;
  if (name == "bf16") return KvType::BF16;
  if (name == "int8") return KvType::Q8;
  throw Error("unknown kv_dtype '" + name + "' (expected fp32, f16, bf16 or int8)");
}

const char* kv_type_name(KvType type) {
  switch (type) {
    case KvType::F32: return "fp32";
    case KvType::F16: return "f16";
    case KvType::BF16: return "bf16";
    case KvType::Q8: return "int8";
  }
  return "?";
}

size_t kv_element_bytes(KvType type) {
  switch (type) {
    case KvType::F32: return 4;
    case KvType::F16:
    case KvType::BF16: return 2;
    case KvType::Q8: return 1;
  }
  return 4;
}

size_t kv_row_bytes(KvType type, int head_dim) {
  return kv_element_bytes(type) * static_cast<size_t>(head_dim) + (type == KvType::Q8 ? sizeof(float) : 0);
}

void kv_store_row(KvType type, const float* x, int n, void* dst, float* scale) {
  switch (type) {
    case KvType::F32:
      std::memcpy(dst, x, static_cast<size_t>(n) * sizeof(float));
      return;
    case KvType::F16: {
      uint16_t* d = static_cast<uint16_t*>(dst);
      for (int i = 0; i < n; ++i) d[i] = f32_to_f16(x[i]);
      return;
    }
    case KvType::BF16:
      pack_bf16(x, n, static_cast<uint16_t*>(dst));
      return;
    case KvType::Q8: {
      // The weights' int8 rounding (quantize_row_q8_ref), over the whole row.
      float amax = 0.0f;
      for (int i = 0; i < n; ++i) amax = std::max(amax, std::fabs(x[i]));
      const float s = amax / 127.0f;
      const float inv = s != 0.0f ? 1.0f / s : 0.0f;
      int8_t* d = static_cast<int8_t*>(dst);
      for (int i = 0; i < n; ++i) {
        const float q = std::nearbyint(x[i] * inv);  // default rounding mode: half to even
        d[i] = static_cast<int8_t>(std::min(127.0f, std::max(-127.0f, q)));
      }
      *scale = s;
      return;
    }
  }
}

void kv_load_row(KvType type, const void* src, float scale, int n, float* out) {
  switch (type) {  // one loop per format, so each vectorizes
    case KvType::F32:
      std::memcpy(out, src, static_cast<size_t>(n) * sizeof(float));
      return;
    case KvType::F16:
      for (int i = 0; i < n; ++i) out[i] = kv_element(KvType::F16, src, i);
      return;
    case KvType::BF16:
      for (int i = 0; i < n; ++i) out[i] = kv_element(KvType::BF16, src, i);
      return;
    case KvType::Q8:
      for (int i = 0; i < n; ++i) out[i] = scale * kv_element(KvType::Q8, src, i);
      return;
  }
}

void KvCache::Free::operator()(uint8_t* p) const { std::free(p); }

KvCache::KvCache(KvType type, int n_slots, int max_batch, int max_seq, int n_kv_heads, int head_dim)
    : KvCache(type, std::vector<int>(n_slots, max_seq), max_batch, n_kv_heads, head_dim) {}

KvCache::KvCache(KvType type, std::vector<int> slot_positions, int max_batch, int n_kv_heads, int head_dim)
    : type_(type), max_batch_(max_batch), n_kv_heads_(n_kv_heads), head_dim_(head_dim),
      positions_(std::move(slot_positions)), elem_bytes_(kv_element_bytes(type)) {
  size_t rows = 0;
  for (int p : positions_) {
    first_row_.push_back(rows);
    rows += static_cast<size_t>(max_batch) * n_kv_heads * p;
  }
  const size_t data = rows * head_dim * elem_bytes_;
  const size_t scales = type == KvType::Q8 ? rows * sizeof(float) : 0;
  bytes_ = 2 * (data + scales);
  auto padded = [](size_t n) { return (n + 63) / 64 * 64; };  // each array 64-byte aligned
  const size_t total = 2 * padded(data) + 2 * padded(scales);
  if (total == 0) return;
  // Not zeroed: untouched pages of a large cache stay out of the resident set.
  storage_.reset(static_cast<uint8_t*>(std::aligned_alloc(64, total)));
  if (!storage_) throw Error("out of memory allocating the KV cache (" + std::to_string(bytes_) + " bytes)");
  keys_ = storage_.get();
  values_ = keys_ + padded(data);
  if (scales) {
    key_scales_ = reinterpret_cast<float*>(values_ + padded(data));
    value_scales_ = reinterpret_cast<float*>(values_ + padded(data) + padded(scales));
  }
}

void KvCache::write(int slot, int seq, int pos, const float* k, const float* v) {
  const size_t cap = positions_[slot];
  for (int h = 0; h < n_kv_heads_; ++h) {
    // [slot][seq][kv_head][position % cap]: a ring for a sliding-window slot, plain otherwise.
    const size_t row = first_row_[slot] + (static_cast<size_t>(seq) * n_kv_heads_ + h) * cap + pos % cap;
    float* ks = key_scales_ ? key_scales_ + row : nullptr;
    float* vs = value_scales_ ? value_scales_ + row : nullptr;
    kv_store_row(type_, k + h * head_dim_, head_dim_, keys_ + row * head_dim_ * elem_bytes_, ks);
    kv_store_row(type_, v + h * head_dim_, head_dim_, values_ + row * head_dim_ * elem_bytes_, vs);
  }
}

void KvCache::view(int slot, int seq, AttentionArgs& a) const {
  const size_t cap = positions_[slot];
  const size_t first = first_row_[slot] + static_cast<size_t>(seq) * n_kv_heads_ * cap;  // the region's first row
  a.kv_type = type_;
  a.keys = keys_ + first * head_dim_ * elem_bytes_;
  a.values = values_ + first * head_dim_ * elem_bytes_;
  a.kv_row_stride = head_dim_;
  a.kv_head_stride = static_cast<int64_t>(cap) * head_dim_;
  a.key_scales = key_scales_ ? key_scales_ + first : nullptr;
  a.value_scales = value_scales_ ? value_scales_ + first : nullptr;
  a.scale_row_stride = 1;
  a.scale_head_stride = static_cast<int64_t>(cap);
  a.ring = static_cast<int64_t>(cap);
}

}  // namespace shortrt
