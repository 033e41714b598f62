#include "attention.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <string>

#include "error.h"
#include "kernels.h"

namespace shortrt {
namespace {

constexpr int kMaxHeadDim = 512;    // the online path keeps one output accumulator on the stack
constexpr int kKeyBlock = 64;       // keys scored per step of the online softmax
constexpr int kTokenBlock = 64;     // query tokens per step of the matmul path

}  // namespace

void AttentionScratch::Free::operator()(float* p) const { std::free(p); }

AttentionScratch::AttentionScratch(int max_seq, int n_heads, int n_kv_heads, int head_dim) {
  if (head_dim > kMaxHeadDim)
    throw Error("head_dim " + std::to_string(head_dim) + " exceeds the supported maximum of " +
                std::to_string(kMaxHeadDim));
  const size_t rows = static_cast<size_t>(kTokenBlock) * (n_heads / n_kv_heads);
  const size_t seq = max_seq, hd = head_dim;
  auto padded = [](size_t n) { return (n + 15) / 16 * 16; };  // keep each array 64-byte aligned
  const size_t sizes[] = {padded(seq * hd), padded(hd * seq), padded(rows * hd), padded(rows * seq),
                          padded(rows * hd)};
  size_t total = 0;
  for (size_t s : sizes) total += s;
  // Not zeroed: only the part a prompt uses is ever touched.
  storage.reset(static_cast<float*>(std::aligned_alloc(64, total * sizeof(float))));
  if (!storage) throw Error("out of memory allocating the attention scratch");
  float* p = storage.get();
  keys = p;
  values_t = p += sizes[0];
  queries = p += sizes[1];
  scores = p += sizes[2];
  out = p += sizes[3];
}

void attend_head_ref(const float* q, const float* keys, const float* values, int64_t stride, int64_t n_keys, int hd,
                     float scale, float* out) {
  float acc[kMaxHeadDim];
  float scores[kKeyBlock];
  std::fill(acc, acc + hd, 0.0f);
  float running_max = -std::numeric_limits<float>::infinity(), denom = 0.0f;
  for (int64_t j0 = 0; j0 < n_keys; j0 += kKeyBlock) {
    const int nb = static_cast<int>(std::min<int64_t>(kKeyBlock, n_keys - j0));
    float block_max = -std::numeric_limits<float>::infinity();
    for (int j = 0; j < nb; ++j) {
      const float* k = keys + (j0 + j) * stride;
      float dot = 0.0f;
      for (int i = 0; i < hd; ++i) dot += q[i] * k[i];
      scores[j] = dot * scale;
      block_max = std::max(block_max, scores[j]);
    }
    if (block_max > running_max) {  // rescale what was accumulated under the old maximum
      const float factor = std::exp(running_max - block_max);
      denom *= factor;
      for (int i = 0; i < hd; ++i) acc[i] *= factor;
      running_max = block_max;
    }
    for (int j = 0; j < nb; ++j) {
      const float p = std::exp(scores[j] - running_max);
      denom += p;
      const float* v = values + (j0 + j) * stride;
      for (int i = 0; i < hd; ++i) acc[i] += p * v[i];
    }
  }
  const float inv = 1.0f / denom;
  for (int i = 0; i < hd; ++i) out[i] = acc[i] * inv;
}

void attention_online(const AttentionArgs& a, ThreadPool& pool) {
  using AttendFn = void (*)(const float*, const float*, const float*, int64_t, int64_t, int, float, float*);
  // The AVX2 twin follows the kernel path choice (SHORTRT_KERNELS=ref forces the scalar one).
  const bool avx2 = std::strcmp(kernels().name, "avx2") == 0 && a.head_dim % 8 == 0;
  const AttendFn attend = avx2 ? detail::attend_head_avx2 : attend_head_ref;
  const int hd = a.head_dim, nh = a.n_heads, group = a.n_heads / a.n_kv_heads;
  const int64_t kv_width = static_cast<int64_t>(a.n_kv_heads) * hd;
  const float scale = 1.0f / std::sqrt(static_cast<float>(hd));
  pool.parallel_for(static_cast<int64_t>(a.n) * nh, 1, [&](int64_t b, int64_t e) {
    for (int64_t u = b; u < e; ++u) {
      const int64_t t = u / nh;
      const int h = static_cast<int>(u % nh);
      // causal: token t sees positions 0..pos+t
      attend(a.qkv + t * a.qkv_dim + h * hd, a.keys + (h / group) * hd, a.values + (h / group) * hd, kv_width,
             a.pos + t + 1, hd, scale, a.out + t * nh * hd + h * hd);
    }
  });
}

void attention_matmul(const AttentionArgs& a, AttentionScratch& s, ThreadPool& pool) {
  const KernelTable& k = kernels();
  const int hd = a.head_dim, group = a.n_heads / a.n_kv_heads;
  const int64_t kv_width = static_cast<int64_t>(a.n_kv_heads) * hd;
  const int64_t total_keys = a.pos + a.n;
  const float scale = 1.0f / std::sqrt(static_cast<float>(hd));

  for (int g = 0; g < a.n_kv_heads; ++g) {
    // This kv head's keys as a contiguous [keys][head_dim] matrix (a prefix serves every block).
    for (int64_t j = 0; j < total_keys; ++j)
      std::copy(a.keys + j * kv_width + g * hd, a.keys + j * kv_width + (g + 1) * hd, s.keys + j * hd);

    for (int t0 = 0; t0 < a.n; t0 += kTokenBlock) {
      const int nt = std::min(kTokenBlock, a.n - t0);
      const int64_t n_keys = a.pos + t0 + nt;  // the block's last token sees this many keys
      const int rows = nt * group;             // row r = (token t0 + r / group, head g*group + r % group)
      for (int r = 0; r < rows; ++r) {
        const float* q = a.qkv + (t0 + r / group) * a.qkv_dim + (g * group + r % group) * hd;
        for (int i = 0; i < hd; ++i) s.queries[r * hd + i] = q[i] * scale;
      }
      // V^T with row stride n_keys, as the second matmul's weight.
      for (int64_t j = 0; j < n_keys; ++j) {
        const float* v = a.values + j * kv_width + g * hd;
        for (int i = 0; i < hd; ++i) s.values_t[i * n_keys + j] = v[i];
      }

      WeightMatrix K;
      K.type = WeightType::F32;
      K.rows = n_keys;
      K.cols = hd;
      K.f32 = s.keys;
      matmul(K, Activation{s.queries, nullptr}, rows, s.scores, n_keys, pool);

      pool.parallel_for(rows, 8, [&](int64_t b, int64_t e) {
        for (int64_t r = b; r < e; ++r) {
          float* row = s.scores + r * n_keys;
          const int64_t visible = a.pos + t0 + r / group + 1;
          k.softmax_f32(row, visible);
          std::fill(row + visible, row + n_keys, 0.0f);  // causal mask
        }
      });

      WeightMatrix Vt;
      Vt.type = WeightType::F32;
      Vt.rows = hd;
      Vt.cols = n_keys;
      Vt.f32 = s.values_t;
      matmul(Vt, Activation{s.scores, nullptr}, rows, s.out, hd, pool);

      for (int r = 0; r < rows; ++r) {
        float* dst = a.out + static_cast<int64_t>(t0 + r / group) * a.n_heads * hd + (g * group + r % group) * hd;
        std::copy(s.out + r * hd, s.out + (r + 1) * hd, dst);
      }
    }
  }
}

}  // namespace shortrt
