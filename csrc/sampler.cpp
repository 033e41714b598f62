#include "sampler.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <string>

#include "error.h"

namespace shortrt {

void validate(const SamplingParams& p) {
  if (!(p.temperature >= 0.0f) || !std::isfinite(p.temperature))
    throw Error("temperature must be a finite number >= 0, got " + std::to_string(p.temperature));
  if (p.top_k < 0) throw Error("top_k must be >= 0 (0 disables it), got " + std::to_string(p.top_k));
  if (!(p.top_p > 0.0f && p.top_p <= 1.0f))
    throw Error("top_p must be in (0, 1], got " + std::to_string(p.top_p));
}

Sampler::Sampler(int vocab) : vocab_(vocab) { candidates_.reserve(vocab); }

int Sampler::argmax(const float* logits, int vocab) {
  int best = 0;
  for (int i = 1; i < vocab; ++i)
    if (logits[i] > logits[best]) best = i;
  return best;
}

int Sampler::sample(const float* logits, const SamplingParams& p, std::mt19937_64& rng) {
  if (p.temperature < kMinSamplingTemperature) return argmax(logits, vocab_);

  auto by_logit_desc = [](const std::pair<float, int>& a, const std::pair<float, int>& b) {
    return a.first > b.first || (a.first == b.first && a.second < b.second);
  };
  candidates_.clear();
  const float inv_t = 1.0f / p.temperature;
  bool computable = true;  // no NaN or +inf: those break the sort's ordering and the exp below
  for (int i = 0; i < vocab_; ++i) {
    const float scaled = logits[i] * inv_t;
    computable &= !(std::isnan(scaled) || scaled == std::numeric_limits<float>::infinity());
    candidates_.emplace_back(scaled, i);
  }
  if (!computable) return argmax(logits, vocab_);  // logits / temperature overflowed (the greedy limit)
  if (p.top_k > 0 && p.top_k < vocab_) {
    std::nth_element(candidates_.begin(), candidates_.begin() + p.top_k, candidates_.end(), by_logit_desc);
    candidates_.resize(p.top_k);
  }
  // Sorted so that top-p keeps a prefix and the draw is independent of nth_element's order.
  std::sort(candidates_.begin(), candidates_.end(), by_logit_desc);

  const float max_logit = candidates_.front().first;
  if (max_logit == -std::numeric_limits<float>::infinity()) return argmax(logits, vocab_);  // all masked
  double total = 0.0;
  for (auto& c : candidates_) {
    c.first = std::exp(c.first - max_logit);
    total += c.first;
  }
  size_t keep = candidates_.size();
  if (p.top_p < 1.0f) {
    // Smallest prefix whose probability mass reaches top_p.
    double cumulative = 0.0;
    for (size_t i = 0; i < candidates_.size(); ++i) {
      cumulative += candidates_[i].first / total;
      if (cumulative >= p.top_p) {
        keep = i + 1;
        break;
      }
    }
    total = 0.0;
    for (size_t i = 0; i < keep; ++i) total += candidates_[i].first;
  }

  const double u = static_cast<double>(rng() >> 11) * 0x1.0p-53 * total;  // uniform in [0, total)
  double cumulative = 0.0;
  for (size_t i = 0; i < keep; ++i) {
    cumulative += candidates_[i].first;
    if (u < cumulative) return candidates_[i].second;
  }
  return candidates_[keep - 1].second;  // rounding left u at the very top
}

}  // namespace shortrt
