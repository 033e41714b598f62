// Compute kernels of the runtime: weight layouts, packing, matmul, and the
// small per-token vector ops, with a scalar reference twin for every fast
// kernel.
//
// Three implementations fill the same KernelTable: "ref" (kernels_ref.cpp,
// plain C++, the spec and the test oracle), "avx2" (kernels_avx2.cpp, the only
// translation unit compiled with -mavx2 -mfma -mf16c) and "avx512"
// (kernels_avx512.cpp, AVX-512 F/BW/VL/DQ/VNNI: its own f32, bf16 and int8
// matmuls on 16 lanes — register tiles of rows x tokens for prefill and
// batched steps, rows streamed for decode, one accumulation order per output
// for any token count — and the avx2 kernels for the rest). kernels() picks
// one at run time by CPU feature; SHORTRT_KERNELS=ref|avx2|avx512|auto
// overrides the choice. AMX tiles are future work (no test machine has AMX).
#pragma once

#include <cstddef>
#include <cstdint>

#include "threadpool.h"

namespace shortrt {

constexpr int kQ8Block = 32;

// 32 weights (or activations) quantized to int8 with one scale:
// value = scale * q, scale = max|x| / 127, q in [-127, 127].
struct BlockQ8 {
  float scale;
  int8_t q[kQ8Block];
};
static_assert(sizeof(BlockQ8) == 36, "BlockQ8 must be a 4-byte scale followed by 32 int8, no padding");

enum class WeightType { F32, BF16, Q8 };
const char* weight_type_name(WeightType type);  // "f32" | "bf16" | "q8"

// A row-major [rows, cols] weight matrix, in one of three layouts. Not owning.
struct WeightMatrix {
  WeightType type = WeightType::F32;
  int64_t rows = 0, cols = 0;
  const float* f32 = nullptr;      // rows*cols floats
  const uint16_t* bf16 = nullptr;  // rows*cols bf16 bit patterns
  const BlockQ8* q8 = nullptr;     // rows*(cols/32) blocks; cols % 32 == 0 required
  size_t bytes() const;            // bytes one pass over the matrix reads
};

// Packing, called at load. bf16 rounds to nearest even (NaN stays NaN).
void pack_bf16(const float* src, int64_t n, uint16_t* dst);
// q8: per block of 32, scale = max|x| / 127 and q = round-half-even(x / scale).
// n % 32 == 0. The reference and avx2 paths give bit-identical blocks.
void quantize_q8(const float* src, int64_t n, BlockQ8* dst);
// Quantizes x [n_tokens, cols] into dst [n_tokens, cols/32], tokens in parallel.
void quantize_activation_q8(const float* x, int64_t n_tokens, int64_t cols, BlockQ8* dst, ThreadPool& pool);

inline float bf16_to_f32(uint16_t bits) {
  uint32_t u = static_cast<uint32_t>(bits) << 16;
  float f;
  __builtin_memcpy(&f, &u, sizeof f);
  return f;
}

// The input of a matmul: f32 always; q8 must also be filled (by
// quantize_activation_q8, once per input, so one quantization serves a fused
// q|k|v or gate|up matrix) when W.type == Q8.
struct Activation {
  const float* f32 = nullptr;
  const BlockQ8* q8 = nullptr;
};

struct KernelTable;

// y[t*ldy + r] = sum_c W[r, c] * x[t, c]   for t < n_tokens, r < rows; x is
// [n_tokens, cols] contiguous. Decode (n_tokens == 1) hands out chunks of rows,
// each streamed from memory one row at a time; prefill hands out (48 rows x 64
// tokens) tiles so a weight block stays in cache while it is used by many
// tokens. Each output element is computed by the same sequence of operations
// whatever the thread count, and (on one path) the same for one token as for
// many, so decode, batched decode and prefill agree bit for bit.
// Throws shortrt::Error on inconsistent arguments.
void matmul(const WeightMatrix& W, const Activation& x, int64_t n_tokens, float* y, int64_t ldy, ThreadPool& pool);
// The same on an explicit kernel path (tests, benchmarks).
void matmul(const KernelTable& kernels, const WeightMatrix& W, const Activation& x, int64_t n_tokens, float* y,
            int64_t ldy, ThreadPool& pool);

struct KernelTable {
  const char* name;  // "ref", "avx2" or "avx512"

  // Per-token vector ops used by the engine (n = length).
  float (*dot_f32)(const float* a, const float* b, int64_t n);
  float (*dot_bf16_f32)(const uint16_t* w, const float* x, int64_t n);
  float (*dot_q8_q8)(const BlockQ8* w, const BlockQ8* x, int64_t n_blocks);  // int32 per block, x both scales
  void (*axpy_f32)(float a, const float* x, float* y, int64_t n);            // y += a*x
  void (*rmsnorm_f32)(const float* x, const float* weight, float eps, float* out, int64_t n);  // out = x / sqrt(mean(x^2)+eps) * weight
  void (*swiglu_f32)(const float* gate, const float* up, float* out, int64_t n);              // out = silu(gate) * up
  void (*softmax_f32)(float* x, int64_t n);                                                     // in place, max-subtracted
  float (*sum_f32)(const float* x, int64_t n);
  void (*quantize_row_q8)(const float* x, int64_t n, BlockQ8* dst);  // n % 32 == 0

  // Matmul on a block of rows and tokens (what matmul() hands to one thread):
  // y[t*ldy + r] = W[r, :] . x[t, :] for r < n_rows, t < n_tok, where W is
  // [n_rows, cols] and x is [n_tok, cols], both contiguous. For q8, cols is
  // given in blocks of 32.
  void (*gemm_f32)(const float* w, int64_t n_rows, int64_t cols, const float* x, int64_t n_tok, float* y, int64_t ldy);
  void (*gemm_bf16)(const uint16_t* w, int64_t n_rows, int64_t cols, const float* x, int64_t n_tok, float* y,
                    int64_t ldy);
  void (*gemm_q8)(const BlockQ8* w, int64_t n_rows, int64_t n_blocks, const BlockQ8* x, int64_t n_tok, float* y,
                  int64_t ldy);

  // Decode attention over one range of cached keys for `group` q heads sharing
  // a kv head, leaving the partial online-softmax state (attention.h:
  // attend_partial_ref / attend_partial_avx2; any head_dim).
  void (*attend_partial)(const float* q, int group, const float* keys, const float* values, int64_t stride,
                         int64_t n_keys, int head_dim, float scale, float* acc, float* m, float* l);
};

// The active path: chosen once from SHORTRT_KERNELS (ref|avx2|avx512|auto;
// throws shortrt::Error on an unknown value or on a path the CPU lacks), else
// avx512 when cpuid reports AVX512F+BW+VL+DQ+VNNI (and the OS saves the zmm
// state), else avx2 when it reports AVX2+FMA+F16C, else ref.
const KernelTable& kernels();
const KernelTable& reference_kernels();
const KernelTable* avx2_kernels();    // nullptr when the CPU lacks AVX2/FMA/F16C
const KernelTable* avx512_kernels();  // nullptr when the CPU (or OS) lacks AVX-512 F/BW/VL/DQ/VNNI
// "ref" | "avx2" | "avx512" | "auto": switches the active path (tests and
// benchmarks); throws shortrt::Error on an unknown or unsupported name.
void set_kernels(const char* name);
// The table for a path name without switching ("auto" = what the CPU supports).
const KernelTable& kernels_by_name(const char* name);

namespace detail {
const KernelTable& reference_table();  // kernels_ref.cpp
const KernelTable& avx2_table();        // kernels_avx2.cpp; call only when the CPU has AVX2+FMA+F16C
const KernelTable& avx512_table();      // kernels_avx512.cpp; call only when avx512_kernels() would say yes
}  // namespace detail

}  // namespace shortrt
