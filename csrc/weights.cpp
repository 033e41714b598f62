#include "weights.h"

#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>

#include "error.h"
#include "kernels_q4.h"
#include "safetensors.h"

namespace shortrt {
namespace {

float half_to_f32(uint16_t h) {
  uint32_t sign = static_cast<uint32_t>(h & 0x8000) << 16;
  uint32_t exp = (h >> 10) & 0x1f, mant = h & 0x3ff, bits;
  if (exp == 0) {
    if (mant == 0) {
      bits = sign;
    } else {  // subnormal: normalise
      int e = -1;
      do { ++e; mant <<= 1; } while (!(mant & 0x400));
      bits = sign | static_cast<uint32_t>(127 - 15 - e) << 23 | (mant & 0x3ff) << 13;
    }
  } else if (exp == 31) {
    bits = sign | 0x7f800000u | mant << 13;
  } else {
    bits = sign | (exp + 127 - 15) << 23 | mant << 13;
  }
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

// Drops the pages of a tensor that has been packed elsewhere from this
// process's resident set (the file mapping is read-only, so they are simply
// re-read if touched again). Keeps peak memory near the packed size.
void release_pages(const uint8_t* data, size_t nbytes) {
  static const uintptr_t page = static_cast<uintptr_t>(::sysconf(_SC_PAGESIZE));
  uintptr_t begin = (reinterpret_cast<uintptr_t>(data) + page - 1) / page * page;
  uintptr_t end = (reinterpret_cast<uintptr_t>(data) + nbytes) / page * page;
  if (end > begin) ::madvise(reinterpret_cast<void*>(begin), end - begin, MADV_DONTNEED);
}

bool is_float_type(DType d) { return d == DType::F32 || d == DType::BF16 || d == DType::F16; }

// Elements [begin, begin + n) of a float tensor as f32: a pointer into the mapping
// when it is F32 and aligned, else converted into tmp.
const float* f32_span(const TensorView& t, int64_t begin, int64_t n, std::vector<float>& tmp) {
  if (t.dtype == DType::F32 && reinterpret_cast<uintptr_t>(t.data) % alignof(float) == 0)
    return reinterpret_cast<const float*>(t.data) + begin;
  tmp.resize(n);
  for (int64_t i = 0; i < n; ++i) {
    uint16_t h;
    if (t.dtype == DType::F32) {
      std::memcpy(&tmp[i], t.data + (begin + i) * 4, 4);
      continue;
    }
    std::memcpy(&h, t.data + (begin + i) * 2, 2);
    tmp[i] = t.dtype == DType::BF16 ? bf16_to_f32(h) : half_to_f32(h);
  }
  return tmp.data();
}

// NaN and Inf have an all-ones exponent. A branch-free count over integer
// bits, so the compiler vectorizes it: the check costs one pass over data the
// copy has just brought into cache.
uint32_t count_nonfinite(const float* x, int64_t n) {
  uint32_t bad = 0;
  for (int64_t i = 0; i < n; ++i) {
    uint32_t bits;
    std::memcpy(&bits, x + i, sizeof bits);
    bad += (bits & 0x7f800000u) == 0x7f800000u;
  }
  return bad;
}

// NaN/Inf values seen in one tensor while it is copied chunk by chunk.
struct NonFinite {
  int64_t count = 0;
  int64_t first = -1;  // element index of the first one
  float first_value = 0.0f;

  void scan(const float* x, int64_t n, int64_t offset) {
    uint32_t bad = count_nonfinite(x, n);
    if (bad == 0) return;
    if (first < 0)
      for (int64_t i = 0; i < n; ++i)
        if (!std::isfinite(x[i])) {
          first = offset + i;
          first_value = x[i];
          break;
        }
    count += bad;
  }
};

class Loader {
 public:
  Loader(const std::string& dir, WeightType type, Weights& w)
      : ckpt_(std::make_shared<Checkpoint>(dir)), type_(type), w_(w) {
    const char* allow = std::getenv("SHORTRT_ALLOW_NONFINITE");
    allow_nonfinite_ = allow && std::string(allow) == "1";
  }

  const TensorView& tensor(const std::string& name, std::vector<int64_t> shape) {
    const TensorView& t = ckpt_->get(name, shape);
    if (!is_float_type(t.dtype))
      throw Error("tensor '" + name + "' in " + ckpt_->file_of(name) + " has dtype " + dtype_name(t.dtype) +
                  " (shortrt reads F32, BF16 and F16 weights)");
    return t;
  }

  // A small vector (norm weight, bias) as an owned f32 copy; plus_one: each element + 1 in fp32
  // (Gemma 3's RMSNorms scale by 1 + w, which transformers computes in float32).
  const float* vector(const std::string& name, int64_t n, bool plus_one = false) {
    const TensorView& t = tensor(name, {n});
    float* dst = alloc<float>(n);
    std::vector<float> tmp;
    std::memcpy(dst, f32_span(t, 0, n, tmp), n * sizeof(float));
    if (plus_one)
      for (int64_t i = 0; i < n; ++i) dst[i] = 1.0f + dst[i];
    NonFinite bad;
    bad.scan(dst, n, 0);
    report(t, bad);
    w_.bytes += n * sizeof(float);
    w_.bytes_per_token += n * sizeof(float);
    return dst;
  }

  // Several vectors concatenated (q|k|v biases, matching the stacked rows).
  const float* stacked_vector(const std::vector<std::string>& names, const std::vector<int64_t>& sizes) {
    int64_t total = 0;
    for (int64_t n : sizes) total += n;
    float* dst = alloc<float>(total);
    std::vector<float> tmp;
    for (size_t i = 0, off = 0; i < names.size(); off += sizes[i], ++i) {
      const TensorView& t = tensor(names[i], {sizes[i]});
      std::memcpy(dst + off, f32_span(t, 0, sizes[i], tmp), sizes[i] * sizeof(float));
      NonFinite bad;
      bad.scan(dst + off, sizes[i], 0);
      report(t, bad);
    }
    w_.bytes += total * sizeof(float);
    w_.bytes_per_token += total * sizeof(float);
    return dst;
  }

  // Several [rows_i, cols] tensors stacked by rows into one matrix (q|k|v, gate|up),
  // in the engine's weight type.
  WeightMatrix stacked(const std::vector<std::string>& names, const std::vector<int64_t>& rows, int64_t cols) {
    std::vector<const TensorView*> views;
    int64_t total = 0;
    for (size_t i = 0; i < names.size(); ++i) {
      views.push_back(&tensor(names[i], {rows[i], cols}));
      total += rows[i];
    }
    return pack(views, total, cols);
  }

  // Even an f32 matrix of an f32 checkpoint is copied rather than used in place:
  // the file mapping is in 4 KB pages, and decode streams every weight once per
  // token, which the arena's 2 MB pages serve faster (see page_buffer.h).
  WeightMatrix matrix(const std::string& name, int64_t rows, int64_t cols) {
    return pack({&tensor(name, {rows, cols})}, rows, cols);
  }

  // The same in another type than the engine's (the LM head's own format).
  WeightMatrix matrix_as(const std::string& name, int64_t rows, int64_t cols, WeightType type) {
    return pack({&tensor(name, {rows, cols})}, rows, cols, type);
  }

 private:
  // Arenas are this large unless one tensor needs more; the untouched tail of
  // the last one costs address space, not memory.
  static constexpr size_t kArenaBytes = size_t{64} << 20;

  template <class T>
  T* alloc(int64_t n) {
    const size_t bytes = (static_cast<size_t>(n) * sizeof(T) + 63) / 64 * 64;  // keep 64-byte alignment
    if (w_.arenas.empty() || w_.arena_used + bytes > w_.arenas.back().size()) {
      w_.arenas.emplace_back(std::max(bytes, kArenaBytes));
      w_.arena_used = 0;
    }
    T* p = reinterpret_cast<T*>(w_.arenas.back().as<uint8_t>() + w_.arena_used);
    w_.arena_used += bytes;
    return p;
  }

  // Converts the tensors chunk by chunk into one packed matrix, so no second
  // full f32 copy ever exists, then drops their pages from memory.
  WeightMatrix pack(const std::vector<const TensorView*>& views, int64_t rows, int64_t cols) {
    return pack(views, rows, cols, type_);
  }

  WeightMatrix pack(const std::vector<const TensorView*>& views, int64_t rows, int64_t cols, WeightType type) {
    if ((type == WeightType::Q8 || type == WeightType::Q4) && cols % kQ8Block != 0)
      throw Error(std::string(type == WeightType::Q8 ? "int8" : "int4") +
                  " weights need every matrix width to be a multiple of 32; '" + views[0]->name + "' has " +
                  std::to_string(cols) + " columns");
    WeightMatrix m;
    m.type = type;
    m.rows = rows;
    m.cols = cols;
    float* f32 = nullptr;
    uint16_t* bf16 = nullptr;
    BlockQ8* q8 = nullptr;
    BlockQ4* q4 = nullptr;  // row-major blocks while packing; interleaved in place at the end
    if (type == WeightType::F32) m.f32 = f32 = alloc<float>(rows * cols);
    if (type == WeightType::BF16) m.bf16 = bf16 = alloc<uint16_t>(rows * cols);
    if (type == WeightType::Q8) m.q8 = q8 = alloc<BlockQ8>(rows * cols / kQ8Block);
    if (type == WeightType::Q4) {
      BlockQ4x16* groups = alloc<BlockQ4x16>(q4_groups(rows) * (cols / kQ4Block));
      m.q4 = groups;
      q4 = reinterpret_cast<BlockQ4*>(groups);
    }
    constexpr int64_t kChunk = 1 << 16;  // a multiple of 32, so q8 blocks never straddle chunks
    std::vector<float> tmp;
    int64_t out = 0;  // elements written so far
    for (const TensorView* t : views) {
      int64_t n = t->numel();
      NonFinite bad;
      for (int64_t begin = 0; begin < n; begin += kChunk) {
        int64_t len = std::min(kChunk, n - begin);
        const float* src = f32_span(*t, begin, len, tmp);
        bad.scan(src, len, begin);
        if (f32) std::memcpy(f32 + out + begin, src, len * sizeof(float));
        if (bf16) pack_bf16(src, len, bf16 + out + begin);
        if (q8) quantize_q8(src, len, q8 + (out + begin) / kQ8Block);
        if (q4) {
          if (bad.count) report(*t, bad);  // the usual NaN/Inf error first; int4 then refuses them even if allowed
          try {
            quantize_q4(src, len, q4 + (out + begin) / kQ4Block);
          } catch (const Error& e) {
            throw Error("tensor '" + t->name + "' in " + ckpt_->file_of(t->name) + ": " + e.what());
          }
        }
        const size_t elem = t->nbytes / n;
        release_pages(t->data + begin * elem, len * elem);  // the whole pages inside this chunk
      }
      out += n;
      release_pages(t->data, t->nbytes);  // and the pages straddling chunk borders
      report(*t, bad);
    }
    if (q4) interleave_q4(q4, rows, cols / kQ4Block, const_cast<BlockQ4x16*>(m.q4));
    return m;
  }

  // A NaN or Inf weight makes every later activation garbage, so it is an
  // error unless the user opted in (SHORTRT_ALLOW_NONFINITE=1), then a warning.
  void report(const TensorView& t, const NonFinite& bad) {
    if (bad.count == 0) return;
    char first[64];
    std::snprintf(first, sizeof first, "%g", static_cast<double>(bad.first_value));
    std::string what = "tensor '" + t.name + "' in " + ckpt_->file_of(t.name) + " holds NaN/Inf values (" +
                       std::to_string(bad.count) + " of " + std::to_string(t.numel()) + ", the first at element " +
                       std::to_string(bad.first) + ": " + first + ")";
    if (!allow_nonfinite_) throw Error(what + "; set SHORTRT_ALLOW_NONFINITE=1 to load it anyway");
    std::fprintf(stderr, "shortrt: warning: %s; loading it anyway (SHORTRT_ALLOW_NONFINITE=1)\n", what.c_str());
  }

  std::shared_ptr<Checkpoint> ckpt_;
  WeightType type_;
  Weights& w_;
  bool allow_nonfinite_ = false;
};

std::string layer_prefix(int i) { return "model.layers." + std::to_string(i) + "."; }

}  // namespace

Weights load_weights(const std::string& dir, const ModelConfig& c, const LayerPlan& plan, WeightType type,
                     WeightType lm_head_type) {
  Weights w;
  w.type = type;
  Loader load(dir, type, w);
  const int64_t hidden = c.hidden, hd = c.head_dim, q_rows = c.n_heads * hd, kv_rows = c.n_kv_heads * hd;

  for (const PlannedLayer& p : plan.layers) {
    LayerWeights lw;
    lw.plan = p;
    std::string pre = layer_prefix(p.index);
    if (p.attention) {
      const bool one = c.norm_unit_offset;
      lw.attn_norm = load.vector(pre + (c.post_norm ? "post_attention_layernorm.weight" : "input_layernorm.weight"),
                                 hidden, one);
      if (c.sandwich_norm) lw.attn_post_norm = load.vector(pre + "post_attention_layernorm.weight", hidden, one);
      if (c.fused_projections) {  // Phi-3 stores q|k|v as one tensor, already in the runtime's row order
        lw.qkv = load.matrix(pre + "self_attn.qkv_proj.weight", q_rows + 2 * kv_rows, hidden);
      } else {
        lw.qkv = load.stacked({pre + "self_attn.q_proj.weight", pre + "self_attn.k_proj.weight",
                               pre + "self_attn.v_proj.weight"},
                              {q_rows, kv_rows, kv_rows}, hidden);
      }
      if (c.qkv_bias) {
        lw.qkv_bias = load.stacked_vector({pre + "self_attn.q_proj.bias", pre + "self_attn.k_proj.bias",
                                           pre + "self_attn.v_proj.bias"},
                                          {q_rows, kv_rows, kv_rows});
      }
      if (c.qk_norm) {
        lw.q_norm = load.vector(pre + "self_attn.q_norm.weight", c.qk_norm_whole ? q_rows : hd, one);
        lw.k_norm = load.vector(pre + "self_attn.k_norm.weight", c.qk_norm_whole ? kv_rows : hd, one);
      }
      lw.o = load.matrix(pre + "self_attn.o_proj.weight", hidden, q_rows);
      w.bytes += lw.qkv.bytes() + lw.o.bytes();
      w.bytes_per_token += lw.qkv.bytes() + lw.o.bytes();
    }
    if (p.mlp) {
      lw.mlp_norm = load.vector(pre + (c.sandwich_norm ? "pre_feedforward_layernorm.weight"
                                       : c.post_norm   ? "post_feedforward_layernorm.weight"
                                                       : "post_attention_layernorm.weight"),
                                hidden, c.norm_unit_offset);
      if (c.sandwich_norm)
        lw.mlp_post_norm = load.vector(pre + "post_feedforward_layernorm.weight", hidden, c.norm_unit_offset);
      if (c.fused_projections) {  // Phi-3's gate_up_proj: gate rows, then up rows, as the runtime stacks them
        lw.gate_up = load.matrix(pre + "mlp.gate_up_proj.weight", 2 * static_cast<int64_t>(c.intermediate), hidden);
      } else {
        lw.gate_up = load.stacked({pre + "mlp.gate_proj.weight", pre + "mlp.up_proj.weight"},
                                  {c.intermediate, c.intermediate}, hidden);
      }
      lw.down = load.matrix(pre + "mlp.down_proj.weight", hidden, c.intermediate);
      w.bytes += lw.gate_up.bytes() + lw.down.bytes();
      w.bytes_per_token += lw.gate_up.bytes() + lw.down.bytes();
    }
    w.layers.push_back(std::move(lw));
  }

  w.final_norm = load.vector("model.norm.weight", hidden, c.norm_unit_offset);
  w.embed = load.matrix("model.embed_tokens.weight", c.vocab, hidden);
  w.bytes += w.embed.bytes();
  if (c.tie_embeddings && lm_head_type == type) {
    w.lm_head = w.embed;  // one copy serves both
    w.bytes_per_token += w.lm_head.bytes();
  } else {
    // Untied, or tied but the head in its own format: a second copy of the tensor.
    w.lm_head = load.matrix_as(c.tie_embeddings ? "model.embed_tokens.weight" : "lm_head.weight", c.vocab, hidden,
                               lm_head_type);
    w.bytes += w.lm_head.bytes();
    w.bytes_per_token += w.lm_head.bytes();
  }
  return w;
}

void embedding_row(const WeightMatrix& embed, int64_t row, float* out) {
  const int64_t cols = embed.cols;
  switch (embed.type) {
    case WeightType::F32:
      std::memcpy(out, embed.f32 + row * cols, cols * sizeof(float));
      break;
    case WeightType::BF16:
      for (int64_t i = 0; i < cols; ++i) out[i] = bf16_to_f32(embed.bf16[row * cols + i]);
      break;
    case WeightType::Q8: {
      const BlockQ8* blocks = embed.q8 + row * (cols / kQ8Block);
      for (int64_t b = 0; b < cols / kQ8Block; ++b)
        for (int i = 0; i < kQ8Block; ++i) out[b * kQ8Block + i] = blocks[b].scale * blocks[b].q[i];
      break;
    }
    case WeightType::Q4:
      dequantize_q4_row(embed.q4, cols / kQ4Block, row, out);
      break;
  }
}

}  // namespace shortrt
