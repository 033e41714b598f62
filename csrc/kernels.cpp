// Kernel dispatch (which KernelTable runs), weight packing, and the matmul
// driver that splits a matmul into per-thread blocks.
#include "kernels.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <string>
#include <vector>

#include "error.h"
#include "kernels_q4.h"

#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>
#endif
#if defined(__linux__) && defined(__x86_64__)
#include <sys/syscall.h>
#include <unistd.h>
#endif

namespace shortrt {
namespace {

// AVX2 + FMA + F16C, and the OS saves the ymm registers (OSXSAVE + XCR0).
bool cpu_has_avx2_fma_f16c() {
#if defined(__x86_64__) || defined(__i386__)
  unsigned eax, ebx, ecx, edx;
  if (!__get_cpuid(1, &eax, &ebx, &ecx, &edx)) return false;
  const bool fma = ecx & (1u << 12), osxsave = ecx & (1u << 27), avx = ecx & (1u << 28), f16c = ecx & (1u << 29);
  if (!(fma && osxsave && avx && f16c)) return false;
  unsigned xcr0_lo, xcr0_hi;
  __asm__ volatile("xgetbv" : "=a"(xcr0_lo), "=d"(xcr0_hi) : "c"(0));
  if ((xcr0_lo & 0x6) != 0x6) return false;  // xmm and ymm state enabled
  if (__get_cpuid_max(0, nullptr) < 7) return false;
  __cpuid_count(7, 0, eax, ebx, ecx, edx);
  return ebx & (1u << 5);
#else
  return false;
#endif
}

// AVX512F+BW+VL+DQ+VNNI (with AVX2+FMA+F16C, whose kernels the avx512 table
// reuses), and the OS saves the opmask and all 512-bit registers (XCR0 bits 5-7)
// as well as xmm/ymm (bits 1-2).
bool cpu_has_avx512_vnni() {
#if defined(__x86_64__) || defined(__i386__)
  if (!cpu_has_avx2_fma_f16c()) return false;
  unsigned xcr0_lo, xcr0_hi;
  __asm__ volatile("xgetbv" : "=a"(xcr0_lo), "=d"(xcr0_hi) : "c"(0));
  if ((xcr0_lo & 0xe6) != 0xe6) return false;
  unsigned eax, ebx, ecx, edx;
  __cpuid_count(7, 0, eax, ebx, ecx, edx);
  const bool f = ebx & (1u << 16), dq = ebx & (1u << 17), bw = ebx & (1u << 30), vl = ebx & (1u << 31);
  const bool vnni = ecx & (1u << 11);
  return f && dq && bw && vl && vnni;
#else
  return false;
#endif
}

// avx512 plus AVX512_BF16 (cpuid leaf 7 subleaf 1, EAX bit 5).
bool cpu_has_avx512_bf16() {
#if defined(__x86_64__) || defined(__i386__)
  if (!cpu_has_avx512_vnni()) return false;
  unsigned eax, ebx, ecx, edx;
  __cpuid_count(7, 0, eax, ebx, ecx, edx);
  if (eax < 1) return false;  // subleaf 1 not reported
  __cpuid_count(7, 1, eax, ebx, ecx, edx);
  return eax & (1u << 5);
#else
  return false;
#endif
}

// Why the amx path cannot run here ("" when it can): avx512 (whose kernels it
// reuses), AMX-TILE and AMX-INT8 in cpuid, the OS enabling the tile
// configuration and data state in XCR0 (bits 17, 18), and Linux granting this
// process the tile data state (arch_prctl ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA):
// without that permission the first tile instruction would kill the process.
std::string amx_missing() {
#if defined(__x86_64__)
  if (!cpu_has_avx512_vnni()) return "this CPU (or its OS) lacks the avx512 path's AVX512F, BW, VL, DQ or VNNI";
  unsigned eax, ebx, ecx, edx;
  __cpuid_count(7, 0, eax, ebx, ecx, edx);
  const bool tile = edx & (1u << 24), int8 = edx & (1u << 25);
  if (!tile || !int8) return "this CPU lacks AMX-TILE or AMX-INT8 (cpuid leaf 7, EDX bits 24/25)";
  unsigned xcr0_lo, xcr0_hi;
  __asm__ volatile("xgetbv" : "=a"(xcr0_lo), "=d"(xcr0_hi) : "c"(0));
  if ((xcr0_lo & (3u << 17)) != (3u << 17)) return "the OS does not enable the AMX tile state (XCR0 bits 17-18)";
#if defined(__linux__)
  constexpr long kArchReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
  if (syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) != 0)
    return "Linux refused this process the AMX tile data state (arch_prctl ARCH_REQ_XCOMP_PERM)";
  return "";
#else
  return "the AMX path requests its tile state from Linux; this OS is not supported";
#endif
#else
  return "not an x86-64 CPU";
#endif
}

std::atomic<const KernelTable*> g_active{nullptr};
std::once_flag g_env_once;

void choose_from_environment() {
  const char* env = std::getenv("SHORTRT_KERNELS");
  const char* name = (env && *env) ? env : "auto";
  const KernelTable* table;
  try {
    table = &kernels_by_name(name);
  } catch (const Error& e) {
    throw Error(std::string("SHORTRT_KERNELS: ") + e.what());
  }
  const KernelTable* expected = nullptr;
  g_active.compare_exchange_strong(expected, table);  // set_kernels() may have run first
}

}  // namespace

const char* weight_type_name(WeightType type) {
  switch (type) {
    case WeightType::F32: return "f32";
    case WeightType::BF16: return "bf16";
    case WeightType::Q8: return "q8";
    case WeightType::Q4: return "q4";
  }
  return "?";
}

uint16_t f32_to_f16(float x) {
  uint32_t u;
  std::memcpy(&u, &x, sizeof u);
  const uint16_t sign = static_cast<uint16_t>((u >> 16) & 0x8000u);
  const uint32_t mag = u & 0x7fffffffu;
  if (mag > 0x7f800000u) return sign | 0x7e00u | static_cast<uint16_t>((mag >> 13) & 0x3ffu);  // quiet NaN
  if (mag >= 0x477ff000u) return sign | 0x7c00u;  // >= 65520 rounds past 65504: infinity
  if (mag >= 0x38800000u) {                       // a normal half (>= 2^-14)
    uint32_t r = mag - 0x38000000u;               // exponent rebiased 127 -> 15, mantissa in place
    r += 0xfffu + ((r >> 13) & 1u);               // round the 13 dropped bits to nearest, ties to even
    return sign | static_cast<uint16_t>(r >> 13);
  }
  const uint32_t e = mag >> 23;
  if (e < 102) return sign;  // below 2^-25 (half the smallest subnormal; 2^-25 itself ties to 0)
  // A subnormal half: m * 2^(e-150) in units of 2^-24 is m >> (126 - e), rounded to nearest even.
  const uint32_t m = (mag & 0x7fffffu) | 0x800000u;
  const int shift = 126 - static_cast<int>(e);  // 14 .. 24
  uint32_t q = m >> shift;
  const uint32_t rest = m & ((1u << shift) - 1), half = 1u << (shift - 1);
  if (rest > half || (rest == half && (q & 1u))) ++q;  // may carry into the smallest normal: still right
  return sign | static_cast<uint16_t>(q);
}

size_t WeightMatrix::bytes() const {
  const size_t n = static_cast<size_t>(rows) * static_cast<size_t>(cols);
  switch (type) {
    case WeightType::F32: return n * sizeof(float);
    case WeightType::BF16: return n * sizeof(uint16_t);
    case WeightType::Q8: return n / kQ8Block * sizeof(BlockQ8);
    case WeightType::Q4: return static_cast<size_t>(q4_groups(rows) * (cols / kQ4Block)) * sizeof(BlockQ4x16);
  }
  return 0;
}

const KernelTable& reference_kernels() { return detail::reference_table(); }

const KernelTable* avx2_kernels() {
  static const bool supported = cpu_has_avx2_fma_f16c();
  return supported ? &detail::avx2_table() : nullptr;
}

const KernelTable* avx512_kernels() {
  static const bool supported = cpu_has_avx512_vnni();
  return supported ? &detail::avx512_table() : nullptr;
}

const KernelTable* avx512bf16_kernels() {
  static const bool supported = cpu_has_avx512_bf16();
  return supported ? &detail::avx512bf16_table() : nullptr;
}

namespace {
// The amx path's reason for not running, found once; when the CPU and the OS
// allow it, a self-check also holds its tiles to the avx512 kernel, bit for bit,
// on one small problem (edges in rows, blocks and tokens), so a machine whose
// tiles misbehave falls back to avx512 rather than compute garbage.
const std::string& amx_reason() {
  static const std::string reason = [] {
    std::string why = amx_missing();
    if (!why.empty()) return why;
    const int64_t rows = 21, n_blocks = 5, n_tok = 19;
    std::vector<BlockQ8> w(rows * n_blocks), x(n_tok * n_blocks);
    uint32_t state = 12345u;
    auto next = [&state] { state = state * 1664525u + 1013904223u; return state >> 8; };
    for (auto* blocks : {&w, &x})
      for (BlockQ8& b : *blocks) {
        b.scale = static_cast<float>(next() % 1000 + 1) * 1e-4f;
        for (int8_t& q : b.q) q = static_cast<int8_t>(static_cast<int>(next() % 255) - 127);
      }
    std::vector<float> a(rows * n_tok), b(rows * n_tok);
    detail::amx_table().gemm_q8(w.data(), rows, n_blocks, x.data(), n_tok, a.data(), rows);
    detail::avx512_table().gemm_q8(w.data(), rows, n_blocks, x.data(), n_tok, b.data(), rows);
    if (std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) != 0)
      return std::string("the AMX self-check failed: its int8 tiles did not reproduce the avx512 kernel bit for bit");
    return std::string();
  }();
  return reason;
}
}  // namespace

const KernelTable* amx_kernels() { return amx_reason().empty() ? &detail::amx_table() : nullptr; }

const char* amx_unavailable_reason() { return amx_reason().c_str(); }

void round_activation_bf16(const KernelTable& k, const float* x, int64_t n_tokens, int64_t cols, uint16_t* dst,
                           ThreadPool& pool) {
  if (!k.round_row_bf16) throw Error(std::string("kernel path '") + k.name + "' has no bf16 activation rounding");
  const int64_t grain = std::max<int64_t>(1, 8192 / std::max<int64_t>(cols, 1));
  pool.parallel_for(n_tokens, grain, [&](int64_t begin, int64_t end) {
    k.round_row_bf16(x + begin * cols, (end - begin) * cols, dst + begin * cols);
  });
}

const KernelTable& kernels_by_name(const char* name) {
  const std::string s = name ? name : "";
  if (s == "ref") return reference_kernels();
  if (s == "avx2") {
    if (const KernelTable* t = avx2_kernels()) return *t;
    throw Error("kernel path 'avx2' requested, but this CPU lacks AVX2, FMA or F16C; use 'ref' or 'auto'");
  }
  if (s == "avx512") {
    if (const KernelTable* t = avx512_kernels()) return *t;
    throw Error("kernel path 'avx512' requested, but this CPU (or its OS) lacks AVX512F, BW, VL, DQ or VNNI; "
                "use 'avx2', 'ref' or 'auto'");
  }
  if (s == "avx512bf16") {
    if (const KernelTable* t = avx512bf16_kernels()) return *t;
    throw Error("kernel path 'avx512bf16' requested, but this CPU lacks AVX512_BF16 (or the avx512 path's "
                "AVX512F, BW, VL, DQ or VNNI); use 'avx512', 'avx2', 'ref' or 'auto'");
  }
  if (s == "amx") {
    if (const KernelTable* t = amx_kernels()) return *t;
    throw Error("kernel path 'amx' requested, but " + amx_reason() + "; use 'avx512', 'avx2', 'ref' or 'auto'");
  }
  if (s == "auto") {
    // amx is opt-in: its tiles are 1/16 used (avx512's lane order) and its speed has
    // never been measured on an AMX machine, so auto does not bet on it.
    if (const KernelTable* t = avx512_kernels()) return *t;
    if (const KernelTable* t = avx2_kernels()) return *t;
    return reference_kernels();
  }
  throw Error("unknown kernel path '" + s + "' (expected 'ref', 'avx2', 'avx512', 'avx512bf16', 'amx' or 'auto')");
}

const KernelTable& kernels() {
  const KernelTable* table = g_active.load(std::memory_order_acquire);
  if (table) return *table;
  std::call_once(g_env_once, choose_from_environment);  // retried (and rethrows) while the env var is bad
  return *g_active.load(std::memory_order_acquire);
}

void set_kernels(const char* name) { g_active.store(&kernels_by_name(name), std::memory_order_release); }

// ---- packing --------------------------------------------------------------

void pack_bf16(const float* src, int64_t n, uint16_t* dst) {
  for (int64_t i = 0; i < n; ++i) {
    uint32_t u;
    std::memcpy(&u, &src[i], sizeof u);
    if ((u & 0x7fffffffu) > 0x7f800000u) {
      dst[i] = static_cast<uint16_t>((u >> 16) | 0x40);  // NaN: keep it a (quiet) NaN after truncation
    } else {
      u += 0x7fffu + ((u >> 16) & 1u);  // round to nearest, ties to even
      dst[i] = static_cast<uint16_t>(u >> 16);
    }
  }
}

void quantize_q8(const float* src, int64_t n, BlockQ8* dst) {
  if (n % kQ8Block != 0) throw Error("quantize_q8: length " + std::to_string(n) + " is not a multiple of 32");
  kernels().quantize_row_q8(src, n, dst);
}

void quantize_activation_q8(const float* x, int64_t n_tokens, int64_t cols, BlockQ8* dst, ThreadPool& pool) {
  if (cols % kQ8Block != 0)
    throw Error("quantize_activation_q8: cols " + std::to_string(cols) + " is not a multiple of 32");
  const KernelTable& k = kernels();
  const int64_t n_blocks = cols / kQ8Block;
  // One token of 576..1536 values is too little work to share; hand out several.
  const int64_t grain = std::max<int64_t>(1, 8192 / std::max<int64_t>(cols, 1));
  pool.parallel_for(n_tokens, grain, [&](int64_t begin, int64_t end) {
    k.quantize_row_q8(x + begin * cols, (end - begin) * cols, dst + begin * n_blocks);
  });
}

// ---- matmul ---------------------------------------------------------------

namespace {

// Decode: a thread takes rows in chunks of about 64 KB of weights, which makes
// the atomic hand-out negligible, but at least 4 chunks per thread, so the
// threads still balance on a small matrix.
constexpr size_t kDecodeChunkBytes = 64 * 1024;

int64_t decode_rows_per_chunk(const WeightMatrix& W, int n_threads) {
  const int64_t by_bytes = static_cast<int64_t>(kDecodeChunkBytes / std::max<size_t>(1, W.bytes() / W.rows));
  const int64_t by_balance = (W.rows + 4 * n_threads - 1) / (4 * n_threads);
  const int64_t rows = std::max<int64_t>(4, std::min(by_bytes, by_balance));
  // int4 rows come in interleaved groups of 16: a chunk starts on a group.
  return W.type == WeightType::Q4 ? (rows + kQ4Rows - 1) / kQ4Rows * kQ4Rows : rows;
}

// Prefill: a thread computes a (row block x token block) tile. 48 rows and 64
// tokens of 1536 floats (295 + 393 KB) stay in a 1 MB L2 while the micro-kernel
// walks a few rows x tokens at a time; 64 tokens are the engine's prompt chunk,
// so each weight is read from memory once per call (48-token blocks read it
// twice and measured 7-30% slower on avx2 and avx512). (With only a few
// tokens the kernels stream one row at a time instead.)
constexpr int64_t kPrefillRowBlock = 48;
constexpr int64_t kPrefillTokenBlock = 64;
static_assert(kPrefillRowBlock % kQ4Rows == 0, "prefill row blocks must start on an int4 row group");

// Everything a chunk needs, so the lambda captures one reference (no allocation).
struct MatmulJob {
  const KernelTable* k;
  const WeightMatrix* W;
  const Activation* x;
  int64_t n_tokens;
  float* y;
  int64_t ldy;

  void run(int64_t row0, int64_t n_rows, int64_t tok0, int64_t n_tok) const {
    const int64_t cols = W->cols;
    float* out = y + tok0 * ldy + row0;
    switch (W->type) {
      case WeightType::F32:
        k->gemm_f32(W->f32 + row0 * cols, n_rows, cols, x->f32 + tok0 * cols, n_tok, out, ldy);
        break;
      case WeightType::BF16:
        if (k->gemm_bf16_bf16)
          k->gemm_bf16_bf16(W->bf16 + row0 * cols, n_rows, cols, x->bf16 + tok0 * cols, n_tok, out, ldy);
        else
          k->gemm_bf16(W->bf16 + row0 * cols, n_rows, cols, x->f32 + tok0 * cols, n_tok, out, ldy);
        break;
      case WeightType::Q8: {
        const int64_t n_blocks = cols / kQ8Block;
        k->gemm_q8(W->q8 + row0 * n_blocks, n_rows, n_blocks, x->q8 + tok0 * n_blocks, n_tok, out, ldy);
        break;
      }
      case WeightType::Q4: {
        const int64_t n_blocks = cols / kQ4Block;
        k->gemm_q4(W->q4 + row0 / kQ4Rows * n_blocks, n_rows, n_blocks, x->q8 + tok0 * n_blocks, x->q8_sum + tok0 * n_blocks,
                   n_tok, out, ldy);
        break;
      }
    }
  }
};

// The message names the matrix; it is only built on failure, so a valid call
// allocates nothing.
[[noreturn]] void matmul_error(const WeightMatrix& W, const char* problem) {
  throw Error(std::string("matmul (") + weight_type_name(W.type) + " weight [" + std::to_string(W.rows) + ", " +
              std::to_string(W.cols) + "]): " + problem);
}

void check_matmul_args(const KernelTable& k, const WeightMatrix& W, const Activation& x, int64_t n_tokens,
                       const float* y, int64_t ldy) {
  if (W.rows < 0 || W.cols < 0 || n_tokens < 0) matmul_error(W, "negative size");
  if (n_tokens == 0 || W.rows == 0) return;
  if (n_tokens > 1 && ldy < W.rows) matmul_error(W, "output stride ldy is smaller than the row count");
  if (!y) matmul_error(W, "no output buffer");
  if (W.cols == 0) return;
  switch (W.type) {
    case WeightType::F32:
      if (!W.f32) matmul_error(W, "f32 data pointer is null");
      if (!x.f32) matmul_error(W, "no f32 activation");
      break;
    case WeightType::BF16:
      if (!W.bf16) matmul_error(W, "bf16 data pointer is null");
      if (k.gemm_bf16_bf16 && !x.bf16)
        matmul_error(W, "bf16 weights on this kernel path need the activation rounded to bf16 (Activation::bf16 is "
                        "null; round_activation_bf16 fills it)");
      if (!k.gemm_bf16_bf16 && !x.f32) matmul_error(W, "no f32 activation");
      break;
    case WeightType::Q8:
      if (!W.q8) matmul_error(W, "q8 data pointer is null");
      if (W.cols % kQ8Block != 0) matmul_error(W, "q8 needs cols to be a multiple of 32");
      if (!x.q8) matmul_error(W, "q8 weights need the activation quantized (Activation::q8 is null)");
      break;
    case WeightType::Q4:
      if (!W.q4) matmul_error(W, "q4 data pointer is null");
      if (W.cols % kQ4Block != 0) matmul_error(W, "q4 needs cols to be a multiple of 32");
      if (!x.q8 || !x.q8_sum)
        matmul_error(W, "q4 weights need the activation quantized with its block sums (Activation::q8 or q8_sum is null)");
      break;
  }
}

}  // namespace

void matmul(const KernelTable& k, const WeightMatrix& W, const Activation& x, int64_t n_tokens, float* y, int64_t ldy,
            ThreadPool& pool) {
  check_matmul_args(k, W, x, n_tokens, y, ldy);
  if (n_tokens == 0 || W.rows == 0) return;
  if (W.cols == 0) {
    for (int64_t t = 0; t < n_tokens; ++t) std::fill(y + t * ldy, y + t * ldy + W.rows, 0.0f);
    return;
  }
  const MatmulJob job{&k, &W, &x, n_tokens, y, ldy};
  if (n_tokens == 1) {
    pool.parallel_for(W.rows, decode_rows_per_chunk(W, pool.size()),
                      [&job](int64_t begin, int64_t end) { job.run(begin, end - begin, 0, 1); });
    return;
  }
  const int64_t n_row_blocks = (W.rows + kPrefillRowBlock - 1) / kPrefillRowBlock;
  const int64_t n_tok_blocks = (n_tokens + kPrefillTokenBlock - 1) / kPrefillTokenBlock;
  // Row blocks vary fastest: consecutive tiles share a token block, which stays in L2.
  pool.parallel_for(n_row_blocks * n_tok_blocks, 1, [&job, n_row_blocks](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t row0 = (i % n_row_blocks) * kPrefillRowBlock, tok0 = (i / n_row_blocks) * kPrefillTokenBlock;
      job.run(row0, std::min(kPrefillRowBlock, job.W->rows - row0), tok0,
              std::min(kPrefillTokenBlock, job.n_tokens - tok0));
    }
  });
}

void matmul(const WeightMatrix& W, const Activation& x, int64_t n_tokens, float* y, int64_t ldy, ThreadPool& pool) {
  matmul(kernels(), W, x, n_tokens, y, ldy, pool);
}

}  // namespace shortrt
