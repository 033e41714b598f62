// AVX-512 (F, BW, VL, DQ, VNNI) kernels: the matmuls of every weight type.
// The only translation unit built with -mavx512f -mavx512bw -mavx512vl
// -mavx512dq -mavx512vnni; dispatch (kernels.cpp) reaches it only after cpuid
// and XGETBV said yes. Every kernel not rewritten here (the per-token vector
// ops, attention's decode kernel) is the AVX2 one, taken from the avx2 table.
// As in kernels_avx2.cpp, nothing here instantiates a standard-library
// template or calls an inline function from a header, so no AVX-512
// instruction can end up in code other translation units share.
// GCC 12 warns "(may be) used uninitialized" inside its own AVX-512 intrinsics
// (the _mm512_undefined_* pass-through operands; GCC bug 105593, fixed in 12.3).
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#include <immintrin.h>
#pragma GCC diagnostic pop

#include "attention.h"
#include "kernels.h"
#include "kernels_avx512_tree.h"
#include "kernels_q4.h"

namespace shortrt {
namespace {

inline int64_t min_i64(int64_t a, int64_t b) { return a < b ? a : b; }

// ---- the one horizontal sum of every matmul here: reduce8 / reduce1 -------
// (kernels_avx512_tree.h, shared with the avx512bf16 and amx translation units,
// whose results must follow the same tree).

// ---- f32 / bf16 weights x f32 activations ---------------------------------
//
// One arithmetic for every output element, whatever the tile shape or the
// number of tokens (so decode, batched decode and prefill agree bit for bit):
//
//   a 16-lane float accumulator from zero; for c = 0, 16, 32, ... < cols in
//     order, acc = fma(w[c .. c+15], x[c .. c+15], acc), the last vector
//     masked to the columns that remain (the others read as zero);
//   then the tree sum above (reduce8 / reduce1).
//
// bf16 weights widen to f32 exactly in registers (a bf16 is the high half of an
// f32), so bf16 and f32 run the same FMAs on the same activations. One chain
// per output: decode moves 64 (f32) or 32 (bf16) weight bytes per FMA latency,
// as much as the avx2 path's two 8-lane chains, and prefill tiles have
// kDenseTileRows x kDenseTileTokens independent chains to hide it.

inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const uint16_t* p) {
  const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
inline __m512 load16(const float* p, __mmask16 m) { return _mm512_maskz_loadu_ps(m, p); }
inline __m512 load16(const uint16_t* p, __mmask16 m) {
  const __m256i h = _mm256_maskz_loadu_epi16(m, p);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

// acc[r][t] = the 16 partial sums of row w[r] times token x[t] (pointers may
// repeat: a tile narrower than R x T repeats its last row or token, whose
// results are then not stored).
template <int R, int T, class W>
inline void accumulate_dense(const W* const (&w)[R], const float* const (&x)[T], int64_t cols, __m512 (&acc)[R][T]) {
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < T; ++t) acc[r][t] = _mm512_setzero_ps();
  int64_t c = 0;
  for (; c + 16 <= cols; c += 16) {
    __m512 xv[T];
    for (int t = 0; t < T; ++t) xv[t] = _mm512_loadu_ps(x[t] + c);
    for (int r = 0; r < R; ++r) {
      const __m512 wv = load16(w[r] + c);
      for (int t = 0; t < T; ++t) acc[r][t] = _mm512_fmadd_ps(wv, xv[t], acc[r][t]);
    }
  }
  if (c < cols) {
    const __mmask16 m = static_cast<__mmask16>((1u << (cols - c)) - 1);
    __m512 xv[T];
    for (int t = 0; t < T; ++t) xv[t] = _mm512_maskz_loadu_ps(m, x[t] + c);
    for (int r = 0; r < R; ++r) {
      const __m512 wv = load16(w[r] + c, m);
      for (int t = 0; t < T; ++t) acc[r][t] = _mm512_fmadd_ps(wv, xv[t], acc[r][t]);
    }
  }
}

// Rows [0, n_rows) x tokens [0, n_tok) of an R x T tile (n_rows <= R, n_tok <= T):
// y[t * ldy + r] = the tree sum of row r times token t.
template <int R, int T, class W>
inline void tile_dense(const W* w, int n_rows, int64_t cols, const float* x, int n_tok, float* y, int64_t ldy) {
  const W* wr[R];
  const float* xt[T];
  for (int r = 0; r < R; ++r) wr[r] = w + (r < n_rows ? r : n_rows - 1) * cols;
  for (int t = 0; t < T; ++t) xt[t] = x + (t < n_tok ? t : n_tok - 1) * cols;
  __m512 acc[R][T];
  accumulate_dense<R, T>(wr, xt, cols, acc);
  if constexpr (R * T == 1) {
    y[0] = reduce1(acc[0][0]);
  } else {
    // Reduced eight at a time, in (row, token) order.
    constexpr int kN = R * T, kGroups = (kN + 7) / 8;
    alignas(32) float sums[kGroups * 8];
    for (int g = 0; g < kGroups; ++g) {
      __m512 eight[8];
      for (int i = 0; i < 8; ++i) {
        const int k = g * 8 + i < kN ? g * 8 + i : kN - 1;
        eight[i] = acc[k / T][k % T];
      }
      _mm256_store_ps(sums + 8 * g, reduce8(eight));
    }
    for (int r = 0; r < n_rows; ++r)
      for (int t = 0; t < n_tok; ++t) y[t * ldy + r] = sums[r * T + t];
  }
}

// 6 x 4 accumulators + 4 token vectors + 1 weight vector = 29 of the 32 zmm
// registers; measured 10-25% faster than 4 x 6 or 8 x 3 (and 3 x 8 far slower).
constexpr int kDenseTileRows = 6;
constexpr int kDenseTileTokens = 4;
// Up to this many tokens the matmul is bound by memory bandwidth: the weights
// stream one row at a time (one sequential stream per core, as decode needs)
// against the tokens kept in registers. (At 8 tokens, a server step of 8
// decoding sequences, the tiles measured 1.2-1.5x faster than streaming; at 2
// streaming was faster.)
constexpr int64_t kDenseStreamTokens = 4;

template <class W>
void gemm_dense(const W* w, int64_t n_rows, int64_t cols, const float* x, int64_t n_tok, float* y, int64_t ldy) {
  if (n_tok <= kDenseStreamTokens) {
    for (int64_t r = 0; r < n_rows; ++r) {
      const W* wr = w + r * cols;
      switch (n_tok) {
        case 1: tile_dense<1, 1>(wr, 1, cols, x, 1, y + r, ldy); break;
        case 2: tile_dense<1, 2>(wr, 1, cols, x, 2, y + r, ldy); break;
        default: tile_dense<1, 4>(wr, 1, cols, x, static_cast<int>(n_tok), y + r, ldy); break;  // 3 or 4
      }
    }
    return;
  }
  for (int64_t r = 0; r < n_rows; r += kDenseTileRows) {
    const int rows = static_cast<int>(min_i64(kDenseTileRows, n_rows - r));
    for (int64_t t = 0; t < n_tok; t += kDenseTileTokens) {
      const int toks = static_cast<int>(min_i64(kDenseTileTokens, n_tok - t));
      tile_dense<kDenseTileRows, kDenseTileTokens>(w + r * cols, rows, cols, x + t * cols, toks, y + t * ldy + r, ldy);
    }
  }
}

void gemm_f32_avx512(const float* w, int64_t n_rows, int64_t cols, const float* x, int64_t n_tok, float* y,
                     int64_t ldy) {
  gemm_dense(w, n_rows, cols, x, n_tok, y, ldy);
}

void gemm_bf16_avx512(const uint16_t* w, int64_t n_rows, int64_t cols, const float* x, int64_t n_tok, float* y,
                      int64_t ldy) {
  gemm_dense(w, n_rows, cols, x, n_tok, y, ldy);
}

// ---- q8 weights x q8 activations ------------------------------------------
//
// One arithmetic for every output element, whatever the number of tokens or
// the block of rows a call is handed (so decode, batched decode and prefill
// agree bit for bit):
//
//   a 16-lane float accumulator per (row, token), from zero. For each quad of
//     blocks 4g .. 4g+3 in column order (the last quad of a row padded with
//     zero blocks), lanes 4i .. 4i+3 take block 4g+i, each lane 8 of its bytes
//     (bytes 4k .. 4k+3 and 16+4k .. 16+4k+3 in lane 4i+k):
//       s   = two vpdpbusd over the quad, exact in int32 (below)
//       acc = fma(float(s), w.scale * x.scale, acc)
//   then the tree sum above.
//
// Four lanes per block (rather than the eight one vpdpbusd of two blocks
// gives) halve the float work per block: per token and quad, two vpdpbusd,
// one convert, one multiply and one FMA. The weights' quad is rearranged once
// per row and reused by up to kGroupTokens tokens; x is rearranged once per
// call into the same layout.
//
// vpdpbusd multiplies unsigned by signed bytes, so x goes in as x + 128
// (x ^ 0x80, in 1..255) and the row's 128 * sum(w) per lane is subtracted by
// starting the int32 sums from -128 * sum(w): (x + 128) w - 128 w = x w, and
// 8 * 255 * 127 is far inside int32, so s holds exact partial block sums.

// One token's quad of x blocks as the inner loop wants them: the two halves
// of x + 128 in the lane layout above, and each block's scale in its 4 lanes.
struct XQuad {
  __m512i lo_u8, hi_u8;
  __m512 scale;
};

constexpr int kGroupTokens = 16;  // tokens whose accumulators stay in registers
// x quads prepared at once per token: 12 (48 blocks, 1536 columns), so the
// buffer of a group (16 tokens x 12 quads x 192 bytes = 36 KB) stays on the
// stack and in L1. Longer rows run in chunks with the accumulators kept in memory.
constexpr int64_t kChunkQuads = 12;
constexpr int64_t kChunkRows = 8;  // rows whose accumulators a chunked pass keeps

inline __m256i load_q(const BlockQ8& b) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b.q)); }

// Quad g of a row of n_blocks blocks in the lane layout: lo holds bytes 0..15
// of each block, hi bytes 16..31 (blocks past the row's end read as zero).
template <bool kFull>
inline void load_quad(const BlockQ8* blocks, int64_t g, int64_t n_blocks, __m512i& lo, __m512i& hi) {
  const int64_t b = 4 * g;
  __m256i q[4];
  for (int i = 0; i < 4; ++i) q[i] = (kFull || b + i < n_blocks) ? load_q(blocks[b + i]) : _mm256_setzero_si256();
  // [block 0 | block 1] and [block 2 | block 3], then their 128-bit halves regrouped.
  const __m512i a = _mm512_inserti64x4(_mm512_castsi256_si512(q[0]), q[1], 1);
  const __m512i c = _mm512_inserti64x4(_mm512_castsi256_si512(q[2]), q[3], 1);
  lo = _mm512_shuffle_i32x4(a, c, _MM_SHUFFLE(2, 0, 2, 0));
  hi = _mm512_shuffle_i32x4(a, c, _MM_SHUFFLE(3, 1, 3, 1));
}

// Each block's scale of quad g in its four lanes (zero past the row's end).
template <bool kFull>
inline __m512 load_quad_scales(const BlockQ8* blocks, int64_t g, int64_t n_blocks) {
  const int64_t b = 4 * g;
  float s[4];
  for (int i = 0; i < 4; ++i) s[i] = (kFull || b + i < n_blocks) ? blocks[b + i].scale : 0.0f;
  const __m128 four = _mm_setr_ps(s[0], s[1], s[2], s[3]);
  const __m512i spread = _mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3);
  return _mm512_permutexvar_ps(spread, _mm512_castps128_ps512(four));
}

// xq[(g - g0) * kGroupTokens + t] = quad g of token t, for g in [g0, g1) and
// t < T; tokens from n_tok on repeat the last one (their sums are not stored).
template <int T>
void prepare_x(const BlockQ8* x, int64_t n_blocks, int n_tok, int64_t g0, int64_t g1, XQuad* xq) {
  const __m512i bias = _mm512_set1_epi8(static_cast<char>(0x80));
  const int64_t full = n_blocks / 4;
  for (int t = 0; t < T; ++t) {
    const BlockQ8* xt = x + (t < n_tok ? t : n_tok - 1) * n_blocks;
    for (int64_t g = g0; g < g1; ++g) {
      XQuad& out = xq[(g - g0) * kGroupTokens + t];
      __m512i lo, hi;
      if (g < full) {
        load_quad<true>(xt, g, n_blocks, lo, hi);
        out.scale = load_quad_scales<true>(xt, g, n_blocks);
      } else {
        load_quad<false>(xt, g, n_blocks, lo, hi);
        out.scale = load_quad_scales<false>(xt, g, n_blocks);
      }
      out.lo_u8 = _mm512_xor_si512(lo, bias);
      out.hi_u8 = _mm512_xor_si512(hi, bias);
    }
  }
}

// acc[t] += quad g of row w times token t (see the top of the section).
template <int T, bool kFull>
inline void accumulate_quad(const BlockQ8* w, int64_t g, int64_t n_blocks, const XQuad* xq, __m512 (&acc)[T]) {
  __m512i w_lo, w_hi;
  load_quad<kFull>(w, g, n_blocks, w_lo, w_hi);
  const __m512 w_scale = load_quad_scales<kFull>(w, g, n_blocks);
  const __m512i x80 = _mm512_set1_epi8(static_cast<char>(0x80)), zero = _mm512_setzero_si512();
  const __m512i minus_bias_w =
      _mm512_sub_epi32(zero, _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(zero, x80, w_lo), x80, w_hi));
  for (int t = 0; t < T; ++t) {
    const XQuad& xt = xq[t];
    const __m512i sums = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(minus_bias_w, xt.lo_u8, w_lo), xt.hi_u8, w_hi);
    acc[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sums), _mm512_mul_ps(w_scale, xt.scale), acc[t]);
  }
}

// Quads [g0, g1) of one row (n_blocks blocks), xq prepared from g0.
template <int T>
inline void accumulate_row(const BlockQ8* w, int64_t n_blocks, int64_t g0, int64_t g1, const XQuad* xq,
                           __m512 (&acc)[T]) {
  const int64_t full_end = min_i64(g1, n_blocks / 4);  // quads of four real blocks
  int64_t g = g0;
  for (; g < full_end; ++g) accumulate_quad<T, true>(w, g, n_blocks, xq + (g - g0) * kGroupTokens, acc);
  if (g < g1) accumulate_quad<T, false>(w, g, n_blocks, xq + (g - g0) * kGroupTokens, acc);  // the padded last
}

// y[t * ldy] = the tree sum of acc[t], for t < n_tok.
template <int T>
inline void store_sums(const __m512 (&acc)[T], int n_tok, float* y, int64_t ldy) {
  if constexpr (T == 1) {
    y[0] = reduce1(acc[0]);
  } else {
    constexpr int kGroups = (T + 7) / 8;
    alignas(32) float sums[8 * kGroups];
    for (int k = 0; k < kGroups; ++k) {
      __m512 eight[8];
      for (int i = 0; i < 8; ++i) eight[i] = 8 * k + i < T ? acc[8 * k + i < T ? 8 * k + i : 0] : _mm512_setzero_ps();
      _mm256_store_ps(sums + 8 * k, reduce8(eight));
    }
    for (int t = 0; t < n_tok; ++t) y[t * ldy] = sums[t];
  }
}

// n_tok <= T tokens: every row of the block against them, one row at a time
// (the weights stream in order; the tokens' accumulators stay in registers).
// Each row's quads are rearranged once for all T tokens, so prefill takes
// the most tokens that fit the registers (16; two rows of 8 measured slower).
template <int T>
void gemm_q8_group(const BlockQ8* w, int64_t n_rows, int64_t n_blocks, const BlockQ8* x, int n_tok, float* y,
                   int64_t ldy, XQuad* xq) {
  const int64_t n_quads = (n_blocks + 3) / 4;
  if (n_quads <= kChunkQuads) {
    prepare_x<T>(x, n_blocks, n_tok, 0, n_quads, xq);
    for (int64_t r = 0; r < n_rows; ++r) {
      __m512 acc[T];
      for (int t = 0; t < T; ++t) acc[t] = _mm512_setzero_ps();
      accumulate_row<T>(w + r * n_blocks, n_blocks, 0, n_quads, xq, acc);
      store_sums<T>(acc, n_tok, y + r, ldy);
    }
    return;
  }
  // Long rows: chunks of kChunkQuads quads for kChunkRows rows at a time; the
  // accumulators wait in memory between chunks (a store and a load change no bits).
  __m512 partial[kChunkRows][T];
  for (int64_t r0 = 0; r0 < n_rows; r0 += kChunkRows) {
    const int64_t rows = min_i64(kChunkRows, n_rows - r0);
    for (int64_t r = 0; r < rows; ++r)
      for (int t = 0; t < T; ++t) partial[r][t] = _mm512_setzero_ps();
    for (int64_t g0 = 0; g0 < n_quads; g0 += kChunkQuads) {
      const int64_t g1 = min_i64(g0 + kChunkQuads, n_quads);
      prepare_x<T>(x, n_blocks, n_tok, g0, g1, xq);
      for (int64_t r = 0; r < rows; ++r) {
        __m512 acc[T];
        for (int t = 0; t < T; ++t) acc[t] = partial[r][t];
        accumulate_row<T>(w + (r0 + r) * n_blocks, n_blocks, g0, g1, xq, acc);
        for (int t = 0; t < T; ++t) partial[r][t] = acc[t];
      }
    }
    for (int64_t r = 0; r < rows; ++r) store_sums<T>(partial[r], n_tok, y + r0 + r, ldy);
  }
}

void gemm_q8_avx512(const BlockQ8* w, int64_t n_rows, int64_t n_blocks, const BlockQ8* x, int64_t n_tok, float* y,
                    int64_t ldy) {
  alignas(64) XQuad xq[kGroupTokens * kChunkQuads];
  for (int64_t t0 = 0; t0 < n_tok; t0 += kGroupTokens) {
    const BlockQ8* xt = x + t0 * n_blocks;
    float* yt = y + t0 * ldy;
    const int n = static_cast<int>(min_i64(kGroupTokens, n_tok - t0));
    // Token counts between the sizes run in the next size up (the extra tokens repeat the last).
    if (n == 1) {
      gemm_q8_group<1>(w, n_rows, n_blocks, xt, 1, yt, ldy, xq);
    } else if (n == 2) {
      gemm_q8_group<2>(w, n_rows, n_blocks, xt, 2, yt, ldy, xq);
    } else if (n <= 4) {
      gemm_q8_group<4>(w, n_rows, n_blocks, xt, n, yt, ldy, xq);
    } else if (n <= 8) {
      gemm_q8_group<8>(w, n_rows, n_blocks, xt, n, yt, ldy, xq);
    } else {
      gemm_q8_group<16>(w, n_rows, n_blocks, xt, n, yt, ldy, xq);
    }
  }
}

float dot_q8_q8_avx512(const BlockQ8* w, const BlockQ8* x, int64_t n_blocks) {
  float out = 0.0f;
  gemm_q8_avx512(w, 1, n_blocks, x, 1, &out, 1);
  return out;
}

KernelTable make_avx512_table() {
  KernelTable t = detail::avx2_table();
  t.name = "avx512";
  t.dot_q8_q8 = dot_q8_q8_avx512;
  t.gemm_f32 = gemm_f32_avx512;
  t.gemm_bf16 = gemm_bf16_avx512;
  t.gemm_q8 = gemm_q8_avx512;
  t.gemm_q4 = detail::gemm_q4_avx512;
  t.attend_tile = detail::attend_tile_avx512;
  return t;
}

}  // namespace

namespace detail {
const KernelTable& avx512_table() {
  static const KernelTable table = make_avx512_table();
  return table;
}
}  // namespace detail

}  // namespace shortrt
