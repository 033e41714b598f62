// The int4 x q8 matmul for x86 vector paths, shared by kernels_q4_avx2.cpp and
// kernels_q4_avx512.cpp and included only by them. Everything is in an
// anonymous namespace, so each of those translation units compiles its own
// copy with its own instruction set (no out-of-line copy can be shared by the
// linker). `Dot` supplies the one instruction-set-specific step.
//
// One arithmetic for every output element (row r, token t), whatever the tile
// a call is handed, so decode, batched decode and prefill agree bit for bit:
//   acc (8 float lanes) = 0; for each block b in column order:
//     p   = Dot::block(w nibbles, x bytes): lane i = sum of the products of
//           weights 4i..4i+3 (exact int32)
//     acc = fma(float(p), d_b * s_b, acc)          (d_b * s_b one float product)
//   dot = ((a0+a1)+(a2+a3)) + ((a4+a5)+(a6+a7))
//   mins = 0; for each block b: mins = fma(m_b, x_sum_b, mins)   (scalar)
//   y = dot + mins
#pragma once

#include <immintrin.h>

#include "kernels.h"

namespace shortrt {
namespace {

// The 32 nibbles of a block as bytes in weight order (low nibbles are weights
// 0..15, high nibbles 16..31).
inline __m256i q4_unpack(const BlockQ4& b) {
  const __m128i packed = _mm_loadu_si128(reinterpret_cast<const __m128i*>(b.qs));
  const __m128i mask = _mm_set1_epi8(0x0f);
  const __m128i lo = _mm_and_si128(packed, mask);
  const __m128i hi = _mm_and_si128(_mm_srli_epi16(packed, 4), mask);
  return _mm256_inserti128_si256(_mm256_castsi128_si256(lo), hi, 1);
}

inline float q4_half(uint16_t h) { return _cvtsh_ss(h); }

// Horizontal sums of four vectors, each as ((v0+v1)+(v2+v3)) + ((v4+v5)+(v6+v7)).
// A slot depends only on its own vector, so zero padding changes no bits.
inline __m128 q4_reduce4(__m256 a, __m256 b, __m256 c, __m256 d) {
  const __m256 ab = _mm256_hadd_ps(a, b);
  const __m256 cd = _mm256_hadd_ps(c, d);
  const __m256 abcd = _mm256_hadd_ps(ab, cd);
  return _mm_add_ps(_mm256_castps256_ps128(abcd), _mm256_extractf128_ps(abcd, 1));
}

// R rows x T tokens (R, T <= 3): each block's nibbles are unpacked once per
// row and used for T tokens; 9 accumulators + 3 unpacked rows fit the 16 ymm.
template <class Dot, int R, int T>
inline void q4_tile(const BlockQ4* w, int64_t n_blocks, const BlockQ8* x, const float* x_sum, float* y,
                    int64_t ldy) {
  __m256 acc[R][T];
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < T; ++t) acc[r][t] = _mm256_setzero_ps();
  for (int64_t b = 0; b < n_blocks; ++b) {
    __m256i wq[R];
    float wd[R];
    for (int r = 0; r < R; ++r) {
      const BlockQ4& blk = w[r * n_blocks + b];
      wq[r] = q4_unpack(blk);
      wd[r] = q4_half(blk.d);
    }
    for (int t = 0; t < T; ++t) {
      const BlockQ8& xb = x[t * n_blocks + b];
      const __m256i xq = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xb.q));
      for (int r = 0; r < R; ++r) {
        const __m256 p = _mm256_cvtepi32_ps(Dot::block(wq[r], xq));
        acc[r][t] = _mm256_fmadd_ps(p, _mm256_set1_ps(wd[r] * xb.scale), acc[r][t]);
      }
    }
  }
  const __m256 z = _mm256_setzero_ps();
  alignas(16) float sums[4];
  for (int r = 0; r < R; ++r) {
    _mm_store_ps(sums, q4_reduce4(acc[r][0], T > 1 ? acc[r][T > 1 ? 1 : 0] : z, T > 2 ? acc[r][T > 2 ? 2 : 0] : z, z));
    const BlockQ4* wr = w + r * n_blocks;
    for (int t = 0; t < T; ++t) {
      const float* st = x_sum + t * n_blocks;
      float mins = 0.0f;
      for (int64_t b = 0; b < n_blocks; ++b) mins = __builtin_fmaf(q4_half(wr[b].m), st[b], mins);
      y[t * ldy + r] = sums[t] + mins;
    }
  }
}

template <class Dot, int R>
inline void q4_tile_tokens(int64_t n_tok, const BlockQ4* w, int64_t n_blocks, const BlockQ8* x, const float* x_sum,
                           float* y, int64_t ldy) {
  switch (n_tok) {
    case 1: q4_tile<Dot, R, 1>(w, n_blocks, x, x_sum, y, ldy); break;
    case 2: q4_tile<Dot, R, 2>(w, n_blocks, x, x_sum, y, ldy); break;
    default: q4_tile<Dot, R, 3>(w, n_blocks, x, x_sum, y, ldy); break;
  }
}

constexpr int kQ4TileRows = 3;
constexpr int kQ4TileTokens = 3;
// Up to this many tokens the matmul streams one weight row at a time (memory
// bound, one sequential stream per core); beyond, 3-row tiles reuse each x block.
constexpr int64_t kQ4StreamTokens = 12;

template <class Dot>
void q4_gemm(const BlockQ4* w, int64_t n_rows, int64_t n_blocks, const BlockQ8* x, const float* x_sum,
             int64_t n_tok, float* y, int64_t ldy) {
  const int64_t row_step = n_tok <= kQ4StreamTokens ? 1 : kQ4TileRows;
  for (int64_t r = 0; r < n_rows; r += row_step) {
    const BlockQ4* wr = w + r * n_blocks;
    const int64_t rows = n_rows - r < row_step ? n_rows - r : row_step;
    for (int64_t t = 0; t < n_tok; t += kQ4TileTokens) {
      const int64_t toks = n_tok - t < kQ4TileTokens ? n_tok - t : kQ4TileTokens;
      const BlockQ8* xt = x + t * n_blocks;
      const float* st = x_sum + t * n_blocks;
      float* yt = y + t * ldy + r;
      switch (rows) {
        case 1: q4_tile_tokens<Dot, 1>(toks, wr, n_blocks, xt, st, yt, ldy); break;
        case 2: q4_tile_tokens<Dot, 2>(toks, wr, n_blocks, xt, st, yt, ldy); break;
        default: q4_tile_tokens<Dot, 3>(toks, wr, n_blocks, xt, st, yt, ldy); break;
      }
    }
  }
}

}  // namespace
}  // namespace shortrt
