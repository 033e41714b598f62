// The int4 x q8 matmul for x86 vector paths, shared by kernels_q4_avx2.cpp and
// kernels_q4_avx512.cpp and included only by them. Everything is in an
// anonymous namespace, so each of those translation units compiles its own
// copy with its own instruction set (no out-of-line copy can be shared by the
// linker). `Dot` supplies the one instruction-set-specific step.
//
// One arithmetic for every output element (row r, token t), whatever the tile
// a call is handed, so decode, batched decode and prefill agree bit for bit:
//   even = odd = 0 (8 float lanes each); for each block b in column order:
//     p    = Dot::block(w nibbles, x bytes): lane i = sum of the products of
//            weights 4i..4i+3 (exact int32)
//     acc  = fma(float(p), d_b * s_b, acc), acc = even for even b, odd for odd b
//            (d_b * s_b one float product; two chains, so decode's single row
//            is not bound by the latency of one fma chain)
//     after the last block of each group of 8 blocks (g = b / 8):
//       even = fma(m[8g..8g+7], x_sum[8g..8g+7], even)   (lanes past the row's
//            last block hold 0 in both)
//   y = reduce(even + odd), reduce(v) = ((v0+v1)+(v2+v3)) + ((v4+v5)+(v6+v7))
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

constexpr int kQ4Group = 8;  // blocks whose minimum terms one fma adds

// Lanes i < n (n <= 8) set.
inline __m256i q4_lanes_below(int64_t n) {
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(n)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

// The minima of blocks [b0, b0 + n) of a row as floats, zero past n (n <= 8):
// one masked gather of each block's first dword (d in its low half, m in its
// high half; blocks are 5 dwords apart), no store to memory and back.
inline __m256 q4_group_mins(const BlockQ4* w, int64_t b0, int64_t n) {
  static_assert(sizeof(BlockQ4) == 5 * sizeof(int), "the gather steps over 5-dword blocks");
  const __m256i index = _mm256_setr_epi32(0, 5, 10, 15, 20, 25, 30, 35);
  const int* base = reinterpret_cast<const int*>(w + b0);
  const __m256i dm = n == kQ4Group ? _mm256_i32gather_epi32(base, index, 4)
                                   : _mm256_mask_i32gather_epi32(_mm256_setzero_si256(), base, index,
                                                                 q4_lanes_below(n), 4);
  const __m256i m = _mm256_srli_epi32(dm, 16);
  const __m256i m16 = _mm256_permute4x64_epi64(_mm256_packus_epi32(m, m), 0x08);  // m0..m7 in the low 128 bits
  return _mm256_cvtph_ps(_mm256_castsi256_si128(m16));
}

// x_sum[b0, b0 + n) of one token, zero past n.
inline __m256 q4_group_sums(const float* x_sum, int64_t b0, int64_t n) {
  if (n == kQ4Group) return _mm256_loadu_ps(x_sum + b0);
  return _mm256_maskload_ps(x_sum + b0, q4_lanes_below(n));
}

// acc[r][t] += float(p) * (d * s) for block b of R rows and T tokens.
template <class Dot, int R, int T>
inline void q4_accumulate_block(const BlockQ4* w, int64_t n_blocks, const BlockQ8* x, int64_t b,
                                __m256 (&acc)[R][T]) {
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

// R rows x T tokens (R <= 2, T <= 3): each block's nibbles are unpacked once
// per row and used for T tokens; 2 x 6 accumulators + 2 unpacked rows + x
// fit the 16 ymm registers.
template <class Dot, int R, int T>
inline void q4_tile(const BlockQ4* w, int64_t n_blocks, const BlockQ8* x, const float* x_sum, float* y,
                    int64_t ldy) {
  __m256 even[R][T], odd[R][T];
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < T; ++t) even[r][t] = odd[r][t] = _mm256_setzero_ps();
  for (int64_t g0 = 0; g0 < n_blocks; g0 += kQ4Group) {
    const int64_t g1 = n_blocks - g0 < kQ4Group ? n_blocks : g0 + kQ4Group;
    for (int64_t b = g0; b < g1; b += 2) {
      q4_accumulate_block<Dot, R, T>(w, n_blocks, x, b, even);
      if (b + 1 < g1) q4_accumulate_block<Dot, R, T>(w, n_blocks, x, b + 1, odd);
    }
    for (int r = 0; r < R; ++r) {
      const __m256 mins = q4_group_mins(w + r * n_blocks, g0, g1 - g0);
      for (int t = 0; t < T; ++t)
        even[r][t] = _mm256_fmadd_ps(mins, q4_group_sums(x_sum + t * n_blocks, g0, g1 - g0), even[r][t]);
    }
  }
  const __m256 z = _mm256_setzero_ps();
  alignas(16) float sums[4];
  for (int r = 0; r < R; ++r) {
    __m256 v[3];
    for (int t = 0; t < T; ++t) v[t] = _mm256_add_ps(even[r][t], odd[r][t]);
    _mm_store_ps(sums, q4_reduce4(v[0], T > 1 ? v[T > 1 ? 1 : 0] : z, T > 2 ? v[T > 2 ? 2 : 0] : z, z));
    for (int t = 0; t < T; ++t) y[t * ldy + r] = sums[t];
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

constexpr int kQ4TileRows = 2;
constexpr int kQ4TileTokens = 3;
// Up to this many tokens the matmul streams one weight row at a time (memory
// bound, one sequential stream per core); beyond, 2-row tiles reuse each x block.
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
        default: q4_tile_tokens<Dot, 2>(toks, wr, n_blocks, xt, st, yt, ldy); break;
      }
    }
  }
}

}  // namespace
}  // namespace shortrt
