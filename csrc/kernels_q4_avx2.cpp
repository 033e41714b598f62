// int4 x q8 matmul on AVX2 (built with -mavx2 -mfma -mf16c): the block dot
// product by maddubs (unsigned nibbles x signed bytes, pair sums within int16:
// 2 * 15 * 127 < 32767) then madd by ones into int32 lanes of 4 products.
#include "kernels_q4.h"
#include "kernels_q4_x86.h"

namespace shortrt {
namespace {

struct DotMaddubs {
  static __m256i block(__m256i w_u8, __m256i x_s8) {
    return _mm256_madd_epi16(_mm256_maddubs_epi16(w_u8, x_s8), _mm256_set1_epi16(1));
  }
};

}  // namespace

namespace detail {
void gemm_q4_avx2(const BlockQ4* w, int64_t n_rows, int64_t n_blocks, const BlockQ8* x, const float* x_sum,
                  int64_t n_tok, float* y, int64_t ldy) {
  q4_gemm<DotMaddubs>(w, n_rows, n_blocks, x, x_sum, n_tok, y, ldy);
}
}  // namespace detail

}  // namespace shortrt
