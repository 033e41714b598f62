// int4 x q8 matmul on AVX-512 VNNI (built with the avx512 flags) on the
// interleaved layout (BlockQ4x16, kernels.h): a zmm lane is a row, so one
// 64-byte load of qs[p] gives a dword of nibbles for each of 16 rows, and one
// vpdpbusd against the activation dword broadcast to all lanes adds those 4
// products to every row at once. The arithmetic per output is the one stated
// in kernels_q4.h (the avx2 path gives the same bits).
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>
#pragma GCC diagnostic pop

#include <cstring>

#include "kernels_q4.h"

namespace shortrt {
namespace {

inline __m512i bcast_dword(const int8_t* p) {
  int32_t v;
  std::memcpy(&v, p, sizeof v);
  return _mm512_set1_epi32(v);
}

// 16 rows (lanes below `rows` stored) x T tokens over every block of a row group.
template <int T>
inline void q4x16_tile(const BlockQ4x16* w, int64_t n_blocks, const BlockQ8* x, const float* x_sum, float* y,
                       int64_t ldy, __mmask16 rows) {
  __m512 q[T], mins[T];
  for (int t = 0; t < T; ++t) q[t] = mins[t] = _mm512_setzero_ps();
  const __m512i low4 = _mm512_set1_epi8(0x0f);
  for (int64_t b = 0; b < n_blocks; ++b) {
    const BlockQ4x16& blk = w[b];
    __m512i lo[4], hi[4];
    for (int p = 0; p < 4; ++p) {
      const __m512i v = _mm512_loadu_si512(blk.qs[p]);
      lo[p] = _mm512_and_si512(v, low4);
      hi[p] = _mm512_and_si512(_mm512_srli_epi16(v, 4), low4);
    }
    const __m512 d = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk.d)));
    const __m512 m = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk.m)));
    for (int t = 0; t < T; ++t) {
      const BlockQ8& xb = x[t * n_blocks + b];
      __m512i p0 = _mm512_dpbusd_epi32(_mm512_setzero_si512(), lo[0], bcast_dword(xb.q + 0));
      __m512i p1 = _mm512_dpbusd_epi32(_mm512_setzero_si512(), hi[0], bcast_dword(xb.q + 16));
      for (int p = 1; p < 4; ++p) {
        p0 = _mm512_dpbusd_epi32(p0, lo[p], bcast_dword(xb.q + 4 * p));
        p1 = _mm512_dpbusd_epi32(p1, hi[p], bcast_dword(xb.q + 16 + 4 * p));
      }
      const __m512 ds = _mm512_mul_ps(d, _mm512_set1_ps(xb.scale));
      q[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_add_epi32(p0, p1)), ds, q[t]);
      mins[t] = _mm512_fmadd_ps(m, _mm512_set1_ps(x_sum[t * n_blocks + b]), mins[t]);
    }
  }
  for (int t = 0; t < T; ++t) _mm512_mask_storeu_ps(y + t * ldy, rows, _mm512_add_ps(q[t], mins[t]));
}

// Tokens per tile: the unpacked nibbles of a block (8 zmm) serve this many
// tokens; 2 accumulators per token, so 8 + 2 * 8 + d, m and temporaries fit
// the 32 zmm registers.
constexpr int kTileTokens = 8;

}  // namespace

namespace detail {
void gemm_q4_avx512(const BlockQ4x16* w, int64_t n_rows, int64_t n_blocks, const BlockQ8* x, const float* x_sum,
                    int64_t n_tok, float* y, int64_t ldy) {
  for (int64_t r = 0; r < n_rows; r += kQ4Rows) {
    const int64_t n = n_rows - r < kQ4Rows ? n_rows - r : kQ4Rows;
    const __mmask16 rows = static_cast<__mmask16>((1u << n) - 1);
    const BlockQ4x16* wg = w + (r / kQ4Rows) * n_blocks;
    for (int64_t t = 0; t < n_tok; t += kTileTokens) {
      const BlockQ8* xt = x + t * n_blocks;
      const float* st = x_sum + t * n_blocks;
      float* yt = y + t * ldy + r;
      switch (n_tok - t < kTileTokens ? n_tok - t : kTileTokens) {
        case 1: q4x16_tile<1>(wg, n_blocks, xt, st, yt, ldy, rows); break;
        case 2: q4x16_tile<2>(wg, n_blocks, xt, st, yt, ldy, rows); break;
        case 3: q4x16_tile<3>(wg, n_blocks, xt, st, yt, ldy, rows); break;
        case 4: q4x16_tile<4>(wg, n_blocks, xt, st, yt, ldy, rows); break;
        case 5: q4x16_tile<5>(wg, n_blocks, xt, st, yt, ldy, rows); break;
        case 6: q4x16_tile<6>(wg, n_blocks, xt, st, yt, ldy, rows); break;
        case 7: q4x16_tile<7>(wg, n_blocks, xt, st, yt, ldy, rows); break;
        default: q4x16_tile<8>(wg, n_blocks, xt, st, yt, ldy, rows); break;
      }
    }
  }
}
}  // namespace detail

}  // namespace shortrt
