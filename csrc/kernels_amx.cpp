// The amx path: the avx512 table with the int8 matmul of several tokens run on
// AMX tiles (kernels_amx.h: the algorithm and why it gives avx512's bits). The
// only translation unit built with -mamx-tile -mamx-int8; it is compiled on
// every machine, and dispatch (kernels.cpp) reaches it only when cpuid, XCR0
// and Linux's arch_prctl allow tiles and a self-check matched avx512. Never run
// on a machine with AMX so far: the tests run this algorithm on the emulated
// tiles (kernels_amx_emu_avx512.cpp) and skip this one.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#include <immintrin.h>
#pragma GCC diagnostic pop

#include "kernels_amx.h"

namespace shortrt {
namespace {

// The tile layer on the instructions themselves. GCC's tile intrinsics paste
// the tile number into the instruction text, so each takes a literal: one
// branch per tile the kernel uses (kernels_amx.h: C = 0, A = 1-2, B = 3-4).
#define SHORTRT_TILE_CASES(OP) \
  if constexpr (T == 0) {      \
    OP(0);                     \
  } else if constexpr (T == 1) { \
    OP(1);                     \
  } else if constexpr (T == 2) { \
    OP(2);                     \
  } else if constexpr (T == 3) { \
    OP(3);                     \
  } else {                     \
    static_assert(T == 4, "the kernel uses tiles 0-4");  \
    OP(4);                     \
  }

struct AmxTiles {
  static void configure(const TileConfig& cfg) { _tile_loadconfig(&cfg); }
  static void release() { _tile_release(); }
  template <int T>
  static void zero() {
#define SHORTRT_OP(n) _tile_zero(n)
    SHORTRT_TILE_CASES(SHORTRT_OP)
#undef SHORTRT_OP
  }
  template <int T>
  static void load(const void* base, int64_t stride) {
#define SHORTRT_OP(n) _tile_loadd(n, base, stride)
    SHORTRT_TILE_CASES(SHORTRT_OP)
#undef SHORTRT_OP
  }
  template <int T>
  static void store(void* base, int64_t stride) {
#define SHORTRT_OP(n) _tile_stored(n, base, stride)
    SHORTRT_TILE_CASES(SHORTRT_OP)
#undef SHORTRT_OP
  }
  // The kernel's two products: C = tile 0 with A = 1, B = 3 and with A = 2, B = 4.
  template <int C, int A, int B>
  static void dpbssd() {
    static_assert(C == 0 && ((A == 1 && B == 3) || (A == 2 && B == 4)), "the kernel's tile products only");
    if constexpr (A == 1) {
      _tile_dpbssd(0, 1, 3);
    } else {
      _tile_dpbssd(0, 2, 4);
    }
  }
};
#undef SHORTRT_TILE_CASES

// Below this many tokens the avx512 kernel (same bits) streams the weights;
// the tiles pay only when several tokens share each weight row. Not measured:
// no machine with AMX has run this path yet.
constexpr int64_t kAmxMinTokens = 8;

void gemm_q8_amx(const BlockQ8* w, int64_t n_rows, int64_t n_blocks, const BlockQ8* x, int64_t n_tok, float* y,
                 int64_t ldy) {
  if (n_tok < kAmxMinTokens) {
    detail::avx512_table().gemm_q8(w, n_rows, n_blocks, x, n_tok, y, ldy);
    return;
  }
  gemm_q8_tiles<AmxTiles>(w, n_rows, n_blocks, x, n_tok, y, ldy);
}

KernelTable make_amx_table() {
  KernelTable t = detail::avx512_table();
  t.name = "amx";
  t.gemm_q8 = gemm_q8_amx;
  return t;
}

}  // namespace

namespace detail {
const KernelTable& amx_table() {
  static const KernelTable table = make_amx_table();
  return table;
}
}  // namespace detail

}  // namespace shortrt
