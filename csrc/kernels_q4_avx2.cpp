// int4 x q8 matmul on AVX2 (built with -mavx2 -mfma -mf16c) on the interleaved
// layout (BlockQ4x16, kernels.h): a ymm lane is a row, so 32 bytes of qs[p]
// give a dword of nibbles for each of 8 rows (half of a row group). The block
// dot product is maddubs (unsigned nibbles x the activation dword broadcast to
// every lane; pair sums within int16: 2 * 15 * 127 = 3810), the 8 maddubs of a
// block summed in int16 (8 * 3810 = 30480 < 32767, so still exact), then one
// madd by ones into the row's int32. The arithmetic per output is the one
// stated in kernels_q4.h (the avx512 path gives the same bits).
#include <immintrin.h>

#include <cstring>

#include "kernels_q4.h"

namespace shortrt {
namespace {

inline __m256i bcast_dword(const int8_t* p) {
  int32_t v;
  std::memcpy(&v, p, sizeof v);
  return _mm256_set1_epi32(v);
}

// Lanes i < n (n <= 8) set.
inline __m256i lanes_below(int64_t n) {
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(n)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

// H halves (8 rows each, starting at half h0) x T tokens over every block of a
// row group; the first `rows` rows of the tile are stored.
template <int H, int T>
inline void q4x8_tile(const BlockQ4x16* w, int64_t n_blocks, int h0, const BlockQ8* x, const float* x_sum, float* y,
                      int64_t ldy, int64_t rows) {
  __m256 q[H][T], mins[H][T];
  for (int h = 0; h < H; ++h)
    for (int t = 0; t < T; ++t) q[h][t] = mins[h][t] = _mm256_setzero_ps();
  const __m256i low4 = _mm256_set1_epi8(0x0f), ones = _mm256_set1_epi16(1);
  for (int64_t b = 0; b < n_blocks; ++b) {
    const BlockQ4x16& blk = w[b];
    __m256i s16[H][T];
    for (int p = 0; p < 4; ++p) {
      for (int h = 0; h < H; ++h) {
        const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(&blk.qs[p][8 * (h0 + h)]));
        const __m256i lo = _mm256_and_si256(v, low4), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), low4);
        for (int t = 0; t < T; ++t) {
          const int8_t* xq = x[t * n_blocks + b].q;
          const __m256i pair =
              _mm256_add_epi16(_mm256_maddubs_epi16(lo, bcast_dword(xq + 4 * p)),
                               _mm256_maddubs_epi16(hi, bcast_dword(xq + 16 + 4 * p)));
          s16[h][t] = p == 0 ? pair : _mm256_add_epi16(s16[h][t], pair);
        }
      }
    }
    for (int h = 0; h < H; ++h) {
      const __m256 d = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(&blk.d[8 * (h0 + h)])));
      const __m256 m = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(&blk.m[8 * (h0 + h)])));
      for (int t = 0; t < T; ++t) {
        const __m256 ds = _mm256_mul_ps(d, _mm256_set1_ps(x[t * n_blocks + b].scale));
        q[h][t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_madd_epi16(s16[h][t], ones)), ds, q[h][t]);
        mins[h][t] = _mm256_fmadd_ps(m, _mm256_set1_ps(x_sum[t * n_blocks + b]), mins[h][t]);
      }
    }
  }
  for (int h = 0; h < H; ++h) {
    const int64_t n = rows - 8 * h;
    if (n <= 0) break;
    for (int t = 0; t < T; ++t) {
      const __m256 out = _mm256_add_ps(q[h][t], mins[h][t]);
      if (n >= 8) _mm256_storeu_ps(y + t * ldy + 8 * h, out);
      else _mm256_maskstore_ps(y + t * ldy + 8 * h, lanes_below(n), out);
    }
  }
}

// Tokens per tile past one: 3 tokens x (int16 sum + 2 accumulators) of one
// half, with the unpacked dword and constants, fit the 16 ymm registers.
constexpr int kTileTokens = 3;

template <int T>
inline void q4_half_tiles(const BlockQ4x16* wg, int64_t n_blocks, const BlockQ8* xt, const float* st, float* yt,
                          int64_t ldy, int64_t n) {
  q4x8_tile<1, T>(wg, n_blocks, 0, xt, st, yt, ldy, n);
  if (n > 8) q4x8_tile<1, T>(wg, n_blocks, 1, xt, st, yt + 8, ldy, n - 8);
}

}  // namespace

namespace detail {
void gemm_q4_avx2(const BlockQ4x16* w, int64_t n_rows, int64_t n_blocks, const BlockQ8* x, const float* x_sum,
                  int64_t n_tok, float* y, int64_t ldy) {
  for (int64_t r = 0; r < n_rows; r += kQ4Rows) {
    const int64_t n = n_rows - r < kQ4Rows ? n_rows - r : kQ4Rows;
    const BlockQ4x16* wg = w + (r / kQ4Rows) * n_blocks;
    if (n_tok == 1) {  // decode: both halves in one pass over the group, so each line is loaded once
      q4x8_tile<2, 1>(wg, n_blocks, 0, x, x_sum, y + r, ldy, n);
      continue;
    }
    for (int64_t t = 0; t < n_tok; t += kTileTokens) {
      const BlockQ8* xt = x + t * n_blocks;
      const float* st = x_sum + t * n_blocks;
      float* yt = y + t * ldy + r;
      switch (n_tok - t < kTileTokens ? n_tok - t : kTileTokens) {
        case 1: q4_half_tiles<1>(wg, n_blocks, xt, st, yt, ldy, n); break;
        case 2: q4_half_tiles<2>(wg, n_blocks, xt, st, yt, ldy, n); break;
        default: q4_half_tiles<3>(wg, n_blocks, xt, st, yt, ldy, n); break;
      }
    }
  }
}
}  // namespace detail

}  // namespace shortrt
