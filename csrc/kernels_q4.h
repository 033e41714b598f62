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

// Row groups (BlockQ4x16, kernels.h) in ceil(rows/16) * n_blocks blocks of dst
// from row-major blocks src [rows, n_blocks]; rows past `rows` in the last
// group are zero. The values do not change, only where they sit. dst may be
// src itself (the loader packs in place: group g occupies exactly the bytes of
// rows 16g..16g+15), as long as the buffer holds the whole last group.
void interleave_q4(const BlockQ4* src, int64_t rows, int64_t n_blocks, BlockQ4x16* dst);
inline int64_t q4_groups(int64_t rows) { return (rows + kQ4Rows - 1) / kQ4Rows; }

// Block b of row r of an interleaved matrix, as a BlockQ4 (the inverse of interleave_q4).
BlockQ4 q4_block_at(const BlockQ4x16* w, int64_t n_blocks, int64_t row, int64_t b);

// Row r of an interleaved matrix [rows, n_blocks * 32] as floats (dequantize_q4's arithmetic).
void dequantize_q4_row(const BlockQ4x16* w, int64_t n_blocks, int64_t row, float* out);

namespace detail {
// kernels_q4.cpp: reads the logical BlockQ4 values through q4_block_at,
// double accumulation per output, the oracle.
void gemm_q4_ref(const BlockQ4x16* w, int64_t n_rows, int64_t n_blocks, const BlockQ8* x, const float* x_sum,
                 int64_t n_tok, float* y, int64_t ldy);
// kernels_q4_avx2.cpp (maddubs + madd, 8 rows per ymm) and kernels_q4_avx512.cpp
// (vpdpbusd, 16 rows per zmm). One arithmetic for every output element (row r,
// token t), whatever the tile or path, so decode, batched decode and prefill
// agree bit for bit, and avx2 and avx512 give the same bits:
//   q = m_acc = 0 (float); for each block b in column order:
//     p     = sum of the 32 products q_i * a_i (exact int32; |p| <= 60960, so float(p) is exact)
//     q     = fma(float(p), fl(d_b * s_b), q)
//     m_acc = fma(m_b, x_sum_b, m_acc)
//   y = q + m_acc
// Lanes are rows, so no horizontal sum is needed.
void gemm_q4_avx2(const BlockQ4x16* w, int64_t n_rows, int64_t n_blocks, const BlockQ8* x, const float* x_sum,
                  int64_t n_tok, float* y, int64_t ldy);
void gemm_q4_avx512(const BlockQ4x16* w, int64_t n_rows, int64_t n_blocks, const BlockQ8* x, const float* x_sum,
                    int64_t n_tok, float* y, int64_t ldy);
}  // namespace detail

}  // namespace shortrt
