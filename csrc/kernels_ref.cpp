// Scalar reference twins of every kernel: the spec, and the oracle the fast
// paths are tested against. Written for clarity, not speed; dot products
// accumulate in double so the oracle is more accurate than what it checks.
#include <algorithm>
#include <cmath>

#include "attention.h"
#include "kernels.h"
#include "kernels_q4.h"

namespace shortrt {
namespace {

float dot_f32_ref(const float* a, const float* b, int64_t n) {
  double sum = 0.0;
  for (int64_t i = 0; i < n; ++i) sum += static_cast<double>(a[i]) * b[i];
  return static_cast<float>(sum);
}

float dot_bf16_f32_ref(const uint16_t* w, const float* x, int64_t n) {
  double sum = 0.0;
  for (int64_t i = 0; i < n; ++i) sum += static_cast<double>(bf16_to_f32(w[i])) * x[i];
  return static_cast<float>(sum);
}

float dot_q8_q8_ref(const BlockQ8* w, const BlockQ8* x, int64_t n_blocks) {
  double sum = 0.0;
  for (int64_t b = 0; b < n_blocks; ++b) {
    int32_t block_sum = 0;  // exact: 32 * 127 * 127 fits easily
    for (int i = 0; i < kQ8Block; ++i) block_sum += int32_t{w[b].q[i]} * int32_t{x[b].q[i]};
    sum += static_cast<double>(w[b].scale * x[b].scale) * block_sum;
  }
  return static_cast<float>(sum);
}

void axpy_f32_ref(float a, const float* x, float* y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] += a * x[i];
}

void rmsnorm_f32_ref(const float* x, const float* weight, float eps, float* out, int64_t n) {
  double sum_sq = 0.0;
  for (int64_t i = 0; i < n; ++i) sum_sq += static_cast<double>(x[i]) * x[i];
  const float inv_rms = 1.0f / std::sqrt(static_cast<float>(sum_sq / static_cast<double>(n)) + eps);
  for (int64_t i = 0; i < n; ++i) out[i] = x[i] * inv_rms * weight[i];
}

void swiglu_f32_ref(const float* gate, const float* up, float* out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = gate[i] / (1.0f + std::exp(-gate[i])) * up[i];
}

void softmax_f32_ref(float* x, int64_t n) {
  if (n <= 0) return;
  const float max = *std::max_element(x, x + n);
  double sum = 0.0;
  for (int64_t i = 0; i < n; ++i) {
    x[i] = std::exp(x[i] - max);
    sum += x[i];
  }
  const float inv_sum = static_cast<float>(1.0 / sum);
  for (int64_t i = 0; i < n; ++i) x[i] *= inv_sum;
}

float sum_f32_ref(const float* x, int64_t n) {
  double sum = 0.0;
  for (int64_t i = 0; i < n; ++i) sum += x[i];
  return static_cast<float>(sum);
}

// The avx2 twin performs exactly these float operations (max, divide by 127,
// reciprocal, multiply, round half to even), so both give identical blocks.
void quantize_row_q8_ref(const float* x, int64_t n, BlockQ8* dst) {
  for (int64_t b = 0; b < n / kQ8Block; ++b) {
    const float* xb = x + b * kQ8Block;
    float amax = 0.0f;
    for (int i = 0; i < kQ8Block; ++i) amax = std::max(amax, std::fabs(xb[i]));
    const float scale = amax / 127.0f;
    const float inv_scale = scale != 0.0f ? 1.0f / scale : 0.0f;
    dst[b].scale = scale;
    for (int i = 0; i < kQ8Block; ++i) {
      float q = std::nearbyint(xb[i] * inv_scale);  // default rounding mode: half to even
      dst[b].q[i] = static_cast<int8_t>(std::min(127.0f, std::max(-127.0f, q)));
    }
  }
}

void gemm_f32_ref(const float* w, int64_t n_rows, int64_t cols, const float* x, int64_t n_tok, float* y, int64_t ldy) {
  for (int64_t t = 0; t < n_tok; ++t)
    for (int64_t r = 0; r < n_rows; ++r) y[t * ldy + r] = dot_f32_ref(w + r * cols, x + t * cols, cols);
}

void gemm_bf16_ref(const uint16_t* w, int64_t n_rows, int64_t cols, const float* x, int64_t n_tok, float* y,
                   int64_t ldy) {
  for (int64_t t = 0; t < n_tok; ++t)
    for (int64_t r = 0; r < n_rows; ++r) y[t * ldy + r] = dot_bf16_f32_ref(w + r * cols, x + t * cols, cols);
}

void gemm_q8_ref(const BlockQ8* w, int64_t n_rows, int64_t n_blocks, const BlockQ8* x, int64_t n_tok, float* y,
                 int64_t ldy) {
  for (int64_t t = 0; t < n_tok; ++t)
    for (int64_t r = 0; r < n_rows; ++r) y[t * ldy + r] = dot_q8_q8_ref(w + r * n_blocks, x + t * n_blocks, n_blocks);
}

constexpr KernelTable kReferenceTable = {
    "ref",           dot_f32_ref,          dot_bf16_f32_ref, dot_q8_q8_ref,  axpy_f32_ref,
    rmsnorm_f32_ref, swiglu_f32_ref,       softmax_f32_ref,  sum_f32_ref,    quantize_row_q8_ref,
    gemm_f32_ref,    gemm_bf16_ref,        gemm_q8_ref,      attend_partial_ref,
    attend_partial_f16_ref, attend_partial_bf16_ref, attend_partial_q8_ref, f16_to_f32_row_ref,
    detail::gemm_q4_ref,
    nullptr,         nullptr,  // bf16 weights take f32 activations here (gemm_bf16)
    attend_tile_ref,
};

}  // namespace

namespace detail {
const KernelTable& reference_table() { return kReferenceTable; }
}  // namespace detail

}  // namespace shortrt
