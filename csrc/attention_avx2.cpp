// AVX2/FMA version of the decode attention kernel over the KV cache, the twin
// of attend_partial_ref in attention.cpp: the avx2 KernelTable's
// attend_partial. Compiled with -mavx2 -mfma; called only on the avx2 path.
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

// HD8 = head_dim / 8 when known at compile time, 0 for any multiple of 8. Per
// head the operations are those of attend_partial_ref in the same order except
// that each dot product runs as two 8-wide chains; the group's heads share every
// key and value row read, so the cache is read once per kv head, not per q head.
template <int HD8>
void attend(const float* q, int group, const float* keys, const float* values, int64_t stride, int64_t n_keys,
            int hd, float scale, float* acc, float* m_out, float* l_out) {
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
      const float* k = keys + (j0 + j) * stride;
      for (int g = 0; g < group; ++g) {
        const float* qg = q + g * hd;
        __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps();
        int c = 0;
        for (; c + 1 < n8; c += 2) {
          s0 = _mm256_fmadd_ps(_mm256_loadu_ps(qg + 8 * c), _mm256_loadu_ps(k + 8 * c), s0);
          s1 = _mm256_fmadd_ps(_mm256_loadu_ps(qg + 8 * c + 8), _mm256_loadu_ps(k + 8 * c + 8), s1);
        }
        if (c < n8) s0 = _mm256_fmadd_ps(_mm256_loadu_ps(qg + 8 * c), _mm256_loadu_ps(k + 8 * c), s0);
        p[g][j] = hsum(_mm256_add_ps(s0, s1)) * scale;
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
      }
      // Up to 8 output vectors stay in registers while the block's values (in L1
      // after the first head) stream past.
      for (int c0 = 0; c0 < n8; c0 += 8) {
        const int nc = std::min(8, n8 - c0);
        __m256 r[8];
        for (int c = 0; c < nc; ++c) r[c] = _mm256_loadu_ps(a + 8 * (c0 + c));
        for (int j = 0; j < nb; ++j) {
          const __m256 pv = _mm256_set1_ps(p[g][j]);
          const float* v = values + (j0 + j) * stride + 8 * c0;
          for (int c = 0; c < nc; ++c) r[c] = _mm256_fmadd_ps(pv, _mm256_loadu_ps(v + 8 * c), r[c]);
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

}  // namespace

void attend_partial_avx2(const float* q, int group, const float* keys, const float* values, int64_t stride,
                         int64_t n_keys, int hd, float scale, float* acc, float* m, float* l) {
  // 8-wide loads cover head_dim in whole vectors only; other sizes are rare enough for the reference.
  if (hd % 8 != 0) return attend_partial_ref(q, group, keys, values, stride, n_keys, hd, scale, acc, m, l);
  switch (hd) {
    case 64: return attend<8>(q, group, keys, values, stride, n_keys, hd, scale, acc, m, l);
    case 128: return attend<16>(q, group, keys, values, stride, n_keys, hd, scale, acc, m, l);
    default: return attend<0>(q, group, keys, values, stride, n_keys, hd, scale, acc, m, l);
  }
}

}  // namespace detail
}  // namespace shortrt
