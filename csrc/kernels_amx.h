// The amx path's int8 matmul, written once against a small tile-operation
// layer so that it runs on two implementations of that layer:
//
//   AmxTiles (kernels_amx.cpp)          the AMX instructions (ldtilecfg, tilezero,
//                                       tileloadd, tdpbssd, tilestored, tilerelease);
//   EmulatedTiles (this header)         plain C++ doing exactly what those
//                                       instructions specify, used by the tests
//                                       (kernels_amx_emu_avx512.cpp) on machines
//                                       without AMX.
//
// Included only by translation units built with the AVX-512 flags; everything
// is in an unnamed namespace, so each has its own copy.
//
// The result is bit-identical to the avx512 int8 kernel (kernels_avx512.cpp):
// that kernel keeps, per (row, token), a 16-lane float accumulator whose lane
// 4i+k takes, for each quad of blocks 4g .. 4g+3, the int32 sum over bytes
// 4k .. 4k+3 and 16+4k .. 16+4k+3 of block 4g+i, as acc = fma(float(s),
// w.scale * x.scale, acc), then the tree sum. Here one 16 x 16 int32 tile C
// holds exactly those 16 lane sums for 16 weight rows and one token: two
// tdpbssd per quad, A = 16 rows x 64 bytes (two blocks of each row), B = 16 x 64
// bytes built from the token's two blocks so that column 4i+k of C only meets
// the bytes of block i's lane group k (the other B bytes are zero). The tile
// sums are exact (at most 8 * 127 * 127 per lane), so converting a row of C and
// applying the scales with the avx512 kernel's instructions, in its order, gives
// its bits. The zero bytes of B cost 16x the useful multiply-adds; that is the
// price of reproducing avx512's lane layout, which splits each block in four.
#pragma once

#include <immintrin.h>

#include <cstdint>
#include <cstring>

#include "kernels.h"
#include "kernels_avx512_tree.h"

namespace shortrt {
namespace {

// ldtilecfg's 64-byte operand (palette 1).
struct alignas(64) TileConfig {
  uint8_t palette_id = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};  // bytes per row of tile i
  uint8_t rows[16] = {};    // rows of tile i
};
static_assert(sizeof(TileConfig) == 64, "the tile configuration is 64 bytes");

// The tiles this kernel uses, all 16 rows x 64 bytes.
constexpr int kTileC = 0, kTileA0 = 1, kTileA1 = 2, kTileB0 = 3, kTileB1 = 4;
constexpr int kAmxRows = 16;       // weight rows per tile
constexpr int kAmxTokens = 16;     // tokens whose accumulators one pass keeps
constexpr int kTileBytes = 64;     // bytes per tile row

inline TileConfig amx_tile_config() {
  TileConfig cfg;
  for (int t : {kTileC, kTileA0, kTileA1, kTileB0, kTileB1}) {
    cfg.rows[t] = kAmxRows;
    cfg.colsb[t] = kTileBytes;
  }
  return cfg;
}

// ---- the emulated tile layer ----------------------------------------------
//
// Eight tiles of 16 rows x 64 bytes and the configuration, per thread, as the
// hardware keeps them. Each operation follows the instruction's definition,
// including its checks: an operation on an unconfigured tile or with shapes
// that do not fit (tdpbssd: C rows = A rows, A bytes per row = 4 x B rows,
// C bytes per row = B bytes per row) aborts, as the hardware's #UD would.
struct EmulatedTiles {
  struct State {
    bool configured = false;
    TileConfig cfg;
    alignas(64) uint8_t tile[8][16][64];
  };
  static State& state() {
    static thread_local State s;
    return s;
  }
  static void check(bool ok) {
    if (!ok) __builtin_trap();
  }
  static void configure(const TileConfig& cfg) {
    State& s = state();
    check(cfg.palette_id == 1);
    s.cfg = cfg;
    s.configured = true;
    std::memset(s.tile, 0, sizeof s.tile);  // ldtilecfg zeroes the tiles
  }
  static void release() { state().configured = false; }
  template <int T>
  static void zero() {
    State& s = state();
    check(s.configured);
    std::memset(s.tile[T], 0, sizeof s.tile[T]);
  }
  // tileloadd: row r of the tile = colsb bytes at base + r * stride; the bytes
  // past colsb and the rows past the configured rows are zeroed.
  template <int T>
  static void load(const void* base, int64_t stride) {
    State& s = state();
    check(s.configured && s.cfg.rows[T] <= 16 && s.cfg.colsb[T] <= 64);
    std::memset(s.tile[T], 0, sizeof s.tile[T]);
    for (int r = 0; r < s.cfg.rows[T]; ++r)
      std::memcpy(s.tile[T][r], static_cast<const uint8_t*>(base) + r * stride, s.cfg.colsb[T]);
  }
  template <int T>
  static void store(void* base, int64_t stride) {
    State& s = state();
    check(s.configured);
    for (int r = 0; r < s.cfg.rows[T]; ++r)
      std::memcpy(static_cast<uint8_t*>(base) + r * stride, s.tile[T][r], s.cfg.colsb[T]);
  }
  // tdpbssd: C[m].dword[n] += sum over k < K/4 and i < 4 of
  // int8(A[m].byte[4k + i]) * int8(B[k].byte[4n + i]), in int32 (wrapping).
  template <int C, int A, int B>
  static void dpbssd() {
    State& s = state();
    const TileConfig& c = s.cfg;
    check(s.configured && c.rows[C] == c.rows[A] && c.colsb[A] == 4 * c.rows[B] && c.colsb[C] == c.colsb[B]);
    const int M = c.rows[C], N = c.colsb[C] / 4, K = c.colsb[A] / 4;
    for (int m = 0; m < M; ++m)
      for (int n = 0; n < N; ++n) {
        int32_t dst;
        std::memcpy(&dst, &s.tile[C][m][4 * n], 4);
        uint32_t sum = static_cast<uint32_t>(dst);
        for (int k = 0; k < K; ++k)
          for (int i = 0; i < 4; ++i)
            sum += static_cast<uint32_t>(int32_t{static_cast<int8_t>(s.tile[A][m][4 * k + i])} *
                                         int32_t{static_cast<int8_t>(s.tile[B][k][4 * n + i])});
        dst = static_cast<int32_t>(sum);
        std::memcpy(&s.tile[C][m][4 * n], &dst, 4);
      }
  }
};

// ---- the algorithm ----------------------------------------------------------

inline int64_t amx_min(int64_t a, int64_t b) { return a < b ? a : b; }

// A for quad g, half h (blocks 4g+2h, 4g+2h+1) of rows [0, n_rows) of w: row m
// = the 32 q bytes of each block (zeros past the row's end or past n_rows).
inline void pack_a(const BlockQ8* w, int n_rows, int64_t n_blocks, int64_t g, int h, uint8_t (&a)[16][64]) {
  for (int m = 0; m < kAmxRows; ++m)
    for (int j = 0; j < 2; ++j) {
      const int64_t b = 4 * g + 2 * h + j;
      if (m < n_rows && b < n_blocks)
        std::memcpy(&a[m][32 * j], w[m * n_blocks + b].q, 32);
      else
        std::memset(&a[m][32 * j], 0, 32);
    }
}

// B for one token's quad g, half h: row kk meets A bytes 4kk .. 4kk+3 (block
// 2h + kk/8 of the quad, its bytes 4(kk%8) .. +3, lane group kk%4); it holds them
// in column n = 4(2h + kk/8) + kk%4 and zeros in every other column.
inline void pack_b(const BlockQ8* x, int64_t n_blocks, int64_t g, int h, uint8_t (&bt)[16][64]) {
  std::memset(bt, 0, sizeof bt);
  for (int kk = 0; kk < 16; ++kk) {
    const int i = 2 * h + kk / 8;
    const int64_t b = 4 * g + i;
    if (b >= n_blocks) continue;
    const int n = 4 * i + kk % 4;
    std::memcpy(&bt[kk][4 * n], x[b].q + 4 * (kk % 8), 4);
  }
}

// Each block's scale of quad g in its four lanes (zero past the row's end), as
// kernels_avx512.cpp's load_quad_scales builds it.
inline __m512 amx_quad_scales(const BlockQ8* blocks, int64_t g, int64_t n_blocks) {
  float s[16];
  for (int i = 0; i < 4; ++i) {
    const float v = 4 * g + i < n_blocks ? blocks[4 * g + i].scale : 0.0f;
    for (int k = 0; k < 4; ++k) s[4 * i + k] = v;
  }
  return _mm512_loadu_ps(s);
}

constexpr int kAmxRowTiles = 3;  // 48 rows (matmul's prefill row block) share each token's B tiles

// Rows [0, n_rows) x tokens [0, n_tok) of an int8 matmul on tiles (see the top).
// Per group of up to 16 tokens and chunk of up to 48 rows: for each quad in
// column order, the tokens' B tiles are built once, then each 16-row tile's A
// is loaded once and meets every token; the accumulators wait in memory
// between quads (a store and a load change no bits; each output still takes
// its quads in order, so the arithmetic is avx512's whatever the chunking).
template <class Tiles>
void gemm_q8_tiles(const BlockQ8* w, int64_t n_rows, int64_t n_blocks, const BlockQ8* x, int64_t n_tok, float* y,
                   int64_t ldy) {
  constexpr int kChunk = kAmxRows * kAmxRowTiles;
  const int64_t n_quads = (n_blocks + 3) / 4;
  Tiles::configure(amx_tile_config());
  alignas(64) uint8_t a[2][16][64];
  alignas(64) uint8_t bt[kAmxTokens][2][16][64];  // 32 KB
  alignas(64) int32_t c[16][16];
  __m512 acc[kChunk][kAmxTokens];  // 48 KB
  __m512 x_scale[kAmxTokens];
  for (int64_t t0 = 0; t0 < n_tok; t0 += kAmxTokens) {
    const int toks = static_cast<int>(amx_min(kAmxTokens, n_tok - t0));
    const BlockQ8* xg = x + t0 * n_blocks;
    for (int64_t r0 = 0; r0 < n_rows; r0 += kChunk) {
      const int chunk_rows = static_cast<int>(amx_min(kChunk, n_rows - r0));
      for (int m = 0; m < chunk_rows; ++m)
        for (int t = 0; t < toks; ++t) acc[m][t] = _mm512_setzero_ps();
      for (int64_t g = 0; g < n_quads; ++g) {
        for (int t = 0; t < toks; ++t) {
          pack_b(xg + t * n_blocks, n_blocks, g, 0, bt[t][0]);
          pack_b(xg + t * n_blocks, n_blocks, g, 1, bt[t][1]);
          x_scale[t] = amx_quad_scales(xg + t * n_blocks, g, n_blocks);
        }
        for (int m0 = 0; m0 < chunk_rows; m0 += kAmxRows) {
          const int rows = chunk_rows - m0 < kAmxRows ? chunk_rows - m0 : kAmxRows;
          const BlockQ8* wr = w + (r0 + m0) * n_blocks;
          pack_a(wr, rows, n_blocks, g, 0, a[0]);
          pack_a(wr, rows, n_blocks, g, 1, a[1]);
          Tiles::template load<kTileA0>(a[0], kTileBytes);
          Tiles::template load<kTileA1>(a[1], kTileBytes);
          __m512 w_scale[kAmxRows];
          for (int m = 0; m < rows; ++m) w_scale[m] = amx_quad_scales(wr + m * n_blocks, g, n_blocks);
          for (int t = 0; t < toks; ++t) {
            Tiles::template zero<kTileC>();
            Tiles::template load<kTileB0>(bt[t][0], kTileBytes);
            Tiles::template load<kTileB1>(bt[t][1], kTileBytes);
            Tiles::template dpbssd<kTileC, kTileA0, kTileB0>();
            Tiles::template dpbssd<kTileC, kTileA1, kTileB1>();
            Tiles::template store<kTileC>(c, kTileBytes);
            for (int m = 0; m < rows; ++m) {
              const __m512i sums = _mm512_load_si512(c[m]);
              acc[m0 + m][t] =
                  _mm512_fmadd_ps(_mm512_cvtepi32_ps(sums), _mm512_mul_ps(w_scale[m], x_scale[t]), acc[m0 + m][t]);
            }
          }
        }
      }
      for (int m = 0; m < chunk_rows; ++m)
        for (int t = 0; t < toks; ++t) y[(t0 + t) * ldy + r0 + m] = reduce1(acc[m][t]);
    }
  }
  Tiles::release();
}

}  // namespace
}  // namespace shortrt
