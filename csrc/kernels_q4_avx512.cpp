// int4 x q8 matmul on AVX-512 VNNI (built with the avx512 flags): the block
// dot product is one vpdpbusd (unsigned nibbles x signed bytes, 4 products per
// int32 lane), the same int32 lanes maddubs + madd give on AVX2, and the rest
// of the arithmetic is shared (kernels_q4_x86.h): this path gives the avx2
// path's bits with fewer instructions.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>
#pragma GCC diagnostic pop

#include "kernels_q4.h"
#include "kernels_q4_x86.h"

namespace shortrt {
namespace {

struct DotVnni {
  static __m256i block(__m256i w_u8, __m256i x_s8) { return _mm256_dpbusd_epi32(_mm256_setzero_si256(), w_u8, x_s8); }
};

}  // namespace

namespace detail {
void gemm_q4_avx512(const BlockQ4* w, int64_t n_rows, int64_t n_blocks, const BlockQ8* x, const float* x_sum,
                    int64_t n_tok, float* y, int64_t ldy) {
  q4_gemm<DotVnni>(w, n_rows, n_blocks, x, x_sum, n_tok, y, ldy);
}
}  // namespace detail

}  // namespace shortrt
