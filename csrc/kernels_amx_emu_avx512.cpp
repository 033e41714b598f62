// The amx path's algorithm (kernels_amx.h) on the emulated tiles: the test
// oracle that stands in for AMX on machines without it. Built with the avx512
// flags (the float part is avx512's own instructions); reached only from the
// tests' "amx-emulated" path name, never by dispatch. Unlike the real path it
// runs the tiles for every token count, so the tests reach every edge.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#include <immintrin.h>
#pragma GCC diagnostic pop

#include "kernels_amx.h"

namespace shortrt {
namespace {

void gemm_q8_amx_emulated(const BlockQ8* w, int64_t n_rows, int64_t n_blocks, const BlockQ8* x, int64_t n_tok,
                          float* y, int64_t ldy) {
  gemm_q8_tiles<EmulatedTiles>(w, n_rows, n_blocks, x, n_tok, y, ldy);
}

KernelTable make_emulated_table() {
  KernelTable t = detail::avx512_table();
  t.name = "amx-emulated";
  t.gemm_q8 = gemm_q8_amx_emulated;
  return t;
}

}  // namespace

namespace detail {
const KernelTable& amx_emulated_table() {
  static const KernelTable table = make_emulated_table();
  return table;
}
}  // namespace detail

}  // namespace shortrt
