// The scalar twin of the avx512bf16 path's bf16 matmul and activation
// rounding: plain C++ that performs, bit for bit, what Intel's pseudocode of
// vdpbf16ps and vcvtneps2bf16 specifies, in the kernel's order (the oracle of
// tests/test_kernels_avx512bf16.py; never dispatched). Measured on an AMD EPYC
// (family 26) the hardware matched this model on every input tried, denormals
// included; docs/internals.md records how that was checked.
#include <cmath>
#include <cstring>

#include "kernels.h"

namespace shortrt {
namespace {

float from_bits(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

uint32_t to_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}

// A denormal (exponent field 0) becomes the zero of its sign: the instruction's
// "denormals are zero" on its inputs and "flush to zero" on each result.
float flush_denormal(float f) {
  const uint32_t u = to_bits(f);
  return (u & 0x7f800000u) == 0 ? from_bits(u & 0x80000000u) : f;
}

// vcvtneps2bf16 of one float.
uint16_t round_bf16(float f) {
  const uint32_t u = to_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40u);  // quiet NaN
  if ((u & 0x7f800000u) == 0) return static_cast<uint16_t>((u >> 16) & 0x8000u);         // zero or denormal
  return static_cast<uint16_t>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);                 // nearest, ties to even
}

void round_row_bf16_twin(const float* x, int64_t n, uint16_t* dst) {
  for (int64_t i = 0; i < n; ++i) dst[i] = round_bf16(x[i]);
}

// One lane of vdpbf16ps: acc += w_odd x_odd, rounded once (an FMA: the product of
// two bf16 is exact), then += w_even x_even, rounded again; denormal inputs count as
// zero and a denormal result is flushed.
float dp_lane(float acc, uint16_t w_even, uint16_t w_odd, uint16_t x_even, uint16_t x_odd) {
  acc = flush_denormal(acc);
  acc = flush_denormal(std::fma(flush_denormal(bf16_to_f32(w_odd)), flush_denormal(bf16_to_f32(x_odd)), acc));
  acc = flush_denormal(std::fma(flush_denormal(bf16_to_f32(w_even)), flush_denormal(bf16_to_f32(x_even)), acc));
  return acc;
}

// One output: 16 lanes over the columns in steps of 32 (columns past the end read
// as zero), then the tree of kernels_avx512_tree.h.
float dot_bf16_bf16_twin(const uint16_t* w, const uint16_t* x, int64_t cols) {
  float lane[16] = {};
  for (int64_t c = 0; c < cols; c += 32) {
    for (int j = 0; j < 16; ++j) {
      const int64_t e = c + 2 * j, o = e + 1;
      lane[j] = dp_lane(lane[j], e < cols ? w[e] : 0, o < cols ? w[o] : 0, e < cols ? x[e] : 0, o < cols ? x[o] : 0);
    }
  }
  float h[8], q[4];
  for (int i = 0; i < 8; ++i) h[i] = lane[i] + lane[i + 8];
  for (int k = 0; k < 4; ++k) q[k] = h[k] + h[k + 4];
  const float d0 = q[0] + q[2], d1 = q[1] + q[3];
  return d0 + d1;
}

void gemm_bf16_bf16_twin(const uint16_t* w, int64_t n_rows, int64_t cols, const uint16_t* x, int64_t n_tok, float* y,
                         int64_t ldy) {
  for (int64_t t = 0; t < n_tok; ++t)
    for (int64_t r = 0; r < n_rows; ++r) y[t * ldy + r] = dot_bf16_bf16_twin(w + r * cols, x + t * cols, cols);
}

KernelTable make_twin_table() {
  KernelTable t = detail::reference_table();
  t.name = "bf16dp-twin";
  t.round_row_bf16 = round_row_bf16_twin;
  t.gemm_bf16_bf16 = gemm_bf16_bf16_twin;
  return t;
}

}  // namespace

namespace detail {
const KernelTable& bf16dp_twin_table() {
  static const KernelTable table = make_twin_table();
  return table;
}
}  // namespace detail

}  // namespace shortrt
