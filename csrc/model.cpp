#include "model.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>

#include "error.h"
#include "kernels_q4.h"

namespace shortrt {
namespace {

// Inverse RoPE frequencies as transformers computes them (float32 arithmetic) over the rotated
// dims (rotary_dim: head_dim, or Phi-3's partial share), including its linear and llama3 rescaling.
// long_context: longrope's long factors (else its short ones); other types ignore it.
std::vector<float> rope_inv_freq(const ModelConfig& c, bool long_context = false) {
  const int half = c.rotary_dim / 2;
  std::vector<float> inv(half);
  for (int i = 0; i < half; ++i) {
    float exponent = static_cast<float>(2 * i) / static_cast<float>(c.rotary_dim);
    inv[i] = 1.0f / std::pow(c.rope_theta, exponent);
  }
  if (c.rope_type == "longrope") {  // 1 / (factor * theta^e), as transformers' float32 tensors compute it
    const std::vector<float>& ext = long_context ? c.rope_long_factor : c.rope_short_factor;
    for (int i = 0; i < half; ++i)
      inv[i] = 1.0f / (ext[i] * std::pow(c.rope_theta, static_cast<float>(2 * i) / static_cast<float>(c.rotary_dim)));
  } else if (c.rope_type == "linear") {
    for (float& f : inv) f /= c.rope_factor;
  } else if (c.rope_type == "llama3") {
    const float old_len = static_cast<float>(c.rope_original_max_position);
    const float low_wavelen = old_len / c.rope_low_freq_factor;
    const float high_wavelen = old_len / c.rope_high_freq_factor;
    for (float& f : inv) {
      float wavelen = 2.0f * static_cast<float>(M_PI) / f;
      float scaled = wavelen > low_wavelen ? f / c.rope_factor : f;
      bool medium = !(wavelen < high_wavelen) && !(wavelen > low_wavelen);
      if (medium) {
        float smooth = (old_len / wavelen - c.rope_low_freq_factor) /
                       (c.rope_high_freq_factor - c.rope_low_freq_factor);
        scaled = (1.0f - smooth) * scaled / c.rope_factor + smooth * scaled;
      }
      f = scaled;
    }
  }
  return inv;
}

// Rotate-half RoPE (transformers' layout) over each head's first rotary_dim dims: pairs
// (i, i + rotary_dim/2) rotate by angle pos * inv_freq[i]; the dims past rotary_dim pass through.
void rope_heads(float* x, int n_heads, int head_dim, int rotary_dim, const float* cos, const float* sin) {
  const int half = rotary_dim / 2;
  for (int h = 0; h < n_heads; ++h, x += head_dim) {
    for (int i = 0; i < half; ++i) {
      float a = x[i], b = x[i + half];
      x[i] = a * cos[i] - b * sin[i];
      x[i + half] = b * cos[i] + a * sin[i];
    }
  }
}

// Gemma 3's GeGLU: out[i] = gelu_tanh(gate[i]) * up[i], GELU's tanh approximation as torch's
// gelu(approximate="tanh"): 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))). Scalar (it is not a hot
// path next to the matmuls around it).
void geglu_tanh(const float* gate, const float* up, float* out, int64_t n) {
  const float k = 0.7978845608028654f;  // sqrt(2 / pi)
  for (int64_t i = 0; i < n; ++i) {
    const float x = gate[i];
    out[i] = 0.5f * x * (1.0f + std::tanh(k * (x + 0.044715f * x * x * x))) * up[i];
  }
}

// Gemma 3's final_logit_softcapping: each logit to cap * tanh(logit / cap).
void softcap_rows(float* logits, int64_t n, float cap) {
  for (int64_t i = 0; i < n; ++i) logits[i] = cap * std::tanh(logits[i] / cap);
}

// The cache positions of each KV slot: max_seq, or for a sliding-window layer (Gemma 3) the window
// plus the most rows a step writes at once, less one: a step's rows are stored before its attention
// runs, and the first of them must still find its window's oldest key.
std::vector<int> slot_positions(const ModelConfig& c, const std::vector<char>& slot_sliding, int max_seq,
                                int max_chunk) {
  std::vector<int> out;
  for (char sliding : slot_sliding)
    out.push_back(sliding ? std::min<int64_t>(max_seq, static_cast<int64_t>(c.sliding_window) + max_chunk - 1)
                          : max_seq);
  return out;
}

}  // namespace

void FloatBuffer::Free::operator()(float* p) const { std::free(p); }

FloatBuffer::FloatBuffer(size_t n) : n_(n) {
  if (n == 0) return;
  size_t bytes = (n * sizeof(float) + 63) / 64 * 64;
  // Not zeroed on purpose: untouched pages of a large buffer stay out of the resident set.
  data_.reset(static_cast<float*>(std::aligned_alloc(64, bytes)));
  if (!data_) throw Error("out of memory allocating " + std::to_string(bytes) + " bytes");
}

State::State(const ModelConfig& c, int n_kv_slots, int max_seq_, int max_batch_, int max_chunk_, KvType kv_type,
             const std::vector<char>& slot_sliding)
    : max_seq(max_seq_), max_batch(max_batch_), max_chunk(max_chunk_),
      kv(kv_type,
         slot_sliding.empty() ? std::vector<int>(n_kv_slots, max_seq_)
                              : slot_positions(c, slot_sliding, max_seq_, max_chunk_),
         max_batch_, c.n_kv_heads, c.head_dim),
      attention(max_seq_, c.n_heads, c.n_kv_heads, c.head_dim, max_batch_) {
  const size_t chunk = max_chunk, hidden = c.hidden, inter = c.intermediate;
  const size_t q_width = static_cast<size_t>(c.n_heads) * c.head_dim;
  qkv_dim = static_cast<int64_t>(c.n_heads + 2 * c.n_kv_heads) * c.head_dim;
  x = FloatBuffer(chunk * hidden);
  xn = FloatBuffer(chunk * hidden);
  delta = FloatBuffer(chunk * hidden);
  qkv = FloatBuffer(chunk * qkv_dim);
  attn = FloatBuffer(chunk * q_width);
  gate_up = FloatBuffer(chunk * 2 * inter);
  act = FloatBuffer(chunk * inter);
  size_t widest = std::max({hidden, inter, q_width});
  xq.resize(chunk * ((widest + kQ8Block - 1) / kQ8Block));
  xq_sum.resize(xq.size());
  if (kernels().gemm_bf16_bf16) xb.resize(chunk * widest);
  logits = FloatBuffer(static_cast<size_t>(max_batch_) * c.vocab);
  row_seq.resize(chunk);
  row_pos.resize(chunk);
  row_long.resize(chunk);
  decode_args.resize(max_batch_);
  kv_bytes = kv.bytes();
}

Model::Model(const ModelConfig& config, Weights weights, int n_kv_slots, int max_seq)
    : config_(config), weights_(std::move(weights)), n_kv_slots_(n_kv_slots) {
  const int half = config_.rotary_dim / 2;
  // longrope's attention factor scales cos and sin (float32 products, as transformers'); 1 elsewhere.
  const float scale = config_.rope_type == "longrope" ? config_.rope_attention_factor : 1.0f;
  auto table = [&](const ModelConfig& rc, std::vector<float>& cos_t, std::vector<float>& sin_t, bool long_context) {
    std::vector<float> inv = rope_inv_freq(rc, long_context);
    cos_t.resize(static_cast<size_t>(max_seq) * half);
    sin_t.resize(static_cast<size_t>(max_seq) * half);
    for (int p = 0; p < max_seq; ++p) {
      for (int i = 0; i < half; ++i) {
        float angle = static_cast<float>(p) * inv[i];  // float32 product, as transformers does
        cos_t[static_cast<size_t>(p) * half + i] = std::cos(angle) * scale;
        sin_t[static_cast<size_t>(p) * half + i] = std::sin(angle) * scale;
      }
    }
  };
  table(config_, rope_cos_, rope_sin_, false);
  if (config_.rope_type == "longrope" && max_seq > config_.rope_original_max_position)
    table(config_, rope_long_cos_, rope_long_sin_, true);
  if (config_.rope_local_theta > 0) {  // Gemma 3's sliding layers: plain RoPE on their own base
    ModelConfig local = config_;
    local.rope_theta = config_.rope_local_theta;
    local.rope_type = "default";
    table(local, rope_local_cos_, rope_local_sin_, false);
  }
}

bool Model::sliding(const LayerWeights& lw) const {
  return !config_.layer_sliding.empty() && config_.layer_sliding[lw.plan.index];
}

void Model::project(State& s, ThreadPool& pool, const WeightMatrix& W, const float* x, int n, float* y,
                    int64_t ldy) const {
  Activation a{x, nullptr};
  if (W.type == WeightType::Q8 || W.type == WeightType::Q4) {
    quantize_activation_q8(x, n, W.cols, s.xq.data(), pool);
    a.q8 = s.xq.data();
  }
  if (W.type == WeightType::Q4) {
    activation_block_sums(s.xq.data(), n * (W.cols / kQ8Block), s.xq_sum.data());
    a.q8_sum = s.xq_sum.data();
  }
  const KernelTable& k = kernels();
  if (W.type == WeightType::BF16 && k.gemm_bf16_bf16) {  // one rounding serves the whole fused matrix
    const size_t need = static_cast<size_t>(n) * static_cast<size_t>(W.cols);
    if (s.xb.size() < need) s.xb.resize(need);  // the path was switched after this state was made
    round_activation_bf16(k, x, n, W.cols, s.xb.data(), pool);
    a.bf16 = s.xb.data();
  }
  matmul(k, W, a, n, y, ldy, pool);
}

void Model::attention_block(State& s, ThreadPool& pool, const LayerWeights& lw, const Segment* segs, int n_segs,
                            int n) const {
  const KernelTable& k = kernels();
  const ModelConfig& c = config_;
  const int hidden = c.hidden, hd = c.head_dim, nh = c.n_heads, nkv = c.n_kv_heads, half = c.rotary_dim / 2;
  const int64_t qkv_dim = s.qkv_dim, kv_width = static_cast<int64_t>(nkv) * hd;
  const int64_t q_width = static_cast<int64_t>(nh) * hd;
  float* x = s.x.data();
  float* xn = s.xn.data();
  float* qkv = s.qkv.data();
  float* attn = s.attn.data();

  if (c.post_norm) {  // OLMo-2: the attention reads the residual stream itself; its norm comes after
    project(s, pool, lw.qkv, x, n, qkv, qkv_dim);
  } else {
    pool.parallel_for(n, 16, [&](int64_t b, int64_t e) {
      for (int64_t t = b; t < e; ++t) k.rmsnorm_f32(x + t * hidden, lw.attn_norm, c.rms_eps, xn + t * hidden, hidden);
    });
    project(s, pool, lw.qkv, xn, n, qkv, qkv_dim);
  }

  // Each row's key and value go to its sequence's region of this layer's KV slot, converted
  // to the kv_dtype ([kv_head][pos][head_dim]: each kv head's keys are one stream; a ring of
  // positions for a sliding-window layer).
  const int slot = lw.plan.kv_slot;
  const bool local = sliding(lw) && !rope_local_cos_.empty();
  const std::vector<float>& cos_table = local ? rope_local_cos_ : rope_cos_;
  const std::vector<float>& sin_table = local ? rope_local_sin_ : rope_sin_;
  pool.parallel_for(n, 16, [&](int64_t b, int64_t e) {
    for (int64_t t = b; t < e; ++t) {
      float* row = qkv + t * qkv_dim;
      const int p = s.row_pos[t];
      if (lw.qkv_bias) k.axpy_f32(1.0f, lw.qkv_bias, row, qkv_dim);
      if (lw.q_norm && c.qk_norm_whole) {  // OLMo-2: q and k each normed as one vector, in place, before RoPE
        k.rmsnorm_f32(row, lw.q_norm, c.rms_eps, row, q_width);
        k.rmsnorm_f32(row + q_width, lw.k_norm, c.rms_eps, row + q_width, kv_width);
      } else if (lw.q_norm) {  // Qwen3: each head normed over head_dim, in place, before RoPE
        for (int h = 0; h < nh; ++h) k.rmsnorm_f32(row + h * hd, lw.q_norm, c.rms_eps, row + h * hd, hd);
        for (int h = 0; h < nkv; ++h) k.rmsnorm_f32(row + (nh + h) * hd, lw.k_norm, c.rms_eps, row + (nh + h) * hd, hd);
      }
      const bool long_row = s.row_long[t];  // longrope: the row's sequence is past the original context
      const float* cos = (long_row ? rope_long_cos_ : cos_table).data() + static_cast<size_t>(p) * half;
      const float* sin = (long_row ? rope_long_sin_ : sin_table).data() + static_cast<size_t>(p) * half;
      rope_heads(row, nh + nkv, hd, c.rotary_dim, cos, sin);  // q heads and k heads are adjacent
      s.kv.write(slot, s.row_seq[t], p, row + nh * hd, row + nh * hd + kv_width);
    }
  });

  // Attention runs per sequence on its own region at its own positions: prompt chunks one
  // by one, the decode tokens of every sequence in one parallel loop.
  int n_decode = 0;
  for (int i = 0; i < n_segs; ++i) {
    const Segment& g = segs[i];
    AttentionArgs args;
    args.qkv = qkv + g.first_row * qkv_dim;
    args.qkv_dim = qkv_dim;
    s.kv.view(slot, g.seq, args);
    args.n = g.n;
    args.pos = g.pos;
    args.n_heads = nh;
    args.n_kv_heads = nkv;
    args.head_dim = hd;
    args.scale = c.attn_scale;
    args.window = sliding(lw) ? c.sliding_window : 0;
    args.out = attn + g.first_row * q_width;
    // Decode reads each key once per kv head; a prompt chunk is worth two matmuls per kv head.
    if (g.n > kMaxDecodeTokens) {
      attention_matmul(args, s.attention, pool);
    } else {
      s.decode_args[n_decode++] = args;
    }
  }
  if (n_decode > 0) attention_decode_batch(s.decode_args.data(), n_decode, s.attention, pool, kernels());

  project(s, pool, lw.o, attn, n, s.delta.data(), hidden);
  if (c.post_norm) post_norm_rows(s, pool, lw.attn_norm, n);
  if (lw.attn_post_norm) post_norm_rows(s, pool, lw.attn_post_norm, n);  // Gemma 3
  k.axpy_f32(1.0f, s.delta.data(), x, static_cast<int64_t>(n) * hidden);
}

// OLMo-2: a sublayer's output rows (s.delta) RMS-normed in place before the residual add.
void Model::post_norm_rows(State& s, ThreadPool& pool, const float* weight, int n) const {
  const KernelTable& k = kernels();
  const int hidden = config_.hidden;
  float* delta = s.delta.data();
  pool.parallel_for(n, 16, [&](int64_t b, int64_t e) {
    for (int64_t t = b; t < e; ++t)
      k.rmsnorm_f32(delta + t * hidden, weight, config_.rms_eps, delta + t * hidden, hidden);
  });
}

void Model::mlp_block(State& s, ThreadPool& pool, const LayerWeights& lw, int n) const {
  const KernelTable& k = kernels();
  const int hidden = config_.hidden, inter = config_.intermediate;
  float* x = s.x.data();
  float* xn = s.xn.data();
  float* gate_up = s.gate_up.data();
  float* act = s.act.data();
  if (!config_.post_norm) {
    pool.parallel_for(n, 16, [&](int64_t b, int64_t e) {
      for (int64_t t = b; t < e; ++t)
        k.rmsnorm_f32(x + t * hidden, lw.mlp_norm, config_.rms_eps, xn + t * hidden, hidden);
    });
  }
  project(s, pool, lw.gate_up, config_.post_norm ? x : xn, n, gate_up, 2 * inter);
  const bool geglu = config_.gelu_tanh;
  pool.parallel_for(n, 4, [&](int64_t b, int64_t e) {
    for (int64_t t = b; t < e; ++t) {
      if (geglu) {
        geglu_tanh(gate_up + t * 2 * inter, gate_up + t * 2 * inter + inter, act + t * inter, inter);
      } else {
        k.swiglu_f32(gate_up + t * 2 * inter, gate_up + t * 2 * inter + inter, act + t * inter, inter);
      }
    }
  });
  project(s, pool, lw.down, act, n, s.delta.data(), hidden);
  if (config_.post_norm) post_norm_rows(s, pool, lw.mlp_norm, n);
  if (lw.mlp_post_norm) post_norm_rows(s, pool, lw.mlp_post_norm, n);  // Gemma 3
  k.axpy_f32(1.0f, s.delta.data(), x, static_cast<int64_t>(n) * hidden);
}

void Model::run_layers(State& s, ThreadPool& pool, const int* tokens, const Segment* segs, int n_segs,
                       int n) const {
  if (n < 1 || n > s.max_chunk || n_segs < 1 || n_segs > s.max_batch)
    throw Error("internal: a step of " + std::to_string(n) + " rows in " + std::to_string(n_segs) + " segments");
  int next_row = 0;
  for (int i = 0; i < n_segs; ++i) {
    const Segment& g = segs[i];
    if (g.first_row != next_row || g.n < 1 || g.pos < 0 || g.pos + g.n > s.max_seq || g.seq < 0 ||
        g.seq >= s.max_batch)
      throw Error("internal: bad segment (seq " + std::to_string(g.seq) + ", pos " + std::to_string(g.pos) +
                  ", rows " + std::to_string(g.first_row) + "+" + std::to_string(g.n) + ")");
    // longrope (Phi-3): the caller says which factors a segment's sequence uses (the engine re-runs a
    // sequence from position 0 with the long ones when it outgrows the original context).
    if (g.long_rope ? !has_long_rope()
                    : config_.rope_type == "longrope" && g.pos + g.n > config_.rope_original_max_position)
      throw Error("internal: a longrope segment at positions " + std::to_string(g.pos) + "+" + std::to_string(g.n) +
                  (g.long_rope ? " asks for the long factors, which this model has not built"
                               : " is past the original context with the short factors"));
    for (int t = 0; t < g.n; ++t) {
      s.row_seq[g.first_row + t] = g.seq;
      s.row_pos[g.first_row + t] = g.pos + t;
      s.row_long[g.first_row + t] = g.long_rope;
    }
    next_row += g.n;
  }
  if (next_row != n) throw Error("internal: segments cover " + std::to_string(next_row) + " of " + std::to_string(n));
  const int hidden = config_.hidden;
  for (int t = 0; t < n; ++t) embedding_row(weights_.embed, tokens[t], s.x.data() + static_cast<size_t>(t) * hidden);
  if (config_.embed_scale != 1.0f) {  // Gemma 3: the embedding times sqrt(hidden) (a float32 scalar)
    float* x = s.x.data();
    for (int64_t i = 0; i < static_cast<int64_t>(n) * hidden; ++i) x[i] *= config_.embed_scale;
  }
  for (const LayerWeights& lw : weights_.layers) {
    if (lw.plan.attention) attention_block(s, pool, lw, segs, n_segs, n);
    if (lw.plan.mlp) mlp_block(s, pool, lw, n);
  }
}

void Model::forward_step(State& s, ThreadPool& pool, const int* tokens, const Segment* segs, int n_segs) const {
  const int n = segs[n_segs - 1].first_row + segs[n_segs - 1].n;
  run_layers(s, pool, tokens, segs, n_segs, n);
  // The last rows of the segments that want logits, normalised side by side, then one lm_head matmul.
  const KernelTable& k = kernels();
  const int hidden = config_.hidden;
  int m = 0;
  for (int i = 0; i < n_segs; ++i) {
    if (!segs[i].logits) continue;
    const float* last = s.x.data() + static_cast<size_t>(segs[i].first_row + segs[i].n - 1) * hidden;
    k.rmsnorm_f32(last, weights_.final_norm, config_.rms_eps, s.xn.data() + static_cast<size_t>(m) * hidden, hidden);
    ++m;
  }
  if (m > 0) project(s, pool, weights_.lm_head, s.xn.data(), m, s.logits.data(), config_.vocab);
  if (m > 0 && config_.final_softcap > 0)
    softcap_rows(s.logits.data(), static_cast<int64_t>(m) * config_.vocab, config_.final_softcap);
}

void Model::forward_all_logits(State& s, ThreadPool& pool, int seq, const int* tokens, int n, int pos,
                               float* all_logits, bool long_rope) const {
  Segment g;
  g.seq = seq;
  g.pos = pos;
  g.n = n;
  g.long_rope = long_rope;
  run_layers(s, pool, tokens, &g, 1, n);
  const KernelTable& k = kernels();
  const int hidden = config_.hidden;
  pool.parallel_for(n, 16, [&](int64_t b, int64_t e) {
    for (int64_t t = b; t < e; ++t)
      k.rmsnorm_f32(s.x.data() + t * hidden, weights_.final_norm, config_.rms_eps, s.xn.data() + t * hidden, hidden);
  });
  project(s, pool, weights_.lm_head, s.xn.data(), n, all_logits, config_.vocab);
  if (config_.final_softcap > 0) softcap_rows(all_logits, static_cast<int64_t>(n) * config_.vocab, config_.final_softcap);
}

}  // namespace shortrt
