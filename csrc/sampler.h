// Choosing the next token from logits: greedy (temperature 0) or sampling
// with temperature, top-k and top-p (in that order, as transformers does).
//
// Temperatures below kMinSamplingTemperature (engine.h) are greedy: dividing
// by them overflows float (1 / 1e-40 is inf) or turns logits into +-inf, and
// the distribution is argmax in the limit anyway. For the same reason a draw
// where some scaled logit is NaN or +inf (or every one is -inf) is argmax.
#pragma once

#include <cstdint>
#include <random>
#include <utility>
#include <vector>

#include "shortrt/engine.h"

namespace shortrt {

struct SamplingParams {
  float temperature = 0.0f;  // 0 (or anything below kMinSamplingTemperature) = greedy
  int top_k = 0;             // 0 = all tokens
  float top_p = 1.0f;        // in (0, 1]
};

// Throws Error naming the parameter when it is out of range.
void validate(const SamplingParams& params);

class Sampler {
 public:
  explicit Sampler(int vocab);  // all scratch is allocated here, none per token

  // The chosen token; `rng` is the sequence's own generator, so a sequence
  // samples the same tokens whether it runs alone or in a batch.
  int sample(const float* logits, const SamplingParams& params, std::mt19937_64& rng);

  static int argmax(const float* logits, int vocab);  // lowest index among equal maxima

 private:
  int vocab_;
  std::vector<std::pair<float, int>> candidates_;  // (scaled logit, then probability; token)
};

}  // namespace shortrt
