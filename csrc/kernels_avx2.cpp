// AVX2 + FMA versions of the kernels. The only translation unit built with
// -mavx2 -mfma -mf16c; dispatch (kernels.cpp) reaches it only after cpuid said
// yes. To keep AVX instructions from leaking into code the rest of the library
// shares, nothing here instantiates a standard-library template or calls an
// inline function from a header: an out-of-line copy of such a function could
// be the one the linker keeps for every caller.
#include <immintrin.h>

#include "attention.h"
#include "kernels.h"
#include "kernels_q4.h"

namespace shortrt {
namespace {

inline int64_t min_i64(int64_t a, int64_t b) { return a < b ? a : b; }

inline float bf16_value(uint16_t bits) {
  const uint32_t u = static_cast<uint32_t>(bits) << 16;
  float f;
  __builtin_memcpy(&f, &u, sizeof f);
  return f;
}

// 8 weights as floats, from f32 or bf16 (bf16 = the high half of an f32).
inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const uint16_t* p) {
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}
inline float value(float v) { return v; }
inline float value(uint16_t v) { return bf16_value(v); }

// The horizontal sums of four accumulators, each summed as
// ((v0+v1)+(v2+v3)) + ((v4+v5)+(v6+v7)). Every kernel reduces with this one
// association, so a matmul output gives the same bits in any tile shape.
inline __m128 reduce4(__m256 a, __m256 b, __m256 c, __m256 d) {
  const __m256 ab = _mm256_hadd_ps(a, b);      // a01 a23 b01 b23 | a45 a67 b45 b67
  const __m256 cd = _mm256_hadd_ps(c, d);      // c01 c23 d01 d23 | c45 c67 d45 d67
  const __m256 abcd = _mm256_hadd_ps(ab, cd);  // a0-3 b0-3 c0-3 d0-3 | a4-7 b4-7 c4-7 d4-7
  return _mm_add_ps(_mm256_castps256_ps128(abcd), _mm256_extractf128_ps(abcd, 1));
}

// The horizontal sum of one vector, for kernels outside matmul.
inline float hsum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// Writes the R x T dot products held in acc (8 partial sums each) to
// y[t*ldy + r], adding tail(r, t) for the columns the vector loop left over.
template <int R, int T, class Tail>
inline void store_tile(const __m256 (&acc)[R][T], float* y, int64_t ldy, Tail tail) {
  const __m256 z = _mm256_setzero_ps();
  alignas(16) float sums[4];
  if constexpr (T == 1) {
    // One token: reduce up to four rows at once.
    for (int r0 = 0; r0 < R; r0 += 4) {
      _mm_store_ps(sums, reduce4(acc[r0][0], r0 + 1 < R ? acc[r0 + 1][0] : z, r0 + 2 < R ? acc[r0 + 2][0] : z,
                                 r0 + 3 < R ? acc[r0 + 3][0] : z));
      for (int r = r0; r < R && r < r0 + 4; ++r) y[r] = tail(r, 0, sums[r - r0]);
    }
  } else {
    static_assert(T <= 4, "tiles are at most 4 tokens wide");
    for (int r = 0; r < R; ++r) {
      _mm_store_ps(sums, reduce4(acc[r][0], acc[r][1], T > 2 ? acc[r][T > 2 ? 2 : 0] : z,
                                 T > 3 ? acc[r][T > 3 ? 3 : 0] : z));
      for (int t = 0; t < T; ++t) y[t * ldy + r] = tail(r, t, sums[t]);
    }
  }
}

// ---- f32 / bf16 weights x f32 activations ---------------------------------

// The summation order of one matmul output element is shared by every tile
// shape, so decode, batched decode and prefill agree bit for bit. f32 weights:
// one FMA chain over the 8-wide column vectors in order. bf16 weights (rows of
// at least kTwoChainVectors vectors): two chains from zero, one over the even-
// numbered vectors and one over the odd ones, each in column order, combined
// as even + odd. Either way reduce4 then sums the 8 lanes and the scalar tail
// columns follow. A single chain is bound by FMA latency; an f32 row delivers
// 32 bytes per FMA, enough to saturate memory, a bf16 row only 16, so decode
// needs the second chain there. (Keeping f32 on one chain spares its prefill
// tiles the second pass, which measured 10-15% slower.)
constexpr int64_t kTwoChainVectors = 16;  // shorter rows keep one chain
// Columns per block in which the two chains take turns inside a tile; small
// enough that the second pass finds the block's rows in L1. A multiple of 16,
// so every block starts with an even vector.
constexpr int64_t kChainBlock = 128;

constexpr bool two_chains(const float*, int64_t) { return false; }
constexpr bool two_chains(const uint16_t*, int64_t n_vectors) { return n_vectors >= kTwoChainVectors; }

// sums[r][t] += the 8-vectors w[r] * x[t] at columns c0, c0 + step, ... < c1
// (kept in registers for the loop).
template <int R, int T, class W>
inline void accumulate_columns(const W* w, int64_t cols, const float* x, int64_t c0, int64_t c1, int64_t step,
                               __m256 (&sums)[R][T]) {
  __m256 acc[R][T];
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < T; ++t) acc[r][t] = sums[r][t];
  for (int64_t c = c0; c < c1; c += step) {
    __m256 xv[T];
    for (int t = 0; t < T; ++t) xv[t] = _mm256_loadu_ps(x + t * cols + c);
    for (int r = 0; r < R; ++r) {
      const __m256 wv = load8(w + r * cols + c);
      for (int t = 0; t < T; ++t) acc[r][t] = _mm256_fmadd_ps(wv, xv[t], acc[r][t]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < T; ++t) sums[r][t] = acc[r][t];
}

// R rows of w times T tokens of x, one 8-wide accumulator per (row, token):
// each step loads R + T vectors for R * T FMAs. With two chains, the tile's
// R * T accumulators already hide FMA latency, so the chains run as
// alternating passes over column blocks rather than side by side.
template <int R, int T, class W>
inline void tile_dense(const W* w, int64_t cols, const float* x, float* y, int64_t ldy) {
  const int64_t n_vectors = cols / 8, cols8 = n_vectors * 8;
  __m256 acc[R][T];
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < T; ++t) acc[r][t] = _mm256_setzero_ps();
  if (!two_chains(w, n_vectors)) {
    for (int64_t c = 0; c < cols8; c += 8) {
      __m256 xv[T];
      for (int t = 0; t < T; ++t) xv[t] = _mm256_loadu_ps(x + t * cols + c);
      for (int r = 0; r < R; ++r) {
        const __m256 wv = load8(w + r * cols + c);
        for (int t = 0; t < T; ++t) acc[r][t] = _mm256_fmadd_ps(wv, xv[t], acc[r][t]);
      }
    }
  } else {
    __m256 odd[R][T];
    for (int r = 0; r < R; ++r)
      for (int t = 0; t < T; ++t) odd[r][t] = _mm256_setzero_ps();
    for (int64_t kb = 0; kb < cols8; kb += kChainBlock) {
      const int64_t kend = min_i64(kb + kChainBlock, cols8);
      accumulate_columns<R, T>(w, cols, x, kb, kend, 16, acc);
      accumulate_columns<R, T>(w, cols, x, kb + 8, kend, 16, odd);
    }
    for (int r = 0; r < R; ++r)
      for (int t = 0; t < T; ++t) acc[r][t] = _mm256_add_ps(acc[r][t], odd[r][t]);
  }
  store_tile<R, T>(acc, y, ldy, [&](int r, int t, float s) {
    for (int64_t c = cols8; c < cols; ++c) s = __builtin_fmaf(value(w[r * cols + c]), x[t * cols + c], s);
    return s;
  });
}

// One row times one token (decode): the same operations as tile_dense<1, 1>,
// but the two chains advance side by side so their FMAs overlap. (Reading
// several rows, or several ranges of one row, side by side measured 2x slower:
// decode needs one sequential stream per core.)
template <class W>
inline void row_dot(const W* w, int64_t cols, const float* x, float* y) {
  const int64_t n_vectors = cols / 8, cols8 = n_vectors * 8;
  if (!two_chains(w, n_vectors)) {
    tile_dense<1, 1>(w, cols, x, y, 1);
    return;
  }
  __m256 even = _mm256_setzero_ps(), odd = _mm256_setzero_ps();
  int64_t c = 0;
  for (; c + 16 <= cols8; c += 16) {
    even = _mm256_fmadd_ps(load8(w + c), _mm256_loadu_ps(x + c), even);
    odd = _mm256_fmadd_ps(load8(w + c + 8), _mm256_loadu_ps(x + c + 8), odd);
  }
  if (c < cols8) even = _mm256_fmadd_ps(load8(w + c), _mm256_loadu_ps(x + c), even);  // odd count: last is even
  const __m256 acc[1][1] = {{_mm256_add_ps(even, odd)}};
  store_tile<1, 1>(acc, y, 1, [&](int, int, float s) {
    for (int64_t cc = cols8; cc < cols; ++cc) s = __builtin_fmaf(value(w[cc]), x[cc], s);
    return s;
  });
}

template <int R, class W>
inline void tile_dense_tokens(int64_t n_tok, const W* w, int64_t cols, const float* x, float* y, int64_t ldy) {
  switch (n_tok) {
    case 1:
      if constexpr (R == 1) {
        row_dot(w, cols, x, y);
      } else {
        tile_dense<R, 1>(w, cols, x, y, ldy);
      }
      break;
    case 2: tile_dense<R, 2>(w, cols, x, y, ldy); break;
    case 3: tile_dense<R, 3>(w, cols, x, y, ldy); break;
    default: tile_dense<R, 4>(w, cols, x, y, ldy); break;
  }
}

constexpr int kTileRows = 3;  // 3 x 4 accumulators leave 4 of the 16 ymm registers for operands
constexpr int kTileTokens = 4;
// Up to this many tokens a matmul is bound by memory bandwidth and streams one
// weight row at a time; beyond, 3-row tiles reuse each loaded x more (measured
// crossover: 4-6 tokens for f32).
constexpr int64_t kStreamTokens = 4;

template <class W>
void gemm_dense(const W* w, int64_t n_rows, int64_t cols, const float* x, int64_t n_tok, float* y, int64_t ldy) {
  if (n_tok <= kStreamTokens) {
    // Decode (and a batch of a few tokens) is bound by memory bandwidth: stream
    // one row at a time. Reading several rows side by side measured 1.5-2x
    // slower here (the prefetchers follow one sequential stream per core far
    // better than several short ones).
    for (int64_t r = 0; r < n_rows; ++r)
      for (int64_t t = 0; t < n_tok; t += kTileTokens)
        tile_dense_tokens<1>(min_i64(kTileTokens, n_tok - t), w + r * cols, cols, x + t * cols, y + t * ldy + r, ldy);
    return;
  }
  for (int64_t r = 0; r < n_rows; r += kTileRows) {
    const W* wr = w + r * cols;
    const int64_t rows = min_i64(kTileRows, n_rows - r);
    for (int64_t t = 0; t < n_tok; t += kTileTokens) {
      const int64_t toks = min_i64(kTileTokens, n_tok - t);
      float* yt = y + t * ldy + r;
      const float* xt = x + t * cols;
      switch (rows) {
        case 1: tile_dense_tokens<1>(toks, wr, cols, xt, yt, ldy); break;
        case 2: tile_dense_tokens<2>(toks, wr, cols, xt, yt, ldy); break;
        default: tile_dense_tokens<3>(toks, wr, cols, xt, yt, ldy); break;
      }
    }
  }
}

void gemm_f32_avx2(const float* w, int64_t n_rows, int64_t cols, const float* x, int64_t n_tok, float* y,
                   int64_t ldy) {
  gemm_dense(w, n_rows, cols, x, n_tok, y, ldy);
}

void gemm_bf16_avx2(const uint16_t* w, int64_t n_rows, int64_t cols, const float* x, int64_t n_tok, float* y,
                    int64_t ldy) {
  gemm_dense(w, n_rows, cols, x, n_tok, y, ldy);
}

// Dot products of short vectors (head_dim-sized): two chains and a cheap
// horizontal sum. Only the kernel tests call them now; the engine's attention
// runs attend_partial_avx2 (attention_avx2.cpp), and matmul keeps its own
// summation order.
template <class W>
inline float dot_short(const W* w, const float* x, int64_t n) {
  __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    s0 = _mm256_fmadd_ps(load8(w + i), _mm256_loadu_ps(x + i), s0);
    s1 = _mm256_fmadd_ps(load8(w + i + 8), _mm256_loadu_ps(x + i + 8), s1);
  }
  if (i + 8 <= n) {
    s0 = _mm256_fmadd_ps(load8(w + i), _mm256_loadu_ps(x + i), s0);
    i += 8;
  }
  float s = hsum8(_mm256_add_ps(s0, s1));
  for (; i < n; ++i) s = __builtin_fmaf(value(w[i]), x[i], s);
  return s;
}

float dot_f32_avx2(const float* a, const float* b, int64_t n) { return dot_short(a, b, n); }
float dot_bf16_f32_avx2(const uint16_t* w, const float* x, int64_t n) { return dot_short(w, x, n); }

// ---- q8 weights x q8 activations ------------------------------------------

inline __m256i load_q(const BlockQ8& b) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b.q)); }

// R rows x T tokens of q8 blocks. A block pair's dot product is exact in int32:
// maddubs multiplies unsigned by signed bytes, so x's sign moves onto w
// (w*x = |x| * (w*sign(x))), and |x|, |w| <= 127 keep the pair sums within
// int16. Then one FMA by the product of the two scales per block pair.
template <int R, int T>
inline void tile_q8(const BlockQ8* w, int64_t n_blocks, const BlockQ8* x, float* y, int64_t ldy) {
  __m256 acc[R][T];
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < T; ++t) acc[r][t] = _mm256_setzero_ps();
  const __m256i ones = _mm256_set1_epi16(1);
  for (int64_t b = 0; b < n_blocks; ++b) {
    __m256i x_abs[T];
    for (int t = 0; t < T; ++t) {
      const __m256i x_q = load_q(x[t * n_blocks + b]);
      x_abs[t] = _mm256_sign_epi8(x_q, x_q);
    }
    for (int r = 0; r < R; ++r) {
      const BlockQ8& wb = w[r * n_blocks + b];
      const __m256i w_q = load_q(wb);
      const __m256 w_scale = _mm256_set1_ps(wb.scale);
      for (int t = 0; t < T; ++t) {
        const BlockQ8& xb = x[t * n_blocks + b];
        // x's bytes are re-read here rather than kept: registers go to accumulators.
        const __m256i w_signed = _mm256_sign_epi8(w_q, load_q(xb));
        const __m256i sums = _mm256_madd_epi16(_mm256_maddubs_epi16(x_abs[t], w_signed), ones);
        const __m256 scale = _mm256_mul_ps(w_scale, _mm256_broadcast_ss(&xb.scale));
        acc[r][t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sums), scale, acc[r][t]);
      }
    }
  }
  store_tile<R, T>(acc, y, ldy, [](int, int, float s) { return s; });
}

template <int R>
inline void tile_q8_tokens(int64_t n_tok, const BlockQ8* w, int64_t n_blocks, const BlockQ8* x, float* y,
                           int64_t ldy) {
  switch (n_tok) {
    case 1: tile_q8<R, 1>(w, n_blocks, x, y, ldy); break;
    case 2: tile_q8<R, 2>(w, n_blocks, x, y, ldy); break;
    default: tile_q8<R, 3>(w, n_blocks, x, y, ldy); break;
  }
}

// 4 x 3 accumulators + 3 |x| vectors: measured the fastest int8 tile here.
constexpr int kTileRowsQ8 = 4;
constexpr int kTileTokensQ8 = 3;
// int8 rows are 3.6x smaller, so streaming single rows pays up to more tokens
// (measured crossover: 12-16 tokens).
constexpr int64_t kStreamTokensQ8 = 12;

void gemm_q8_avx2(const BlockQ8* w, int64_t n_rows, int64_t n_blocks, const BlockQ8* x, int64_t n_tok, float* y,
                  int64_t ldy) {
  if (n_tok <= kStreamTokensQ8) {  // memory-bound: one row at a time, see gemm_dense
    for (int64_t r = 0; r < n_rows; ++r)
      for (int64_t t = 0; t < n_tok; t += kTileTokensQ8)
        tile_q8_tokens<1>(min_i64(kTileTokensQ8, n_tok - t), w + r * n_blocks, n_blocks, x + t * n_blocks,
                          y + t * ldy + r, ldy);
    return;
  }
  for (int64_t r = 0; r < n_rows; r += kTileRowsQ8) {
    const BlockQ8* wr = w + r * n_blocks;
    const int64_t rows = min_i64(kTileRowsQ8, n_rows - r);
    for (int64_t t = 0; t < n_tok; t += kTileTokensQ8) {
      const int64_t toks = min_i64(kTileTokensQ8, n_tok - t);
      const BlockQ8* xt = x + t * n_blocks;
      float* yt = y + t * ldy + r;
      switch (rows) {
        case 1: tile_q8_tokens<1>(toks, wr, n_blocks, xt, yt, ldy); break;
        case 2: tile_q8_tokens<2>(toks, wr, n_blocks, xt, yt, ldy); break;
        case 3: tile_q8_tokens<3>(toks, wr, n_blocks, xt, yt, ldy); break;
        default: tile_q8_tokens<4>(toks, wr, n_blocks, xt, yt, ldy); break;
      }
    }
  }
}

float dot_q8_q8_avx2(const BlockQ8* w, const BlockQ8* x, int64_t n_blocks) {
  float out;
  tile_q8<1, 1>(w, n_blocks, x, &out, 1);
  return out;
}

// Same float operations as quantize_row_q8_ref, so the blocks are bit-identical.
void quantize_row_q8_avx2(const float* x, int64_t n, BlockQ8* dst) {
  const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  const __m256 lo = _mm256_set1_ps(-127.0f), hi = _mm256_set1_ps(127.0f);
  for (int64_t b = 0; b < n / kQ8Block; ++b) {
    const float* xb = x + b * kQ8Block;
    __m256 v[4];
    __m256 amax = _mm256_setzero_ps();
    for (int i = 0; i < 4; ++i) {
      v[i] = _mm256_loadu_ps(xb + 8 * i);
      amax = _mm256_max_ps(amax, _mm256_and_ps(v[i], abs_mask));
    }
    __m128 m = _mm_max_ps(_mm256_castps256_ps128(amax), _mm256_extractf128_ps(amax, 1));
    m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    m = _mm_max_ss(m, _mm_movehdup_ps(m));
    const float scale = _mm_cvtss_f32(m) / 127.0f;
    const float inv_scale = scale != 0.0f ? 1.0f / scale : 0.0f;
    dst[b].scale = scale;
    const __m256 inv = _mm256_set1_ps(inv_scale);
    __m256i q[4];
    for (int i = 0; i < 4; ++i) {
      __m256 s = _mm256_round_ps(_mm256_mul_ps(v[i], inv), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
      q[i] = _mm256_cvtps_epi32(_mm256_min_ps(hi, _mm256_max_ps(lo, s)));
    }
    // The packs work within 128-bit lanes; the permute puts the 32 bytes back in order.
    const __m256i q01 = _mm256_packs_epi32(q[0], q[1]);
    const __m256i q23 = _mm256_packs_epi32(q[2], q[3]);
    const __m256i q0123 = _mm256_packs_epi16(q01, q23);
    const __m256i ordered = _mm256_permutevar8x32_epi32(q0123, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst[b].q), ordered);
  }
}

// ---- per-token vector ops ---------------------------------------------------

// e^x for 8 floats: x = n ln2 + r with |r| <= ln2/2, e^r by a degree-6
// polynomial (Cephes expf coefficients, ~1 ulp), 2^n built in the exponent bits.
inline __m256 exp8(__m256 x) {
  x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.3365f)), _mm256_set1_ps(88.3762626f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504089f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  p = _mm256_fmadd_ps(_mm256_mul_ps(p, r), r, _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  const __m256i pow2n = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(pow2n));
}

// Scalar tails go through the vector code on a zero-padded copy, so every
// element gets the same approximation.
inline __m256 load_partial(const float* p, int64_t n) {
  alignas(32) float buf[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  for (int64_t i = 0; i < n; ++i) buf[i] = p[i];
  return _mm256_load_ps(buf);
}
inline void store_partial(float* p, __m256 v, int64_t n) {
  alignas(32) float buf[8];
  _mm256_store_ps(buf, v);
  for (int64_t i = 0; i < n; ++i) p[i] = buf[i];
}

void axpy_f32_avx2(float a, const float* x, float* y, int64_t n) {
  const __m256 av = _mm256_set1_ps(a);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(y + i, _mm256_fmadd_ps(av, _mm256_loadu_ps(x + i), _mm256_loadu_ps(y + i)));
  for (; i < n; ++i) y[i] = __builtin_fmaf(a, x[i], y[i]);
}

float sum_f32_avx2(const float* x, int64_t n) {
  // Four accumulators: a memory-bound loop needs loads in flight, not FMA latency.
  __m256 s0 = _mm256_setzero_ps(), s1 = s0, s2 = s0, s3 = s0;
  int64_t i = 0;
  for (; i + 32 <= n; i += 32) {
    s0 = _mm256_add_ps(s0, _mm256_loadu_ps(x + i));
    s1 = _mm256_add_ps(s1, _mm256_loadu_ps(x + i + 8));
    s2 = _mm256_add_ps(s2, _mm256_loadu_ps(x + i + 16));
    s3 = _mm256_add_ps(s3, _mm256_loadu_ps(x + i + 24));
  }
  for (; i + 8 <= n; i += 8) s0 = _mm256_add_ps(s0, _mm256_loadu_ps(x + i));
  float s = hsum8(_mm256_add_ps(_mm256_add_ps(s0, s1), _mm256_add_ps(s2, s3)));
  for (; i < n; ++i) s += x[i];
  return s;
}

void rmsnorm_f32_avx2(const float* x, const float* weight, float eps, float* out, int64_t n) {
  __m256 s0 = _mm256_setzero_ps(), s1 = s0;
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m256 a = _mm256_loadu_ps(x + i), b = _mm256_loadu_ps(x + i + 8);
    s0 = _mm256_fmadd_ps(a, a, s0);
    s1 = _mm256_fmadd_ps(b, b, s1);
  }
  for (; i + 8 <= n; i += 8) {
    const __m256 a = _mm256_loadu_ps(x + i);
    s0 = _mm256_fmadd_ps(a, a, s0);
  }
  float sum_sq = hsum8(_mm256_add_ps(s0, s1));
  for (; i < n; ++i) sum_sq = __builtin_fmaf(x[i], x[i], sum_sq);
  const float inv_rms = 1.0f / __builtin_sqrtf(sum_sq / static_cast<float>(n) + eps);
  const __m256 iv = _mm256_set1_ps(inv_rms);
  for (i = 0; i + 8 <= n; i += 8)
    _mm256_storeu_ps(out + i, _mm256_mul_ps(_mm256_mul_ps(_mm256_loadu_ps(x + i), iv), _mm256_loadu_ps(weight + i)));
  for (; i < n; ++i) out[i] = x[i] * inv_rms * weight[i];
}

inline __m256 swiglu8(__m256 g, __m256 u) {
  const __m256 e = exp8(_mm256_sub_ps(_mm256_setzero_ps(), g));
  return _mm256_div_ps(_mm256_mul_ps(g, u), _mm256_add_ps(_mm256_set1_ps(1.0f), e));
}

void swiglu_f32_avx2(const float* gate, const float* up, float* out, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(out + i, swiglu8(_mm256_loadu_ps(gate + i), _mm256_loadu_ps(up + i)));
  if (i < n) store_partial(out + i, swiglu8(load_partial(gate + i, n - i), load_partial(up + i, n - i)), n - i);
}

void softmax_f32_avx2(float* x, int64_t n) {
  if (n <= 0) return;
  __m256 mv = _mm256_set1_ps(x[0]);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) mv = _mm256_max_ps(mv, _mm256_loadu_ps(x + i));
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(mv), _mm256_extractf128_ps(mv, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  m = _mm_max_ss(m, _mm_movehdup_ps(m));
  float max = _mm_cvtss_f32(m);
  for (; i < n; ++i) max = x[i] > max ? x[i] : max;

  const __m256 maxv = _mm256_set1_ps(max);
  __m256 sv = _mm256_setzero_ps();
  for (i = 0; i + 8 <= n; i += 8) {
    const __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(x + i), maxv));
    _mm256_storeu_ps(x + i, e);
    sv = _mm256_add_ps(sv, e);
  }
  float sum = hsum8(sv);
  if (i < n) {
    // Only the n - i real lanes enter the sum; the zero padding would add e^-max.
    alignas(32) float buf[8];
    _mm256_store_ps(buf, exp8(_mm256_sub_ps(load_partial(x + i, n - i), maxv)));
    for (int64_t j = 0; j < n - i; ++j) {
      x[i + j] = buf[j];
      sum += buf[j];
    }
  }
  const __m256 inv = _mm256_set1_ps(1.0f / sum);
  for (i = 0; i + 8 <= n; i += 8) _mm256_storeu_ps(x + i, _mm256_mul_ps(_mm256_loadu_ps(x + i), inv));
  for (; i < n; ++i) x[i] *= 1.0f / sum;
}

constexpr KernelTable kAvx2Table = {
    "avx2",           dot_f32_avx2,    dot_bf16_f32_avx2, dot_q8_q8_avx2, axpy_f32_avx2,
    rmsnorm_f32_avx2, swiglu_f32_avx2, softmax_f32_avx2,  sum_f32_avx2,   quantize_row_q8_avx2,
    gemm_f32_avx2,    gemm_bf16_avx2,  gemm_q8_avx2,      detail::attend_partial_avx2,
    detail::attend_partial_f16_avx2, detail::attend_partial_bf16_avx2, detail::attend_partial_q8_avx2,
    detail::f16_to_f32_row_avx2,
    detail::gemm_q4_avx2,
    nullptr,
    nullptr,  // round_row_bf16, gemm_bf16_bf16: bf16 weights take f32 activations (gemm_bf16)
    detail::attend_tile_avx2,
};

}  // namespace

namespace detail {
const KernelTable& avx2_table() { return kAvx2Table; }
}  // namespace detail

}  // namespace shortrt
