// int4 weights: fp16 conversion, packing, dequantization, the activation
// block sums, and the scalar reference kernel (the spec the avx2 and avx512
// kernels are tested against).
#include "kernels_q4.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <string>
#include <vector>

#include "error.h"

namespace shortrt {

void quantize_q4(const float* src, int64_t n, BlockQ4* dst) {
  if (n % kQ4Block != 0) throw Error("quantize_q4: length " + std::to_string(n) + " is not a multiple of 32");
  for (int64_t b = 0; b < n / kQ4Block; ++b) {
    const float* x = src + b * kQ4Block;
    float lo = x[0], hi = x[0];
    for (int i = 0; i < kQ4Block; ++i) {
      if (!std::isfinite(x[i]))
        throw Error("int4 weights cannot hold NaN/Inf (value " + std::to_string(x[i]) + " at element " +
                    std::to_string(b * kQ4Block + i) + ")");
      lo = std::min(lo, x[i]);
      hi = std::max(hi, x[i]);
    }
    const uint16_t m16 = f32_to_f16(lo), d16 = f32_to_f16((hi - lo) / 15.0f);
    if ((m16 & 0x7c00u) == 0x7c00u || (d16 & 0x7c00u) == 0x7c00u)
      throw Error("int4 weights: block " + std::to_string(b) + " spans [" + std::to_string(lo) + ", " +
                  std::to_string(hi) + "], beyond what an fp16 minimum and step can hold (|value| <= 65504)");
    const float m = f16_to_f32(m16), d = f16_to_f32(d16);
    uint8_t q[kQ4Block];
    for (int i = 0; i < kQ4Block; ++i) {
      const float level = d != 0.0f ? std::nearbyint((x[i] - m) / d) : 0.0f;  // default rounding: half to even
      q[i] = static_cast<uint8_t>(std::min(15.0f, std::max(0.0f, level)));
    }
    dst[b].d = d16;
    dst[b].m = m16;
    for (int j = 0; j < kQ4Block / 2; ++j) dst[b].qs[j] = static_cast<uint8_t>(q[j] | q[j + kQ4Block / 2] << 4);
  }
}

void dequantize_q4(const BlockQ4* blocks, int64_t n_blocks, float* out) {
  for (int64_t b = 0; b < n_blocks; ++b) {
    const float d = f16_to_f32(blocks[b].d), m = f16_to_f32(blocks[b].m);
    float* o = out + b * kQ4Block;
    for (int j = 0; j < kQ4Block / 2; ++j) {
      // Two roundings on purpose (this file is built without FMA, so nothing fuses them).
      const float lo = d * static_cast<float>(blocks[b].qs[j] & 0x0f);
      const float hi = d * static_cast<float>(blocks[b].qs[j] >> 4);
      o[j] = lo + m;
      o[j + kQ4Block / 2] = hi + m;
    }
  }
}

void activation_block_sums(const BlockQ8* x, int64_t n_blocks, float* sums) {
  for (int64_t b = 0; b < n_blocks; ++b) {
    int32_t s = 0;
    for (int i = 0; i < kQ8Block; ++i) s += x[b].q[i];
    sums[b] = x[b].scale * static_cast<float>(s);
  }
}

void interleave_q4(const BlockQ4* src, int64_t rows, int64_t n_blocks, BlockQ4x16* dst) {
  std::vector<BlockQ4> group(static_cast<size_t>(kQ4Rows * n_blocks));
  for (int64_t g = 0; g < q4_groups(rows); ++g) {
    const int64_t n = std::min<int64_t>(kQ4Rows, rows - g * kQ4Rows);
    // A copy first: dst may overlay src, and group g's output covers exactly its input rows.
    std::memcpy(group.data(), src + g * kQ4Rows * n_blocks, static_cast<size_t>(n * n_blocks) * sizeof(BlockQ4));
    std::memset(group.data() + n * n_blocks, 0, static_cast<size_t>((kQ4Rows - n) * n_blocks) * sizeof(BlockQ4));
    for (int64_t b = 0; b < n_blocks; ++b) {
      BlockQ4x16 out;
      for (int i = 0; i < kQ4Rows; ++i) {
        const BlockQ4& blk = group[static_cast<size_t>(i * n_blocks + b)];
        out.d[i] = blk.d;
        out.m[i] = blk.m;
        for (int p = 0; p < kQ4Block / 8; ++p) std::memcpy(&out.qs[p][i], blk.qs + 4 * p, 4);
      }
      std::memcpy(dst + g * n_blocks + b, &out, sizeof out);
    }
  }
}

BlockQ4 q4_block_at(const BlockQ4x16* w, int64_t n_blocks, int64_t row, int64_t b) {
  const BlockQ4x16& g = w[(row / kQ4Rows) * n_blocks + b];
  const int i = static_cast<int>(row % kQ4Rows);
  BlockQ4 out;
  out.d = g.d[i];
  out.m = g.m[i];
  for (int p = 0; p < kQ4Block / 8; ++p) std::memcpy(out.qs + 4 * p, &g.qs[p][i], 4);
  return out;
}

void dequantize_q4_row(const BlockQ4x16* w, int64_t n_blocks, int64_t row, float* out) {
  for (int64_t b = 0; b < n_blocks; ++b) {
    const BlockQ4 blk = q4_block_at(w, n_blocks, row, b);
    dequantize_q4(&blk, 1, out + b * kQ4Block);
  }
}

namespace detail {

void gemm_q4_ref(const BlockQ4x16* w, int64_t n_rows, int64_t n_blocks, const BlockQ8* x, const float* x_sum,
                 int64_t n_tok, float* y, int64_t ldy) {
  for (int64_t t = 0; t < n_tok; ++t) {
    const BlockQ8* xt = x + t * n_blocks;
    const float* st = x_sum + t * n_blocks;
    for (int64_t r = 0; r < n_rows; ++r) {
      double sum = 0.0;
      for (int64_t b = 0; b < n_blocks; ++b) {
        const BlockQ4 wb = q4_block_at(w, n_blocks, r, b);
        int32_t dot = 0;  // exact: 32 * 15 * 127 fits easily
        for (int j = 0; j < kQ4Block / 2; ++j) {
          dot += int32_t{static_cast<int32_t>(wb.qs[j] & 0x0f)} * xt[b].q[j];
          dot += int32_t{static_cast<int32_t>(wb.qs[j] >> 4)} * xt[b].q[j + kQ4Block / 2];
        }
        const double d = f16_to_f32(wb.d), m = f16_to_f32(wb.m);
        sum += d * xt[b].scale * dot + m * st[b];
      }
      y[t * ldy + r] = static_cast<float>(sum);
    }
  }
}

}  // namespace detail

}  // namespace shortrt
