// The avx512bf16 path: the avx512 table with bf16 weights multiplied by
// activations rounded to bf16, on vdpbf16ps. The only translation unit built
// with -mavx512bf16 (besides the avx512 flags); dispatch (kernels.cpp) reaches
// it only when cpuid reports AVX512_BF16 as well as the avx512 features.
// As in kernels_avx512.cpp, nothing here instantiates a standard-library
// template or calls an inline function from a header other translation units
// share (kernels_avx512_tree.h is in an unnamed namespace).
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#include <immintrin.h>
#pragma GCC diagnostic pop

#include "kernels.h"
#include "kernels_avx512_tree.h"

namespace shortrt {
namespace {

inline int64_t min_bf(int64_t a, int64_t b) { return a < b ? a : b; }

// ---- activation rounding ---------------------------------------------------
//
// vcvtneps2bf16: round to nearest even, denormal inputs to a zero of their sign,
// NaN kept a quiet NaN (the scalar twin, kernels_bf16dp_ref.cpp, does the same).

void round_row_bf16_avx512bf16(const float* x, int64_t n, uint16_t* dst) {
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m256bh h = _mm512_cvtneps_pbh(_mm512_loadu_ps(x + i));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + i), (__m256i)h);
  }
  if (i < n) {
    const __mmask16 m = static_cast<__mmask16>((1u << (n - i)) - 1);
    const __m256bh h = _mm512_cvtneps_pbh(_mm512_maskz_loadu_ps(m, x + i));
    _mm256_mask_storeu_epi16(dst + i, m, (__m256i)h);
  }
}

// ---- bf16 weights x bf16 activations ---------------------------------------
//
// One arithmetic for every output element, whatever the tile shape, the
// number of tokens or the thread count (decode, batched decode and prefill
// agree bit for bit):
//
//   a 16-lane float accumulator from zero; for c = 0, 32, 64, ... < cols in
//     order, acc = vdpbf16ps(acc, w[c .. c+31], x[c .. c+31]): lane j adds
//     w[c+2j+1] x[c+2j+1], rounds (to nearest even, a denormal result to zero),
//     then adds w[c+2j] x[c+2j] and rounds again; inputs that are denormal count
//     as zero. The last vector is masked to the columns that remain (the others
//     read as zero);
//   then the tree sum of kernels_avx512_tree.h.
//
// Per 32 columns one instruction replaces avx512's two widenings and two FMAs,
// and the activations take half the bytes. The tiles are avx512's: up to
// kStreamTokens tokens stream the weights one row at a time, more run in
// kTileRows x kTileTokens register tiles.

inline __m512bh load32(const uint16_t* p) { return (__m512bh)_mm512_loadu_si512(p); }
inline __m512bh load32(const uint16_t* p, __mmask32 m) { return (__m512bh)_mm512_maskz_loadu_epi16(m, p); }

template <int R, int T>
inline void accumulate_bf16(const uint16_t* const (&w)[R], const uint16_t* const (&x)[T], int64_t cols,
                            __m512 (&acc)[R][T]) {
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < T; ++t) acc[r][t] = _mm512_setzero_ps();
  int64_t c = 0;
  for (; c + 32 <= cols; c += 32) {
    __m512bh xv[T];
    for (int t = 0; t < T; ++t) xv[t] = load32(x[t] + c);
    for (int r = 0; r < R; ++r) {
      const __m512bh wv = load32(w[r] + c);
      for (int t = 0; t < T; ++t) acc[r][t] = _mm512_dpbf16_ps(acc[r][t], wv, xv[t]);
    }
  }
  if (c < cols) {
    const __mmask32 m = static_cast<__mmask32>((1ull << (cols - c)) - 1);
    __m512bh xv[T];
    for (int t = 0; t < T; ++t) xv[t] = load32(x[t] + c, m);
    for (int r = 0; r < R; ++r) {
      const __m512bh wv = load32(w[r] + c, m);
      for (int t = 0; t < T; ++t) acc[r][t] = _mm512_dpbf16_ps(acc[r][t], wv, xv[t]);
    }
  }
}

// Rows [0, n_rows) x tokens [0, n_tok) of an R x T tile (a narrower tile repeats
// its last row or token, whose sums are not stored).
template <int R, int T>
inline void tile_bf16(const uint16_t* w, int n_rows, int64_t cols, const uint16_t* x, int n_tok, float* y,
                      int64_t ldy) {
  const uint16_t* wr[R];
  const uint16_t* xt[T];
  for (int r = 0; r < R; ++r) wr[r] = w + (r < n_rows ? r : n_rows - 1) * cols;
  for (int t = 0; t < T; ++t) xt[t] = x + (t < n_tok ? t : n_tok - 1) * cols;
  __m512 acc[R][T];
  accumulate_bf16<R, T>(wr, xt, cols, acc);
  if constexpr (R * T == 1) {
    y[0] = reduce1(acc[0][0]);
  } else {
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

constexpr int kTileRows = 6;     // 24 accumulators + 4 token vectors + 1 weight vector
constexpr int kTileTokens = 4;
constexpr int64_t kStreamTokens = 4;

void gemm_bf16_bf16_avx512bf16(const uint16_t* w, int64_t n_rows, int64_t cols, const uint16_t* x, int64_t n_tok,
                               float* y, int64_t ldy) {
  if (n_tok <= kStreamTokens) {
    for (int64_t r = 0; r < n_rows; ++r) {
      const uint16_t* wr = w + r * cols;
      switch (n_tok) {
        case 1: tile_bf16<1, 1>(wr, 1, cols, x, 1, y + r, ldy); break;
        case 2: tile_bf16<1, 2>(wr, 1, cols, x, 2, y + r, ldy); break;
        default: tile_bf16<1, 4>(wr, 1, cols, x, static_cast<int>(n_tok), y + r, ldy); break;  // 3 or 4
      }
    }
    return;
  }
  for (int64_t r = 0; r < n_rows; r += kTileRows) {
    const int rows = static_cast<int>(min_bf(kTileRows, n_rows - r));
    for (int64_t t = 0; t < n_tok; t += kTileTokens) {
      const int toks = static_cast<int>(min_bf(kTileTokens, n_tok - t));
      tile_bf16<kTileRows, kTileTokens>(w + r * cols, rows, cols, x + t * cols, toks, y + t * ldy + r, ldy);
    }
  }
}

KernelTable make_avx512bf16_table() {
  KernelTable t = detail::avx512_table();
  t.name = "avx512bf16";
  t.round_row_bf16 = round_row_bf16_avx512bf16;
  t.gemm_bf16_bf16 = gemm_bf16_bf16_avx512bf16;
  return t;
}

}  // namespace

namespace detail {
const KernelTable& avx512bf16_table() {
  static const KernelTable table = make_avx512bf16_table();
  return table;
}
}  // namespace detail

}  // namespace shortrt
