// AVX-512 version of the prefill attention tile (attend_tile, attention.h): the
// avx512 KernelTable's attend_tile. The same algorithm as attend_tile_avx2 on
// 16 lanes: a block of 32 keys is two zmm of scores per row, values 32
// dimensions at a time, up to 8 rows sharing every key and value load.
// Compiled with the avx512 flags; called only on the avx512 path.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>
#pragma GCC diagnostic pop

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>

#include "attention.h"

namespace shortrt {
namespace detail {
namespace {

static_assert(kTileKeys == 32, "a key block is two zmm");

// e^x for 16 floats (x <= 0 here, -inf allowed); below -87 gives 0 exactly (the
// polynomial of attend_tile_avx2's exp on 16 lanes).
inline __m512 exp16(__m512 x) {
  const __mmask16 tiny = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-87.0f), _CMP_LT_OQ);
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504089f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 f = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  f = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), f);
  __m512 y = _mm512_set1_ps(1.9875691500e-4f);
  y = _mm512_fmadd_ps(y, f, _mm512_set1_ps(1.3981999507e-3f));
  y = _mm512_fmadd_ps(y, f, _mm512_set1_ps(8.3334519073e-3f));
  y = _mm512_fmadd_ps(y, f, _mm512_set1_ps(4.1665795894e-2f));
  y = _mm512_fmadd_ps(y, f, _mm512_set1_ps(1.6666665459e-1f));
  y = _mm512_fmadd_ps(y, f, _mm512_set1_ps(5.0000001201e-1f));
  y = _mm512_fmadd_ps(_mm512_mul_ps(y, f), f, _mm512_add_ps(f, _mm512_set1_ps(1.0f)));
  const __m512i e = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23);
  return _mm512_maskz_mul_ps(static_cast<__mmask16>(~tiny), y, _mm512_castsi512_ps(e));
}

// sc[r][j] = q_r . k_j for R rows and the 32 keys of a block (an fma chain over the head
// dimension, in order, whatever R).
template <int R>
inline void scores(const float* const* qr, const float* kb, int hd, float (*sc)[kTileKeys]) {
  __m512 acc[R][2];
  for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
  for (int i = 0; i < hd; ++i) {
    const __m512 k0 = _mm512_loadu_ps(kb + i * kTileKeys), k1 = _mm512_loadu_ps(kb + i * kTileKeys + 16);
    for (int r = 0; r < R; ++r) {
      const __m512 qi = _mm512_set1_ps(qr[r][i]);
      acc[r][0] = _mm512_fmadd_ps(qi, k0, acc[r][0]);
      acc[r][1] = _mm512_fmadd_ps(qi, k1, acc[r][1]);
    }
  }
  for (int r = 0; r < R; ++r) {
    _mm512_storeu_ps(sc[r], acc[r][0]);
    _mm512_storeu_ps(sc[r] + 16, acc[r][1]);
  }
}

// o_r = o_r * c_r + sum_{j < nk} p_r[j] v_j for R rows, 32 dimensions at a time.
template <int R>
inline void values(float* const* o, const float (*p)[kTileKeys], const float* c, int nk, const float* v, int64_t ldv,
                   int hd) {
  for (int i = 0; i < hd; i += 32) {
    __m512 acc[R][2];
    for (int r = 0; r < R; ++r) {
      const __m512 cr = _mm512_set1_ps(c[r]);
      acc[r][0] = _mm512_mul_ps(_mm512_loadu_ps(o[r] + i), cr);
      acc[r][1] = _mm512_mul_ps(_mm512_loadu_ps(o[r] + i + 16), cr);
    }
    for (int j = 0; j < nk; ++j) {
      const __m512 v0 = _mm512_loadu_ps(v + j * ldv + i), v1 = _mm512_loadu_ps(v + j * ldv + i + 16);
      for (int r = 0; r < R; ++r) {
        const __m512 pj = _mm512_set1_ps(p[r][j]);
        acc[r][0] = _mm512_fmadd_ps(pj, v0, acc[r][0]);
        acc[r][1] = _mm512_fmadd_ps(pj, v1, acc[r][1]);
      }
    }
    for (int r = 0; r < R; ++r) {
      _mm512_storeu_ps(o[r] + i, acc[r][0]);
      _mm512_storeu_ps(o[r] + i + 16, acc[r][1]);
    }
  }
}

inline __mmask16 first_lanes(int n) {  // lanes i < n of 16 (n may be <= 0 or >= 16)
  return n <= 0 ? 0 : n >= 16 ? static_cast<__mmask16>(0xffff) : static_cast<__mmask16>((1u << n) - 1);
}

}  // namespace

void attend_tile_avx512(const float* q, int64_t ldq, float* out, int64_t ldo, int n_tok, int group, int hd,
                        float scale, const float* kt, const float* v, int64_t ldv, int64_t pos0) {
  if (hd % 32 != 0) {
    attend_tile_avx2(q, ldq, out, ldo, n_tok, group, hd, scale, kt, v, ldv, pos0);
    return;
  }
  constexpr float kNegInf = -std::numeric_limits<float>::infinity();
  const int rows = n_tok * group;
  alignas(64) float sc[kMaxTileRows][kTileKeys];
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
  const __m512 vscale = _mm512_set1_ps(scale), neg_inf = _mm512_set1_ps(kNegInf);
  const int64_t last = pos0 + n_tok - 1;
  for (int64_t j0 = 0; j0 <= last; j0 += kTileKeys) {
    const float* kb = kt + j0 * hd;
    const int r0 = static_cast<int>(std::max<int64_t>(0, j0 - pos0)) * group;  // earlier rows see no key here
    int r = r0;
    for (; r + 8 <= rows; r += 8) scores<8>(qr + r, kb, hd, sc + r);
    for (; r + 4 <= rows; r += 4) scores<4>(qr + r, kb, hd, sc + r);
    for (; r < rows; ++r) scores<1>(qr + r, kb, hd, sc + r);
    for (r = r0; r < rows; ++r) {
      const int nvis = static_cast<int>(std::min<int64_t>(kTileKeys, pos0 + r / group + 1 - j0));
      const __mmask16 k0 = first_lanes(nvis), k1 = first_lanes(nvis - 16);
      const __m512 s0 = _mm512_mask_mul_ps(neg_inf, k0, vscale, _mm512_loadu_ps(sc[r]));
      const __m512 s1 = _mm512_mask_mul_ps(neg_inf, k1, vscale, _mm512_loadu_ps(sc[r] + 16));
      const float m_new = std::max(m[r], _mm512_reduce_max_ps(_mm512_max_ps(s0, s1)));
      c[r] = m[r] == kNegInf ? 0.0f : std::exp(m[r] - m_new);
      const __m512 mv = _mm512_set1_ps(m_new);
      const __m512 p0 = _mm512_maskz_mov_ps(k0, exp16(_mm512_sub_ps(s0, mv)));
      const __m512 p1 = _mm512_maskz_mov_ps(k1, exp16(_mm512_sub_ps(s1, mv)));
      _mm512_storeu_ps(sc[r], p0);
      _mm512_storeu_ps(sc[r] + 16, p1);
      l[r] = l[r] * c[r] + _mm512_reduce_add_ps(_mm512_add_ps(p0, p1));
      m[r] = m_new;
    }
    const int nk = static_cast<int>(std::min<int64_t>(kTileKeys, last + 1 - j0));
    for (r = r0; r + 8 <= rows; r += 8) values<8>(o + r, sc + r, c + r, nk, v + j0 * ldv, ldv, hd);
    for (; r + 4 <= rows; r += 4) values<4>(o + r, sc + r, c + r, nk, v + j0 * ldv, ldv, hd);
    for (; r < rows; ++r) values<1>(o + r, sc + r, c + r, nk, v + j0 * ldv, ldv, hd);
  }
  for (int r = 0; r < rows; ++r) {
    const __m512 lr = _mm512_set1_ps(l[r]);
    for (int i = 0; i < hd; i += 16) _mm512_storeu_ps(o[r] + i, _mm512_div_ps(_mm512_loadu_ps(o[r] + i), lr));
  }
}

}  // namespace detail
}  // namespace shortrt
