// The one horizontal sum of the AVX-512 matmuls (avx512, avx512bf16, amx).
// Included only by translation units built with the AVX-512 flags; everything
// is in an unnamed namespace, so each of them has its own copy and no
// AVX-512 code is shared with a translation unit built without those flags.
#pragma once

#include <immintrin.h>

namespace shortrt {
namespace {

// Each matmul output ends as a 16-lane float accumulator a, summed by one tree:
// h[i] = a[i] + a[i+8] (i < 8), q[k] = h[k] + h[k+4] (k < 4),
// d[m] = q[m] + q[m+2] (m < 2), result = d[0] + d[1]. reduce8 sums eight
// accumulators at once, reduce1 one; both follow that tree exactly.

// Sums of 8 accumulators by the fixed tree (top of the section): slot k of
// the result holds a[k].
inline __m256 reduce8(const __m512 (&a)[8]) {
  // h: a[2j] in lanes 0-7 and a[2j+1] in lanes 8-15 of u[j], each lane i + lane i+8.
  __m512 u[4];
  for (int j = 0; j < 4; ++j)
    u[j] = _mm512_add_ps(_mm512_shuffle_f32x4(a[2 * j], a[2 * j + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                         _mm512_shuffle_f32x4(a[2 * j], a[2 * j + 1], _MM_SHUFFLE(3, 2, 3, 2)));
  // q: 128-bit lane k of v[j] holds q of a[4j + k] (h[k] + h[k+4]).
  __m512 v[2];
  for (int j = 0; j < 2; ++j)
    v[j] = _mm512_add_ps(_mm512_shuffle_f32x4(u[2 * j], u[2 * j + 1], _MM_SHUFFLE(2, 0, 2, 0)),
                         _mm512_shuffle_f32x4(u[2 * j], u[2 * j + 1], _MM_SHUFFLE(3, 1, 3, 1)));
  // d: lane k of the 128-bit lanes holds [d0, d1] of a[k] then of a[4 + k].
  const __m512 d = _mm512_add_ps(_mm512_shuffle_ps(v[0], v[1], _MM_SHUFFLE(1, 0, 1, 0)),
                                 _mm512_shuffle_ps(v[0], v[1], _MM_SHUFFLE(3, 2, 3, 2)));
  // result: 128-bit lane k holds [a[k], a[4 + k], a[k], a[4 + k]].
  const __m512 s = _mm512_add_ps(_mm512_shuffle_ps(d, d, _MM_SHUFFLE(2, 0, 2, 0)),
                                 _mm512_shuffle_ps(d, d, _MM_SHUFFLE(3, 1, 3, 1)));
  // Gather dword 0 of lanes 0-3 (a[0..3]) then dword 1 (a[4..7]).
  const __m512i order = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 0, 0, 0, 0, 0, 0, 0, 0);
  return _mm512_castps512_ps256(_mm512_permutexvar_ps(order, s));
}

// The same tree for one accumulator (decode: no lanes wasted on padding).
inline float reduce1(__m512 a) {
  const __m256 h = _mm256_add_ps(_mm512_castps512_ps256(a), _mm512_extractf32x8_ps(a, 1));
  const __m128 q = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
  const __m128 d = _mm_add_ps(q, _mm_movehl_ps(q, q));
  return _mm_cvtss_f32(_mm_add_ss(d, _mm_movehdup_ps(d)));
}

}  // namespace
}  // namespace shortrt
