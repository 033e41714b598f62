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
// one at run time by CPU feature; SHORTRT_KERNELS=ref|avx2|avx512|avx512bf16|amx|auto
// overrides the choice. Two more paths build on avx512 (docs/internals.md, Kernels): "avx512bf16" (kernels_avx512bf16.cpp: bf16 weights times
// activations rounded to bf16 once per input, on vdpbf16ps) and "amx"
// (kernels_amx.cpp: int8 tiles for matrix-matrix work, bit-identical to avx512;
// verified only through its scalar tile emulation, kernels_amx.h).
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

constexpr int kQ4Block = 32;

// 32 weights in 4 bits with a scale and a minimum (the layout of llama.cpp's
// Q4_1): value = d * q + m, q in 0..15, d and m fp16 bit patterns. Byte j of
// qs holds weight j in its low nibble and weight j + 16 in its high nibble.
// Packing and the int4 kernels: kernels_q4.h.
struct BlockQ4 {
  uint16_t d;
  uint16_t m;
  uint8_t qs[kQ4Block / 2];
};
static_assert(sizeof(BlockQ4) == 20, "BlockQ4 must be two fp16 (scale, minimum) followed by 16 bytes of nibbles");

constexpr int kQ4Rows = 16;

// The resident int4 layout: block column b of 16 consecutive rows i, the same
// values as their 16 BlockQ4, regrouped so one 64-byte load carries one dword
// of every row: d[i] and m[i] are row i's scale and minimum, and qs[p][i] is
// bytes 4p..4p+3 of row i's BlockQ4::qs (low nibbles weights 4p..4p+3, high
// nibbles weights 16+4p..16+4p+3). A matrix is ceil(rows/16) groups of
// cols/32 of these, group by group; rows past the last are zero (d = m = 0).
// 320 bytes (five cache lines), so at a 64-byte base each qs[p] is one aligned
// zmm load (two ymm loads on avx2). interleave_q4 (kernels_q4.h) builds it.
struct BlockQ4x16 {
  uint16_t d[kQ4Rows];
  uint16_t m[kQ4Rows];
  uint32_t qs[kQ4Block / 8][kQ4Rows];
};
static_assert(sizeof(BlockQ4x16) == kQ4Rows * sizeof(BlockQ4), "BlockQ4x16 must hold exactly 16 BlockQ4");

enum class WeightType { F32, BF16, Q8, Q4 };
const char* weight_type_name(WeightType type);  // "f32" | "bf16" | "q8" | "q4"

// A row-major [rows, cols] weight matrix, in one of three layouts. Not owning.
struct WeightMatrix {
  WeightType type = WeightType::F32;
  int64_t rows = 0, cols = 0;
  const float* f32 = nullptr;      // rows*cols floats
  const uint16_t* bf16 = nullptr;  // rows*cols bf16 bit patterns
  const BlockQ8* q8 = nullptr;     // rows*(cols/32) blocks; cols % 32 == 0 required
  const BlockQ4x16* q4 = nullptr;  // ceil(rows/16)*(cols/32) row groups; cols % 32 == 0 required
  size_t bytes() const;            // bytes one pass over the matrix reads (q4: with the zero rows of the last group)
};

// Packing, called at load. bf16 rounds to nearest even (NaN stays NaN).
void pack_bf16(const float* src, int64_t n, uint16_t* dst);
// q8: per block of 32, scale = max|x| / 127 and q = round-half-even(x / scale).
// n % 32 == 0. The reference and avx2 paths give bit-identical blocks.
void quantize_q8(const float* src, int64_t n, BlockQ8* dst);
// Quantizes x [n_tokens, cols] into dst [n_tokens, cols/32], tokens in parallel.
void quantize_activation_q8(const float* x, int64_t n_tokens, int64_t cols, BlockQ8* dst, ThreadPool& pool);

// IEEE half precision, round to nearest even (overflow to infinity, NaN stays
// a quiet NaN, subnormals kept), and its exact inverse (vcvtps2ph / vcvtph2ps).
uint16_t f32_to_f16(float x);

inline float f16_to_f32(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t e = (h >> 10) & 0x1fu, m = h & 0x3ffu;
  uint32_t bits;
  if (e == 0x1f) {
    bits = sign | 0x7f800000u | (m << 13);  // inf / NaN
  } else if (e != 0) {
    bits = sign | ((e + 112) << 23) | (m << 13);  // rebias 15 -> 127
  } else {
    const float v = static_cast<float>(m) * 5.9604644775390625e-08f;  // subnormal: m * 2^-24, exact
    __builtin_memcpy(&bits, &v, sizeof bits);
    bits |= sign;
  }
  float f;
  __builtin_memcpy(&f, &bits, sizeof f);
  return f;
}

inline float bf16_to_f32(uint16_t bits) {
  uint32_t u = static_cast<uint32_t>(bits) << 16;
  float f;
  __builtin_memcpy(&f, &u, sizeof f);
  return f;
}

// The input of a matmul: f32 always; q8 must also be filled (by
// quantize_activation_q8, once per input, so one quantization serves a fused
// q|k|v or gate|up matrix) when W.type == Q8 or Q4, and q8_sum (by
// activation_block_sums, beside q8) when W.type == Q4.
struct Activation {
  const float* f32 = nullptr;
  const BlockQ8* q8 = nullptr;
  const float* q8_sum = nullptr;  // [n_tokens, cols/32]: scale * sum(q) of each q8 block
  // [n_tokens, cols] bf16 bits of f32 (by round_activation_bf16, once per input): needed with
  // bf16 weights on a path whose gemm_bf16_bf16 is set (avx512bf16), unused elsewhere.
  const uint16_t* bf16 = nullptr;
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
  // The same over an f16, bf16 or int8 KV cache (attention.h), one entry per kv_dtype.
  void (*attend_partial_f16)(const float* q, int group, const uint16_t* keys, const uint16_t* values,
                             int64_t stride, int64_t n_keys, int head_dim, float scale, float* acc, float* m,
                             float* l);
  void (*attend_partial_bf16)(const float* q, int group, const uint16_t* keys, const uint16_t* values,
                              int64_t stride, int64_t n_keys, int head_dim, float scale, float* acc, float* m,
                              float* l);
  void (*attend_partial_q8)(const float* q, int group, const int8_t* keys, const int8_t* values, int64_t stride,
                            const float* key_scales, const float* value_scales, int64_t scale_stride,
                            int64_t n_keys, int head_dim, float scale, float* acc, float* m, float* l);
  // f16 bits to float, exactly (prefill's copy of an f16 KV cache into its fp32 scratch).
  void (*f16_to_f32_row)(const uint16_t* x, int64_t n, float* out);

  // int4 (kernels_q4*.cpp): weights x q8 activations; x_sum = Activation::q8_sum of the same tokens.
  // w is the row group holding the first row (the block starts on a multiple of 16 rows).
  void (*gemm_q4)(const BlockQ4x16* w, int64_t n_rows, int64_t n_blocks, const BlockQ8* x, const float* x_sum,
                  int64_t n_tok, float* y, int64_t ldy);

  // bf16 weights x bf16 activations (avx512bf16 only; nullptr on paths that multiply bf16
  // weights by f32 activations, which then use gemm_bf16). When set, matmul takes bf16
  // weights through it, with Activation::bf16 filled by round_row_bf16 (n values of x to
  // bf16: round to nearest even, denormals to signed zero, NaN kept quiet — vcvtneps2bf16).
  void (*round_row_bf16)(const float* x, int64_t n, uint16_t* dst);
  void (*gemm_bf16_bf16)(const uint16_t* w, int64_t n_rows, int64_t cols, const uint16_t* x, int64_t n_tok, float* y,
                         int64_t ldy);
  // Prefill attention of one tile of query tokens x the q heads sharing a kv head (attention.h).
  void (*attend_tile)(const float* q, int64_t ldq, float* out, int64_t ldo, int n_tok, int group, int head_dim,
                      float scale, const float* kt, const float* v, int64_t ldv, int64_t pos0);
};

// The active path: chosen once from SHORTRT_KERNELS (ref|avx2|avx512|avx512bf16|amx|auto;
// throws shortrt::Error on an unknown value or on a path the CPU lacks), else
// the auto choice: avx512 when cpuid reports AVX512F+BW+VL+DQ+VNNI (and the OS
// saves the zmm state), else avx2 when it reports AVX2+FMA+F16C, else ref
// (avx512bf16 and amx are chosen only by name; docs/internals.md says why).
const KernelTable& kernels();
const KernelTable& reference_kernels();
const KernelTable* avx2_kernels();    // nullptr when the CPU lacks AVX2/FMA/F16C
const KernelTable* avx512_kernels();  // nullptr when the CPU (or OS) lacks AVX-512 F/BW/VL/DQ/VNNI
const KernelTable* avx512bf16_kernels();  // nullptr without avx512 or AVX512_BF16 (cpuid 7.1 EAX bit 5)
// nullptr without avx512, AMX-TILE + AMX-INT8 (cpuid 7.0 EDX bits 24, 25), the OS's
// tile state (XCR0 bits 17-18) or Linux's permission for it (arch_prctl
// ARCH_REQ_XCOMP_PERM); amx_unavailable_reason() names the first thing missing.
const KernelTable* amx_kernels();
const char* amx_unavailable_reason();  // "" when amx_kernels() is available
// Rounds x [n_tokens, cols] to bf16 into dst with k.round_row_bf16, tokens in parallel.
void round_activation_bf16(const KernelTable& k, const float* x, int64_t n_tokens, int64_t cols, uint16_t* dst,
                           ThreadPool& pool);
// "ref" | "avx2" | "avx512" | "avx512bf16" | "amx" | "auto": switches the active path (tests and
// benchmarks); throws shortrt::Error on an unknown or unsupported name.
void set_kernels(const char* name);
// The table for a path name without switching ("auto" = what the CPU supports).
const KernelTable& kernels_by_name(const char* name);

namespace detail {
const KernelTable& reference_table();  // kernels_ref.cpp
const KernelTable& avx2_table();        // kernels_avx2.cpp; call only when the CPU has AVX2+FMA+F16C
const KernelTable& avx512_table();      // kernels_avx512.cpp; call only when avx512_kernels() would say yes
const KernelTable& avx512bf16_table();  // kernels_avx512bf16.cpp; only when avx512bf16_kernels() would say yes
const KernelTable& amx_table();         // kernels_amx.cpp; only when amx_kernels() would say yes
// Scalar twins that model the instructions bit for bit (test oracles, never dispatched):
// the reference table with gemm_bf16_bf16 / round_row_bf16 doing what vdpbf16ps and
// vcvtneps2bf16 do (kernels_bf16dp_ref.cpp), and the avx512 table with gemm_q8 running the
// amx algorithm on an emulation of the tile instructions (kernels_amx_emu_avx512.cpp).
const KernelTable& bf16dp_twin_table();
const KernelTable& amx_emulated_table();
}  // namespace detail

}  // namespace shortrt
