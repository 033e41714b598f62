// AVX2/FMA versions of the decode attention kernel over the KV cache, the twins
// of attend_partial_ref (and its f16 / bf16 / int8 siblings) in attention.cpp:
// the avx2 KernelTable's attend_partial* entries. Compiled with -mavx2 -mfma
// -mf16c; called only on the avx2 (and avx512) paths.
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>

#include "attention.h"
#include "kernels.h"

namespace shortrt {
namespace detail {
namespace {

constexpr int kKeyBlock = 64;  // keys scored per step of the online softmax

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// How the kernel reads 8 consecutive elements of a cache row as 8 floats, per
// kv_dtype: converted in registers, so a compact cache is read at its own size.
struct F32Rows {
  using T = float;
  static constexpr bool kScaled = false;
  static __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
};
struct F16Rows {
  using T = uint16_t;
  static constexpr bool kScaled = false;
  static __m256 load8(const uint16_t* p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
};
struct BF16Rows {
  using T = uint16_t;
  static constexpr bool kScaled = false;
  static __m256 load8(const uint16_t* p) {
    const __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    return _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16));
  }
};
struct Q8Rows {  // without the row's scale, which the kernel applies to the score and the value weight
  using T = int8_t;
  static constexpr bool kScaled = true;
  static __m256 load8(const int8_t* p) {
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
  }
};

// HD8 = head_dim / 8 when known at compile time, 0 for any multiple of 8. Per
// head the operations are those of the reference twin in the same order except
// that each dot product runs as two 8-wide chains; the group's heads share every
// key and value row read, so the cache is read once per kv head, not per q head.
// Rows::kScaled (int8): key_scales / value_scales hold each row's scale, every
// scale_stride floats.
template <int HD8, class Rows>
void attend(const float* q, int group, const typename Rows::T* keys, const typename Rows::T* values, int64_t stride,
            const float* key_scales, const float* value_scales, int64_t scale_stride, int64_t n_keys, int hd,
            float scale, float* acc, float* m_out, float* l_out) {
  const int n8 = HD8 ? HD8 : hd / 8;
  alignas(32) float p[kMaxAttendGroup][kKeyBlock];
  float running_max[kMaxAttendGroup], denom[kMaxAttendGroup], block_max[kMaxAttendGroup];
  for (int g = 0; g < group; ++g) {
    running_max[g] = -std::numeric_limits<float>::infinity();
    denom[g] = 0.0f;
    for (int i = 0; i < hd; ++i) acc[g * hd + i] = 0.0f;
  }
  for (int64_t j0 = 0; j0 < n_keys; j0 += kKeyBlock) {
    const int nb = static_cast<int>(std::min<int64_t>(kKeyBlock, n_keys - j0));
    for (int g = 0; g < group; ++g) block_max[g] = -std::numeric_limits<float>::infinity();
    for (int j = 0; j < nb; ++j) {
      const typename Rows::T* k = keys + (j0 + j) * stride;
      for (int g = 0; g < group; ++g) {
        const float* qg = q + g * hd;
        __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps();
        int c = 0;
        for (; c + 1 < n8; c += 2) {
          s0 = _mm256_fmadd_ps(_mm256_loadu_ps(qg + 8 * c), Rows::load8(k + 8 * c), s0);
          s1 = _mm256_fmadd_ps(_mm256_loadu_ps(qg + 8 * c + 8), Rows::load8(k + 8 * c + 8), s1);
        }
        if (c < n8) s0 = _mm256_fmadd_ps(_mm256_loadu_ps(qg + 8 * c), Rows::load8(k + 8 * c), s0);
        float dot = hsum(_mm256_add_ps(s0, s1));
        if constexpr (Rows::kScaled) dot *= key_scales[(j0 + j) * scale_stride];
        p[g][j] = dot * scale;
        block_max[g] = std::max(block_max[g], p[g][j]);
      }
    }
    for (int g = 0; g < group; ++g) {
      float* a = acc + g * hd;
      if (block_max[g] > running_max[g]) {  // rescale what was accumulated under the old maximum
        const __m256 factor = _mm256_set1_ps(std::exp(running_max[g] - block_max[g]));
        denom[g] *= _mm256_cvtss_f32(factor);
        for (int c = 0; c < n8; ++c) _mm256_storeu_ps(a + 8 * c, _mm256_mul_ps(_mm256_loadu_ps(a + 8 * c), factor));
        running_max[g] = block_max[g];
      }
      // The weights first, then the values: a call to exp inside the value loop
      // would make the compiler spill the accumulators around every call.
      for (int j = 0; j < nb; ++j) {
        p[g][j] = std::exp(p[g][j] - running_max[g]);
        denom[g] += p[g][j];
        if constexpr (Rows::kScaled) p[g][j] *= value_scales[(j0 + j) * scale_stride];  // weight of v_int
      }
      // Up to 8 output vectors stay in registers while the block's values (in L1
      // after the first head) stream past.
      for (int c0 = 0; c0 < n8; c0 += 8) {
        const int nc = std::min(8, n8 - c0);
        __m256 r[8];
        for (int c = 0; c < nc; ++c) r[c] = _mm256_loadu_ps(a + 8 * (c0 + c));
        for (int j = 0; j < nb; ++j) {
          const __m256 pv = _mm256_set1_ps(p[g][j]);
          const typename Rows::T* v = values + (j0 + j) * stride + 8 * c0;
          for (int c = 0; c < nc; ++c) r[c] = _mm256_fmadd_ps(pv, Rows::load8(v + 8 * c), r[c]);
        }
        for (int c = 0; c < nc; ++c) _mm256_storeu_ps(a + 8 * (c0 + c), r[c]);
      }
    }
  }
  for (int g = 0; g < group; ++g) {
    m_out[g] = running_max[g];
    l_out[g] = denom[g];
  }
}

// head_dim 64 and 128 get unrolled instances; any other multiple of 8 the generic one.
template <class Rows>
void attend_any(const float* q, int group, const typename Rows::T* keys, const typename Rows::T* values,
                int64_t stride, const float* ks, const float* vs, int64_t ss, int64_t n_keys, int hd, float scale,
                float* acc, float* m, float* l) {
  switch (hd) {
    case 64: return attend<8, Rows>(q, group, keys, values, stride, ks, vs, ss, n_keys, hd, scale, acc, m, l);
    case 128: return attend<16, Rows>(q, group, keys, values, stride, ks, vs, ss, n_keys, hd, scale, acc, m, l);
    default: return attend<0, Rows>(q, group, keys, values, stride, ks, vs, ss, n_keys, hd, scale, acc, m, l);
  }
}

}  // namespace

void f16_to_f32_row_avx2(const uint16_t* x, int64_t n, float* out) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(out + i, F16Rows::load8(x + i));
  for (; i < n; ++i) out[i] = f16_to_f32(x[i]);
}

// 8-wide loads cover head_dim in whole vectors only; other sizes are rare enough for the reference.
void attend_partial_avx2(const float* q, int group, const float* keys, const float* values, int64_t stride,
                         int64_t n_keys, int hd, float scale, float* acc, float* m, float* l) {
  if (hd % 8 != 0) return attend_partial_ref(q, group, keys, values, stride, n_keys, hd, scale, acc, m, l);
  attend_any<F32Rows>(q, group, keys, values, stride, nullptr, nullptr, 0, n_keys, hd, scale, acc, m, l);
}

void attend_partial_f16_avx2(const float* q, int group, const uint16_t* keys, const uint16_t* values,
                             int64_t stride, int64_t n_keys, int hd, float scale, float* acc, float* m, float* l) {
  if (hd % 8 != 0) return attend_partial_f16_ref(q, group, keys, values, stride, n_keys, hd, scale, acc, m, l);
  attend_any<F16Rows>(q, group, keys, values, stride, nullptr, nullptr, 0, n_keys, hd, scale, acc, m, l);
}

void attend_partial_bf16_avx2(const float* q, int group, const uint16_t* keys, const uint16_t* values,
                              int64_t stride, int64_t n_keys, int hd, float scale, float* acc, float* m, float* l) {
  if (hd % 8 != 0) return attend_partial_bf16_ref(q, group, keys, values, stride, n_keys, hd, scale, acc, m, l);
  attend_any<BF16Rows>(q, group, keys, values, stride, nullptr, nullptr, 0, n_keys, hd, scale, acc, m, l);
}

void attend_partial_q8_avx2(const float* q, int group, const int8_t* keys, const int8_t* values, int64_t stride,
                            const float* key_scales, const float* value_scales, int64_t scale_stride,
                            int64_t n_keys, int hd, float scale, float* acc, float* m, float* l) {
  if (hd % 8 != 0)
    return attend_partial_q8_ref(q, group, keys, values, stride, key_scales, value_scales, scale_stride, n_keys, hd,
                                 scale, acc, m, l);
  attend_any<Q8Rows>(q, group, keys, values, stride, key_scales, value_scales, scale_stride, n_keys, hd, scale, acc,
                     m, l);
}

namespace {

// e^x for 8 floats (x <= 0 here, -inf allowed): x = n ln2 + f, |f| <= ln2 / 2, e^f by the
// degree-6 Cephes polynomial, 2^n put into the exponent; x below -87 gives 0 exactly.
inline __m256 exp_ps(__m256 x) {
  const __m256 tiny = _mm256_cmp_ps(x, _mm256_set1_ps(-87.0f), _CMP_LT_OQ);
  x = _mm256_max_ps(x, _mm256_set1_ps(-87.0f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504089f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 f = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  f = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), f);
  __m256 y = _mm256_set1_ps(1.9875691500e-4f);
  y = _mm256_fmadd_ps(y, f, _mm256_set1_ps(1.3981999507e-3f));
  y = _mm256_fmadd_ps(y, f, _mm256_set1_ps(8.3334519073e-3f));
  y = _mm256_fmadd_ps(y, f, _mm256_set1_ps(4.1665795894e-2f));
  y = _mm256_fmadd_ps(y, f, _mm256_set1_ps(1.6666665459e-1f));
  y = _mm256_fmadd_ps(y, f, _mm256_set1_ps(5.0000001201e-1f));
  y = _mm256_fmadd_ps(_mm256_mul_ps(y, f), f, _mm256_add_ps(f, _mm256_set1_ps(1.0f)));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_andnot_ps(tiny, _mm256_mul_ps(y, _mm256_castsi256_ps(e)));
}

inline float hmax(__m256 v) {
  __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_max_ps(s, _mm_movehl_ps(s, s));
  s = _mm_max_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

constexpr int kKeyVecs = kTileKeys / 8;
static_assert(kTileKeys % 8 == 0, "a key block is whole vectors");

// Scores of R rows against one key block: sc[r][j] = q_r . k_j (an fma chain over the
// head dimension, in order, whatever R).
template <int R>
inline void tile_scores(const float* const* qr, const float* kb, int hd, float (*sc)[kTileKeys]) {
  for (int h = 0; h < kKeyVecs; h += 2) {
    __m256 acc[R][2];
    for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
    for (int i = 0; i < hd; ++i) {
      const __m256 k0 = _mm256_loadu_ps(kb + i * kTileKeys + 8 * h), k1 = _mm256_loadu_ps(kb + i * kTileKeys + 8 * h + 8);
      for (int r = 0; r < R; ++r) {
        const __m256 qi = _mm256_broadcast_ss(qr[r] + i);
        acc[r][0] = _mm256_fmadd_ps(qi, k0, acc[r][0]);
        acc[r][1] = _mm256_fmadd_ps(qi, k1, acc[r][1]);
      }
    }
    for (int r = 0; r < R; ++r) {
      _mm256_storeu_ps(sc[r] + 8 * h, acc[r][0]);
      _mm256_storeu_ps(sc[r] + 8 * h + 8, acc[r][1]);
    }
  }
}

// o_r = o_r * c_r + sum_{j < nk} p_r[j] v_j for R rows, 16 dimensions at a time (p_r[j] = 0
// past a row's own keys).
template <int R>
inline void tile_values(float* const* o, const float (*p)[kTileKeys], const float* c, int nk, const float* v,
                        int64_t ldv, int hd) {
  for (int i = 0; i < hd; i += 16) {
    __m256 acc[R][2];
    for (int r = 0; r < R; ++r) {
      const __m256 cr = _mm256_set1_ps(c[r]);
      acc[r][0] = _mm256_mul_ps(_mm256_loadu_ps(o[r] + i), cr);
      acc[r][1] = _mm256_mul_ps(_mm256_loadu_ps(o[r] + i + 8), cr);
    }
    for (int j = 0; j < nk; ++j) {
      const __m256 v0 = _mm256_loadu_ps(v + j * ldv + i), v1 = _mm256_loadu_ps(v + j * ldv + i + 8);
      for (int r = 0; r < R; ++r) {
        const __m256 pj = _mm256_broadcast_ss(p[r] + j);
        acc[r][0] = _mm256_fmadd_ps(pj, v0, acc[r][0]);
        acc[r][1] = _mm256_fmadd_ps(pj, v1, acc[r][1]);
      }
    }
    for (int r = 0; r < R; ++r) {
      _mm256_storeu_ps(o[r] + i, acc[r][0]);
      _mm256_storeu_ps(o[r] + i + 8, acc[r][1]);
    }
  }
}

}  // namespace

void attend_tile_avx2(const float* q, int64_t ldq, float* out, int64_t ldo, int n_tok, int group, int hd, float scale,
                      const float* kt, const float* v, int64_t ldv, int64_t pos0) {
  if (hd % 16 != 0) {
    attend_tile_ref(q, ldq, out, ldo, n_tok, group, hd, scale, kt, v, ldv, pos0);
    return;
  }
  constexpr float kNegInf = -std::numeric_limits<float>::infinity();
  const int rows = n_tok * group;
  alignas(32) float sc[kMaxTileRows][kTileKeys];
  float m[kMaxTileRows], l[kMaxTileRows], c[kMaxTileRows];
  const float* qr[kMaxTileRows];
  float* o[kMaxTileRows];
  for (int r = 0; r < rows; ++r) {
    qr[r] = q + (r / group) * ldq + (r % group) * hd;
    o[r] = out + (r / group) * ldo + (r % group) * hd;
    std::fill(o[r], o[r] + hd, 0.0f);
    m[r] = kNegInf;
    l[r] = 0.0f;
  }
  const __m256 lane = _mm256_setr_ps(0, 1, 2, 3, 4, 5, 6, 7), vscale = _mm256_set1_ps(scale);
  const int64_t last = pos0 + n_tok - 1;
  for (int64_t j0 = 0; j0 <= last; j0 += kTileKeys) {
    const float* kb = kt + j0 * hd;
    // Rows of tokens before position j0 see none of this block: they are left alone.
    const int r0 = static_cast<int>(std::max<int64_t>(0, j0 - pos0)) * group;
    int r = r0;
    for (; r + 4 <= rows; r += 4) tile_scores<4>(qr + r, kb, hd, sc + r);
    for (; r < rows; ++r) tile_scores<1>(qr + r, kb, hd, sc + r);
    for (r = r0; r < rows; ++r) {
      const int nvis = static_cast<int>(std::min<int64_t>(kTileKeys, pos0 + r / group + 1 - j0));
      const __m256 nv = _mm256_set1_ps(static_cast<float>(nvis));
      __m256 s[kKeyVecs], mask[kKeyVecs];
      __m256 bmax = _mm256_set1_ps(kNegInf);
      for (int h = 0; h < kKeyVecs; ++h) {
        mask[h] = _mm256_cmp_ps(_mm256_add_ps(lane, _mm256_set1_ps(8.0f * h)), nv, _CMP_LT_OQ);
        s[h] = _mm256_blendv_ps(_mm256_set1_ps(kNegInf), _mm256_mul_ps(vscale, _mm256_loadu_ps(sc[r] + 8 * h)), mask[h]);
        bmax = _mm256_max_ps(bmax, s[h]);
      }
      const float m_new = std::max(m[r], hmax(bmax));
      c[r] = m[r] == kNegInf ? 0.0f : std::exp(m[r] - m_new);
      const __m256 mv = _mm256_set1_ps(m_new);
      __m256 sum = _mm256_setzero_ps();
      for (int h = 0; h < kKeyVecs; ++h) {
        const __m256 p = _mm256_and_ps(mask[h], exp_ps(_mm256_sub_ps(s[h], mv)));
        _mm256_storeu_ps(sc[r] + 8 * h, p);
        sum = _mm256_add_ps(sum, p);
      }
      l[r] = l[r] * c[r] + hsum(sum);
      m[r] = m_new;
    }
    const int nk = static_cast<int>(std::min<int64_t>(kTileKeys, last + 1 - j0));
    for (r = r0; r + 4 <= rows; r += 4) tile_values<4>(o + r, sc + r, c + r, nk, v + j0 * ldv, ldv, hd);
    for (; r < rows; ++r) tile_values<1>(o + r, sc + r, c + r, nk, v + j0 * ldv, ldv, hd);
  }
  for (int r = 0; r < rows; ++r) {
    const __m256 inv = _mm256_set1_ps(l[r]);
    for (int i = 0; i < hd; i += 8) _mm256_storeu_ps(o[r] + i, _mm256_div_ps(_mm256_loadu_ps(o[r] + i), inv));
  }
}

}  // namespace detail
}  // namespace shortrt
