// 4-bit weights (BlockQ4, kernels.h): packing from floats, fp16 conversion,
// the per-block activation sums the int4 dot product needs, and the int4
// matmul kernels of each path.
//
// The dot product of a weight block and a q8 activation block (scale s, q8 a):
//   sum_i (d q_i + m) (s a_i) = d s sum_i q_i a_i + m (s sum_i a_i)
// The first term is an integer dot product of unsigned nibbles by signed bytes
// (maddubs on AVX2, vpdpbusd on AVX-512 VNNI); the second needs only
// s * sum_i a_i, computed once per activation block (activation_block_sums).
#pragma once

#include <cstdint>

#include "kernels.h"

namespace shortrt {

// IEEE half <-> float: f32_to_f16 / f16_to_f32 in kernels.h.

// Packs n floats (n % 32 == 0) into n/32 blocks. Rule per block of 32, all in
// float: lo = min, hi = max; m = fp16(lo); d = fp16((hi - lo) / 15); then
// q_i = clamp(round_half_even((x_i - m) / d), 0, 15) with d and m as stored
// (q = 0 when d == 0). Weights already on a Q4_1 grid (d' q + m', d' and m'
// fp16, q spanning 0 and 15 in each block, as llama.cpp's quantizer leaves them)
// come back exactly. One implementation serves every kernel path, so every
// path packs identical blocks. Throws shortrt::Error on a length that is not a
// multiple of 32, a NaN/Inf value, or a block whose minimum or step does not
// fit fp16 (|value| > 65504).
void quantize_q4(const float* src, int64_t n, BlockQ4* dst);

// value i of a block as float: fl(fl(d * q_i) + m) (no fused multiply-add, the
// arithmetic GGUF readers dequantize Q4_1 with).
void dequantize_q4(const BlockQ4* blocks, int64_t n_blocks, float* out);

// sums[b] = x[b].scale * (sum of x[b].q) for n_blocks blocks (the integer sum is
// exact, so this is one float rounding).
void activation_block_sums(const BlockQ8* x, int64_t n_blocks, float* sums);

namespace detail {
// kernels_q4.cpp: double accumulation per output, the oracle.
void gemm_q4_ref(const BlockQ4* w, int64_t n_rows, int64_t n_blocks, const BlockQ8* x, const float* x_sum,
                 int64_t n_tok, float* y, int64_t ldy);
// kernels_q4_avx2.cpp (maddubs + madd) and kernels_q4_avx512.cpp (vpdpbusd):
// the same float arithmetic on identical int32 block sums, so these two give
// the same bits.
void gemm_q4_avx2(const BlockQ4* w, int64_t n_rows, int64_t n_blocks, const BlockQ8* x, const float* x_sum,
                  int64_t n_tok, float* y, int64_t ldy);
void gemm_q4_avx512(const BlockQ4* w, int64_t n_rows, int64_t n_blocks, const BlockQ8* x, const float* x_sum,
                    int64_t n_tok, float* y, int64_t ldy);
}  // namespace detail

}  // namespace shortrt
