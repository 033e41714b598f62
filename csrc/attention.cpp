#include "attention.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <limits>
#include <string>

#include "error.h"
#include "kernels.h"

namespace shortrt {
namespace {

constexpr int kMaxHeadDim = 512;    // the largest head_dim the attention paths accept
constexpr int kKeyBlock = 64;       // keys scored per step of the online softmax
constexpr int kTokenBlock = 64;     // query tokens per step of the matmul path

}  // namespace

void AttentionScratch::Free::operator()(float* p) const { std::free(p); }

AttentionScratch::AttentionScratch(int max_seq, int n_heads, int n_kv_heads, int head_dim, int max_segments) {
  if (head_dim > kMaxHeadDim)
    throw Error("head_dim " + std::to_string(head_dim) + " exceeds the supported maximum of " +
                std::to_string(kMaxHeadDim));
  const int group = n_heads / n_kv_heads, sub = std::min(group, kMaxAttendGroup);
  const int n_sub = (group + sub - 1) / sub;
  // (+1: a sliding window's keys may wrap around its ring once, splitting one range in two)
  decode_items = static_cast<int64_t>(std::max(1, max_segments)) * kMaxDecodeTokens * n_kv_heads * n_sub *
                 ((max_seq + kAttendChunk - 1) / kAttendChunk + 1);
  decode_item_floats = static_cast<int64_t>(sub) * (head_dim + 2);
  const size_t rows = static_cast<size_t>(kTokenBlock) * group;
  const size_t seq = max_seq, hd = head_dim;
  auto padded = [](size_t n) { return (n + 15) / 16 * 16; };  // keep each array 64-byte aligned
  const size_t key_blocks = (seq + kTileKeys - 1) / kTileKeys * kTileKeys;  // attend_tile's zero-padded blocks
  const size_t sizes[] = {padded(key_blocks * hd), padded(hd * seq), padded(rows * hd),
                          padded(rows * seq), padded(rows * hd),
                          padded(static_cast<size_t>(decode_items * decode_item_floats))};
  size_t total = 0;
  for (size_t s : sizes) total += s;
  // Not zeroed: only the part a prompt uses is ever touched.
  storage.reset(static_cast<float*>(std::aligned_alloc(64, total * sizeof(float))));
  if (!storage) throw Error("out of memory allocating the attention scratch");
  float* p = storage.get();
  keys = p;
  values_t = p += sizes[0];
  queries = p += sizes[1];
  scores = p += sizes[2];
  out = p += sizes[3];
  decode_state = p += sizes[4];
}

namespace {

// The rows of one range of the cache as the reference kernel reads them: element
// i of key (value) row j as float, and for int8 the rows' scales.
template <KvType Type>
struct RefRows {
  const void* keys;
  const void* values;
  int64_t stride;
  const float* key_scales = nullptr;
  const float* value_scales = nullptr;
  int64_t scale_stride = 0;
  static constexpr bool kScaled = Type == KvType::Q8;
  float key(int64_t j, int i) const { return kv_element(Type, keys, j * stride + i); }
  float value(int64_t j, int i) const { return kv_element(Type, values, j * stride + i); }
};

template <KvType Type>
void attend_ref(const float* q, int group, const RefRows<Type>& rows, int64_t n_keys, int hd, float scale,
                float* acc, float* m, float* l) {
  float scores[kKeyBlock];
  for (int g = 0; g < group; ++g) {
    const float* qg = q + g * hd;
    float* a = acc + g * hd;
    std::fill(a, a + hd, 0.0f);
    float running_max = -std::numeric_limits<float>::infinity(), denom = 0.0f;
    for (int64_t j0 = 0; j0 < n_keys; j0 += kKeyBlock) {
      const int nb = static_cast<int>(std::min<int64_t>(kKeyBlock, n_keys - j0));
      float block_max = -std::numeric_limits<float>::infinity();
      for (int j = 0; j < nb; ++j) {
        float dot = 0.0f;
        for (int i = 0; i < hd; ++i) dot += qg[i] * rows.key(j0 + j, i);
        if constexpr (RefRows<Type>::kScaled) dot *= rows.key_scales[(j0 + j) * rows.scale_stride];
        scores[j] = dot * scale;
        block_max = std::max(block_max, scores[j]);
      }
      if (block_max > running_max) {  // rescale what was accumulated under the old maximum
        const float factor = std::exp(running_max - block_max);
        denom *= factor;
        for (int i = 0; i < hd; ++i) a[i] *= factor;
        running_max = block_max;
      }
      for (int j = 0; j < nb; ++j) {
        const float p = std::exp(scores[j] - running_max);
        denom += p;
        float pv = p;
        if constexpr (RefRows<Type>::kScaled) pv *= rows.value_scales[(j0 + j) * rows.scale_stride];
        for (int i = 0; i < hd; ++i) a[i] += pv * rows.value(j0 + j, i);
      }
    }
    m[g] = running_max;
    l[g] = denom;
  }
}

}  // namespace

void attend_tile_ref(const float* q, int64_t ldq, float* out, int64_t ldo, int n_tok, int group, int hd, float scale,
                     const float* kt, const float* v, int64_t ldv, int64_t pos0) {
  for (int r = 0; r < n_tok * group; ++r) {
    const float* qr = q + (r / group) * ldq + (r % group) * hd;
    float* o = out + (r / group) * ldo + (r % group) * hd;
    const int64_t last = pos0 + r / group;  // the row's last visible key
    std::fill(o, o + hd, 0.0f);
    float m = -std::numeric_limits<float>::infinity(), l = 0.0f;
    for (int64_t j0 = 0; j0 <= last; j0 += kTileKeys) {
      const float* kb = kt + j0 * hd;  // block j0 / kTileKeys: [hd][kTileKeys]
      const int nvis = static_cast<int>(std::min<int64_t>(kTileKeys, last + 1 - j0));
      float sc[kTileKeys];
      float block_max = -std::numeric_limits<float>::infinity();
      for (int j = 0; j < nvis; ++j) {
        float dot = 0.0f;
        for (int i = 0; i < hd; ++i) dot += qr[i] * kb[i * kTileKeys + j];
        sc[j] = scale * dot;
        block_max = std::max(block_max, sc[j]);
      }
      const float m_new = std::max(m, block_max);
      const float c = m == -std::numeric_limits<float>::infinity() ? 0.0f : std::exp(m - m_new);
      l *= c;
      for (int i = 0; i < hd; ++i) o[i] *= c;
      for (int j = 0; j < nvis; ++j) {
        const float p = std::exp(sc[j] - m_new);
        l += p;
        const float* vj = v + (j0 + j) * ldv;
        for (int i = 0; i < hd; ++i) o[i] += p * vj[i];
      }
      m = m_new;
    }
    for (int i = 0; i < hd; ++i) o[i] /= l;
  }
}

void f16_to_f32_row_ref(const uint16_t* x, int64_t n, float* out) {
  for (int64_t i = 0; i < n; ++i) out[i] = f16_to_f32(x[i]);
}

void attend_partial_ref(const float* q, int group, const float* keys, const float* values, int64_t stride,
                        int64_t n_keys, int hd, float scale, float* acc, float* m, float* l) {
  attend_ref(q, group, RefRows<KvType::F32>{keys, values, stride}, n_keys, hd, scale, acc, m, l);
}

void attend_partial_f16_ref(const float* q, int group, const uint16_t* keys, const uint16_t* values, int64_t stride,
                            int64_t n_keys, int hd, float scale, float* acc, float* m, float* l) {
  attend_ref(q, group, RefRows<KvType::F16>{keys, values, stride}, n_keys, hd, scale, acc, m, l);
}

void attend_partial_bf16_ref(const float* q, int group, const uint16_t* keys, const uint16_t* values,
                             int64_t stride, int64_t n_keys, int hd, float scale, float* acc, float* m, float* l) {
  attend_ref(q, group, RefRows<KvType::BF16>{keys, values, stride}, n_keys, hd, scale, acc, m, l);
}

void attend_partial_q8_ref(const float* q, int group, const int8_t* keys, const int8_t* values, int64_t stride,
                           const float* key_scales, const float* value_scales, int64_t scale_stride,
                           int64_t n_keys, int hd, float scale, float* acc, float* m, float* l) {
  attend_ref(q, group, RefRows<KvType::Q8>{keys, values, stride, key_scales, value_scales, scale_stride}, n_keys,
             hd, scale, acc, m, l);
}

namespace {

float scale_of(const AttentionArgs& a) {
  return a.scale > 0.0f ? a.scale : 1.0f / std::sqrt(static_cast<float>(a.head_dim));
}

int64_t row_of(const AttentionArgs& a, int64_t position) { return a.ring > 0 ? position % a.ring : position; }

// The keys decode token t reads, in position order: positions lo..hi-1 (lo = 0, or the window's
// first), cut where they wrap around the ring, each piece in ranges of kAttendChunk keys, so every
// range is contiguous in the cache. The ranges depend only on (pos + t, window, ring).
struct DecodeKeys {
  int64_t lo, hi, wrap, first_piece_chunks, n_chunks;
  DecodeKeys(const AttentionArgs& a, int t) {
    const int64_t p = a.pos + t;
    hi = p + 1;
    lo = a.window > 0 ? std::max<int64_t>(0, p - a.window + 1) : 0;
    wrap = a.ring > 0 ? std::min(hi, (lo / a.ring + 1) * a.ring) : hi;
    first_piece_chunks = (wrap - lo + kAttendChunk - 1) / kAttendChunk;
    n_chunks = first_piece_chunks + (hi - wrap + kAttendChunk - 1) / kAttendChunk;
  }
  // Range c as positions [begin, end).
  void range(int64_t c, int64_t& begin, int64_t& end) const {
    if (c < first_piece_chunks) {
      begin = lo + c * kAttendChunk;
      end = std::min(wrap, begin + kAttendChunk);
    } else {
      begin = wrap + (c - first_piece_chunks) * kAttendChunk;
      end = std::min(hi, begin + kAttendChunk);
    }
  }
};

}  // namespace

void attention_decode(const AttentionArgs& a, AttentionScratch& scratch, ThreadPool& pool) {
  attention_decode(a, scratch, pool, kernels());
}

void attention_decode(const AttentionArgs& a, AttentionScratch& scratch, ThreadPool& pool, const KernelTable& k) {
  attention_decode_batch(&a, 1, scratch, pool, k);
}

void attention_decode_batch(const AttentionArgs* segs, int n_segs, AttentionScratch& scratch, ThreadPool& pool,
                            const KernelTable& k) {
  if (n_segs < 1) return;
  const AttentionArgs& a0 = segs[0];  // every segment has the same head layout (one model)
  const int hd = a0.head_dim, nh = a0.n_heads, group = a0.n_heads / a0.n_kv_heads;
  const int sub = std::min(group, kMaxAttendGroup), n_sub = (group + sub - 1) / sub;
  const float scale = scale_of(a0);
  const int64_t per_item = static_cast<int64_t>(sub) * (hd + 2);  // acc, then m, then l
  if (per_item > scratch.decode_item_floats)
    throw Error("internal: attention_decode needs more scratch than was allocated at load");

  // Work items, in order: segment, its token t (which sees keys 0..pos+t), kv head,
  // sub-group of its q heads, range c of keys. Row j = (segment, token) of the step owns
  // items first[j] .. first[j + 1]; rows are at most kMaxDecodeTokens per segment.
  int64_t total = 0;
  for (int i = 0; i < n_segs; ++i) {
    const AttentionArgs& a = segs[i];
    if (a.n < 1 || a.n > kMaxDecodeTokens)
      throw Error("internal: attention_decode takes 1.." + std::to_string(kMaxDecodeTokens) + " tokens, got " +
                  std::to_string(a.n));
    for (int t = 0; t < a.n; ++t) total += static_cast<int64_t>(a.n_kv_heads) * n_sub * DecodeKeys(a, t).n_chunks;
  }
  if (total > scratch.decode_items)
    throw Error("internal: attention_decode needs more scratch than was allocated at load");
  float* const state = scratch.decode_state;

  // Row j's segment, token, chunk count and first item, found by walking the rows (few).
  struct Row {
    int seg, t;
    int64_t n_chunks, first;
  };
  auto row_of_item = [&](int64_t u) {
    int64_t first = 0;
    for (int i = 0; i < n_segs; ++i)
      for (int t = 0; t < segs[i].n; ++t) {
        const int64_t nc = DecodeKeys(segs[i], t).n_chunks;
        const int64_t count = static_cast<int64_t>(segs[i].n_kv_heads) * n_sub * nc;
        if (u < first + count) return Row{i, t, nc, first};
        first += count;
      }
    return Row{n_segs - 1, segs[n_segs - 1].n - 1, 0, first};  // not reached
  };

  pool.parallel_for(total, 1, [&](int64_t b, int64_t e) {
    for (int64_t u = b; u < e; ++u) {
      const Row row = row_of_item(u);
      const AttentionArgs& a = segs[row.seg];
      const int t = row.t;
      const int64_t r = u - row.first, nc = row.n_chunks;
      const int kv = static_cast<int>(r / (n_sub * nc)), s = static_cast<int>(r / nc % n_sub);
      int64_t begin, end;
      DecodeKeys(a, t).range(r % nc, begin, end);
      const int heads = std::min(sub, group - s * sub);
      const int h0 = kv * group + s * sub;
      float* st = state + u * per_item;
      const int64_t at = kv * a.kv_head_stride + row_of(a, begin) * a.kv_row_stride;
      const float* q = a.qkv + t * a.qkv_dim + h0 * hd;
      float *acc = st, *m = st + sub * hd, *l = st + sub * hd + sub;
      switch (a.kv_type) {
        case KvType::F32:
          k.attend_partial(q, heads, static_cast<const float*>(a.keys) + at, static_cast<const float*>(a.values) + at,
                           a.kv_row_stride, end - begin, hd, scale, acc, m, l);
          break;
        case KvType::F16:
          k.attend_partial_f16(q, heads, static_cast<const uint16_t*>(a.keys) + at,
                               static_cast<const uint16_t*>(a.values) + at, a.kv_row_stride, end - begin, hd, scale,
                               acc, m, l);
          break;
        case KvType::BF16:
          k.attend_partial_bf16(q, heads, static_cast<const uint16_t*>(a.keys) + at,
                                static_cast<const uint16_t*>(a.values) + at, a.kv_row_stride, end - begin, hd, scale,
                                acc, m, l);
          break;
        case KvType::Q8: {
          const int64_t s_at = kv * a.scale_head_stride + row_of(a, begin) * a.scale_row_stride;
          k.attend_partial_q8(q, heads, static_cast<const int8_t*>(a.keys) + at,
                              static_cast<const int8_t*>(a.values) + at, a.kv_row_stride, a.key_scales + s_at,
                              a.value_scales + s_at, a.scale_row_stride, end - begin, hd, scale, acc, m, l);
          break;
        }
      }
    }
  });

  // Merge each head's ranges in key order: out = sum_c acc_c e^(m_c - M) / sum_c l_c e^(m_c - M).
  int64_t row_first = 0;
  for (int i = 0; i < n_segs; ++i) {
    const AttentionArgs& a = segs[i];
    for (int t = 0; t < a.n; ++t) {
      const int64_t nc = DecodeKeys(a, t).n_chunks;
      for (int h = 0; h < nh; ++h) {
        const int kv = h / group, s = (h % group) / sub, g = (h % group) % sub;
        const int64_t u0 = row_first + (static_cast<int64_t>(kv) * n_sub + s) * nc;
        float* out = a.out + static_cast<int64_t>(t) * nh * hd + static_cast<int64_t>(h) * hd;
        auto acc_of = [&](int64_t c) { return state + (u0 + c) * per_item + g * hd; };
        auto m_of = [&](int64_t c) { return state[(u0 + c) * per_item + sub * hd + g]; };
        auto l_of = [&](int64_t c) { return state[(u0 + c) * per_item + sub * hd + sub + g]; };
        if (nc == 1) {
          const float inv = 1.0f / l_of(0);
          for (int j = 0; j < hd; ++j) out[j] = acc_of(0)[j] * inv;
          continue;
        }
        float top = m_of(0);
        for (int64_t c = 1; c < nc; ++c) top = std::max(top, m_of(c));
        float denom = 0.0f;
        std::fill(out, out + hd, 0.0f);
        for (int64_t c = 0; c < nc; ++c) {
          const float w = std::exp(m_of(c) - top);
          denom += l_of(c) * w;
          const float* acc = acc_of(c);
          for (int j = 0; j < hd; ++j) out[j] += acc[j] * w;
        }
        const float inv = 1.0f / denom;
        for (int j = 0; j < hd; ++j) out[j] *= inv;
      }
      row_first += static_cast<int64_t>(a.n_kv_heads) * n_sub * nc;
    }
  }
}

namespace {

// Row j of kv head h of a cache array (keys or values, with their scales) as fp32 (f16 on
// the kernel path's converter, the others by kv_load_row, whose loops vectorize).
void load_row(const KernelTable& k, const AttentionArgs& a, const void* base, const float* scales, int h, int64_t j,
              float* out) {
  const int64_t at = h * a.kv_head_stride + j * a.kv_row_stride;
  const float scale = scales ? scales[h * a.scale_head_stride + j * a.scale_row_stride] : 1.0f;
  switch (a.kv_type) {
    case KvType::F32: return kv_load_row(a.kv_type, static_cast<const float*>(base) + at, scale, a.head_dim, out);
    case KvType::F16: return k.f16_to_f32_row(static_cast<const uint16_t*>(base) + at, a.head_dim, out);
    case KvType::BF16:
      return kv_load_row(a.kv_type, static_cast<const uint16_t*>(base) + at, scale, a.head_dim, out);
    case KvType::Q8: return kv_load_row(a.kv_type, static_cast<const int8_t*>(base) + at, scale, a.head_dim, out);
  }
}

}  // namespace

void attention_matmul_blocks(const AttentionArgs& a, AttentionScratch& s, ThreadPool& pool, const KernelTable& k) {
  const int hd = a.head_dim, group = a.n_heads / a.n_kv_heads;
  const int64_t total_keys = a.pos + a.n;
  const float scale = scale_of(a);
  const bool windowed = a.window > 0;

  for (int g = 0; g < a.n_kv_heads; ++g) {
    // This kv head's keys as a contiguous fp32 [keys][head_dim] matrix (a prefix serves every
    // block): the cache's own rows when they are contiguous fp32, else a converted copy. A sliding
    // window's keys are copied per block, in position order, out of its ring.
    const float* keys = static_cast<const float*>(a.keys) + g * a.kv_head_stride;
    if (!windowed && (a.kv_type != KvType::F32 || a.kv_row_stride != hd)) {
      for (int64_t j = 0; j < total_keys; ++j) load_row(k, a, a.keys, a.key_scales, g, j, s.keys + j * hd);
      keys = s.keys;
    }
    for (int t0 = 0; t0 < a.n; t0 += kTokenBlock) {
      const int nt = std::min(kTokenBlock, a.n - t0);
      // The block sees keys at positions lo..lo+n_keys-1 (lo: its first token's window start).
      const int64_t lo = windowed ? std::max<int64_t>(0, a.pos + t0 - a.window + 1) : 0;
      const int64_t n_keys = a.pos + t0 + nt - lo;
      if (windowed) {
        for (int64_t j = 0; j < n_keys; ++j)
          load_row(k, a, a.keys, a.key_scales, g, row_of(a, lo + j), s.keys + j * hd);
        keys = s.keys;
      }
      const int rows = nt * group;             // row r = (token t0 + r / group, head g*group + r % group)
      for (int r = 0; r < rows; ++r) {
        const float* q = a.qkv + (t0 + r / group) * a.qkv_dim + (g * group + r % group) * hd;
        for (int i = 0; i < hd; ++i) s.queries[r * hd + i] = q[i] * scale;
      }
      // V^T with row stride n_keys, as the second matmul's weight.
      for (int64_t j = 0; j < n_keys; ++j) {
        float v[kMaxHeadDim];
        load_row(k, a, a.values, a.value_scales, g, row_of(a, lo + j), v);
        for (int i = 0; i < hd; ++i) s.values_t[i * n_keys + j] = v[i];
      }

      WeightMatrix K;
      K.type = WeightType::F32;
      K.rows = n_keys;
      K.cols = hd;
      K.f32 = keys;
      matmul(k, K, Activation{s.queries, nullptr}, rows, s.scores, n_keys, pool);

      pool.parallel_for(rows, 8, [&](int64_t b, int64_t e) {
        for (int64_t r = b; r < e; ++r) {
          float* row = s.scores + r * n_keys;
          const int64_t p = a.pos + t0 + r / group;  // the row's position: keys first..p - lo of the block
          const int64_t first = windowed ? std::max<int64_t>(lo, p - a.window + 1) - lo : 0;
          const int64_t visible = p + 1 - lo;
          k.softmax_f32(row + first, visible - first);
          std::fill(row, row + first, 0.0f);  // outside the window
          std::fill(row + visible, row + n_keys, 0.0f);  // causal mask
        }
      });

      WeightMatrix Vt;
      Vt.type = WeightType::F32;
      Vt.rows = hd;
      Vt.cols = n_keys;
      Vt.f32 = s.values_t;
      matmul(k, Vt, Activation{s.scores, nullptr}, rows, s.out, hd, pool);

      for (int r = 0; r < rows; ++r) {
        float* dst = a.out + static_cast<int64_t>(t0 + r / group) * a.n_heads * hd + (g * group + r % group) * hd;
        std::copy(s.out + r * hd, s.out + (r + 1) * hd, dst);
      }
    }
  }
}

void attention_matmul(const AttentionArgs& a, AttentionScratch& s, ThreadPool& pool, const KernelTable& k) {
  const int hd = a.head_dim, group = a.n_heads / a.n_kv_heads;
  if (a.window > 0 || group > kMaxTileRows) {
    attention_matmul_blocks(a, s, pool, k);
    return;
  }
  const int64_t total_keys = a.pos + a.n, n_key_blocks = (total_keys + kTileKeys - 1) / kTileKeys;
  const float scale = scale_of(a);
  const int tile_tokens = kMaxTileRows / group;
  const int n_tiles = (a.n + tile_tokens - 1) / tile_tokens;
  for (int g = 0; g < a.n_kv_heads; ++g) {
    // Keys as transposed fp32 blocks [block][hd][kTileKeys], the last one zero-padded.
    pool.parallel_for(n_key_blocks, 4, [&](int64_t b0, int64_t b1) {
      float row[kMaxHeadDim];
      for (int64_t b = b0; b < b1; ++b) {
        float* kb = s.keys + b * kTileKeys * hd;
        for (int jj = 0; jj < kTileKeys; ++jj) {
          const int64_t j = b * kTileKeys + jj;
          if (j < total_keys) load_row(k, a, a.keys, a.key_scales, g, row_of(a, j), row);
          else std::fill(row, row + hd, 0.0f);
          for (int i = 0; i < hd; ++i) kb[i * kTileKeys + jj] = row[i];
        }
      }
    });
    // Values: the cache's own rows when fp32, else converted rows [key][hd].
    const float* v = static_cast<const float*>(a.values) + g * a.kv_head_stride;
    int64_t ldv = a.kv_row_stride;
    if (a.kv_type != KvType::F32) {
      pool.parallel_for(total_keys, 64, [&](int64_t j0, int64_t j1) {
        for (int64_t j = j0; j < j1; ++j) load_row(k, a, a.values, a.value_scales, g, row_of(a, j), s.values_t + j * hd);
      });
      v = s.values_t;
      ldv = hd;
    }
    // The last tiles see the most keys: hand them out first.
    pool.parallel_for(n_tiles, 1, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) {
        const int t0 = (n_tiles - 1 - static_cast<int>(i)) * tile_tokens, nt = std::min(tile_tokens, a.n - t0);
        k.attend_tile(a.qkv + static_cast<int64_t>(t0) * a.qkv_dim + static_cast<int64_t>(g) * group * hd, a.qkv_dim,
                      a.out + static_cast<int64_t>(t0) * a.n_heads * hd + static_cast<int64_t>(g) * group * hd,
                      static_cast<int64_t>(a.n_heads) * hd, nt, group, hd, scale, s.keys, v, ldv, a.pos + t0);
      }
    });
  }
}

void attention_matmul(const AttentionArgs& a, AttentionScratch& s, ThreadPool& pool) {
  attention_matmul(a, s, pool, kernels());
}

}  // namespace shortrt
