// AVX2/FMA version of one attention head over the KV cache (the decode path),
// the twin of attend_head_ref in attention.cpp. Compiled with -mavx2 -mfma;
// called only when kernels() chose the avx2 path.
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>

#include "attention.h"

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

// HD8 = head_dim / 8 when known at compile time (the accumulator then lives in
// registers), 0 for any multiple of 8.
template <int HD8>
void attend(const float* q, const float* keys, const float* values, int64_t stride, int64_t n_keys, int hd,
            float scale, float* out) {
  const int n8 = HD8 ? HD8 : hd / 8;
  alignas(32) float acc[512];
  alignas(32) float scores[kKeyBlock];
  for (int i = 0; i < hd; ++i) acc[i] = 0.0f;
  float running_max = -std::numeric_limits<float>::infinity(), denom = 0.0f;
  for (int64_t j0 = 0; j0 < n_keys; j0 += kKeyBlock) {
    const int nb = static_cast<int>(std::min<int64_t>(kKeyBlock, n_keys - j0));
    float block_max = -std::numeric_limits<float>::infinity();
    for (int j = 0; j < nb; ++j) {
      const float* k = keys + (j0 + j) * stride;
      __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps();
      int c = 0;
      for (; c + 1 < n8; c += 2) {
        s0 = _mm256_fmadd_ps(_mm256_loadu_ps(q + 8 * c), _mm256_loadu_ps(k + 8 * c), s0);
        s1 = _mm256_fmadd_ps(_mm256_loadu_ps(q + 8 * c + 8), _mm256_loadu_ps(k + 8 * c + 8), s1);
      }
      if (c < n8) s0 = _mm256_fmadd_ps(_mm256_loadu_ps(q + 8 * c), _mm256_loadu_ps(k + 8 * c), s0);
      scores[j] = hsum(_mm256_add_ps(s0, s1)) * scale;
      block_max = std::max(block_max, scores[j]);
    }
    if (block_max > running_max) {  // rescale what was accumulated under the old maximum
      const __m256 factor = _mm256_set1_ps(std::exp(running_max - block_max));
      denom *= _mm256_cvtss_f32(factor);
      for (int c = 0; c < n8; ++c) _mm256_store_ps(acc + 8 * c, _mm256_mul_ps(_mm256_load_ps(acc + 8 * c), factor));
      running_max = block_max;
    }
    for (int j = 0; j < nb; ++j) {
      const float p = std::exp(scores[j] - running_max);
      denom += p;
      const __m256 pv = _mm256_set1_ps(p);
      const float* v = values + (j0 + j) * stride;
      for (int c = 0; c < n8; ++c)
        _mm256_store_ps(acc + 8 * c, _mm256_fmadd_ps(pv, _mm256_loadu_ps(v + 8 * c), _mm256_load_ps(acc + 8 * c)));
    }
  }
  const __m256 inv = _mm256_set1_ps(1.0f / denom);
  for (int c = 0; c < n8; ++c) _mm256_storeu_ps(out + 8 * c, _mm256_mul_ps(_mm256_load_ps(acc + 8 * c), inv));
}

}  // namespace

// head_dim must be a multiple of 8 and at most 512 (the caller checks).
void attend_head_avx2(const float* q, const float* keys, const float* values, int64_t stride, int64_t n_keys,
                      int hd, float scale, float* out) {
  switch (hd) {
    case 64: return attend<8>(q, keys, values, stride, n_keys, hd, scale, out);
    case 128: return attend<16>(q, keys, values, stride, n_keys, hd, scale, out);
    default: return attend<0>(q, keys, values, stride, n_keys, hd, scale, out);
  }
}

}  // namespace detail
}  // namespace shortrt
