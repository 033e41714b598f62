// shortrt::Engine: loads a checkpoint into a Model + State and generates.
#include <algorithm>
#include <mutex>
#include <random>
#include <string>

#include "error.h"
#include "model.h"
#include "contract.h"
#include "sampler.h"
#include "shortrt/engine.h"
#include "threadpool.h"
#include "weights.h"

namespace shortrt {
namespace {

constexpr int kMaxChunk = 512;  // prefill runs in chunks of at most this many tokens (bounds the scratch)
constexpr int kDefaultMaxSeq = 2048;

WeightType weight_type_of(const std::string& dtype) {
  if (dtype == "fp32") return WeightType::F32;
  if (dtype == "bf16") return WeightType::BF16;
  if (dtype == "int8") return WeightType::Q8;
  throw Error("unknown dtype '" + dtype + "' (expected fp32, bf16 or int8)");
}

}  // namespace

struct Engine::Impl {
  Impl(const std::string& dir, const EngineOptions& o)
      : options(o), config(load_config(dir)), pool(o.threads), sampler(config.vocab) {
    WeightType type = weight_type_of(o.dtype);
    max_seq = o.max_seq > 0 ? o.max_seq : std::min(config.max_position, kDefaultMaxSeq);
    if (max_seq > config.max_position)
      throw Error("max_seq " + std::to_string(max_seq) + " exceeds the model's max_position_embeddings " +
                  std::to_string(config.max_position));
    if (config.sliding_window > 0 && max_seq > config.sliding_window)
      throw Error("max_seq " + std::to_string(max_seq) + " exceeds the sliding window of " +
                  std::to_string(config.sliding_window) + " (sliding-window attention is not implemented)");
    plan = build_plan(dir, config, o.skip_layers);
    model = std::make_unique<Model>(config, load_weights(dir, config, plan, type), plan.n_kv_slots, max_seq);
    state = std::make_unique<State>(config, plan.n_kv_slots, max_seq, o.max_batch, std::min(kMaxChunk, max_seq));
  }

  void check_tokens(const std::vector<int>& tokens, const std::string& what) const {
    if (tokens.empty()) throw Error(what + " is empty");
    for (size_t j = 0; j < tokens.size(); ++j)
      if (tokens[j] < 0 || tokens[j] >= config.vocab)
        throw Error("token id " + std::to_string(tokens[j]) + " at position " + std::to_string(j) + " of " + what +
                    " is outside the vocabulary of " + std::to_string(config.vocab));
  }

  // Runs the whole prompt of sequence `seq` from position 0, chunk by chunk.
  void prefill(int seq, const std::vector<int>& tokens, float* all_logits, int chunk = 0) {
    const int n = static_cast<int>(tokens.size());
    if (chunk <= 0 || chunk > state->max_chunk) chunk = state->max_chunk;
    for (int begin = 0; begin < n; begin += chunk) {
      int len = std::min(chunk, n - begin);
      float* out = all_logits ? all_logits + static_cast<size_t>(begin) * config.vocab : nullptr;
      model->forward(*state, pool, seq, tokens.data() + begin, len, begin, out);
    }
  }

  EngineOptions options;
  ModelConfig config;
  ThreadPool pool;
  Sampler sampler;
  int max_seq = 0;
  LayerPlan plan;
  std::unique_ptr<Model> model;
  std::unique_ptr<State> state;
  std::mutex mutex;  // one generate/logits call at a time: they share State
};

std::unique_ptr<Engine> Engine::load(const std::string& dir, const EngineOptions& options) {
  weight_type_of(options.dtype);
  if (options.threads < 0) throw Error("threads must be >= 0 (0 = all cores), got " + std::to_string(options.threads));
  if (options.max_seq < 0) throw Error("max_seq must be >= 0 (0 = default), got " + std::to_string(options.max_seq));
  if (options.max_batch < 1) throw Error("max_batch must be >= 1, got " + std::to_string(options.max_batch));
  return std::unique_ptr<Engine>(new Engine(std::make_unique<Impl>(dir, options)));
}

Engine::Engine(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
Engine::~Engine() = default;

std::vector<std::vector<int>> Engine::generate(const std::vector<std::vector<int>>& prompts,
                                               const GenerationOptions& o, const TokenCallback& on_token) {
  Impl& m = *impl_;
  SamplingParams sp{o.temperature, o.top_k, o.top_p};
  validate(sp);
  if (prompts.empty()) throw Error("no prompts given");
  if (static_cast<int>(prompts.size()) > m.state->max_batch)
    throw Error(std::to_string(prompts.size()) + " prompts exceed the engine's max_batch of " +
                std::to_string(m.state->max_batch));
  if (o.max_new_tokens < 0) throw Error("max_new_tokens must be >= 0, got " + std::to_string(o.max_new_tokens));
  for (size_t i = 0; i < prompts.size(); ++i) {
    m.check_tokens(prompts[i], prompts.size() == 1 ? "the prompt" : "prompt " + std::to_string(i));
    if (prompts[i].size() + static_cast<size_t>(o.max_new_tokens) > static_cast<size_t>(m.max_seq))
      throw Error("prompt of " + std::to_string(prompts[i].size()) + " tokens + " +
                  std::to_string(o.max_new_tokens) + " new tokens exceeds the context of " +
                  std::to_string(m.max_seq));
  }
  const std::vector<int>& stop = o.use_default_stop ? m.config.eos_token_ids : o.stop_tokens;
  auto is_stop = [&](int token) { return std::find(stop.begin(), stop.end(), token) != stop.end(); };

  std::lock_guard<std::mutex> lock(m.mutex);
  const int n_seq = static_cast<int>(prompts.size());
  std::vector<std::vector<int>> out(n_seq);
  if (o.max_new_tokens == 0) return out;
  std::vector<std::mt19937_64> rng(n_seq, std::mt19937_64(o.seed));  // one stream per sequence
  std::vector<int> next(n_seq), pos(n_seq);
  std::vector<bool> active(n_seq, true);
  for (auto& o_b : out) o_b.reserve(o.max_new_tokens);  // no reallocation while decoding
  for (int b = 0; b < n_seq; ++b) {
    m.prefill(b, prompts[b], nullptr);
    pos[b] = static_cast<int>(prompts[b].size());
    next[b] = m.sampler.sample(m.state->logits.data(), sp, rng[b]);
  }
  // Each step decodes the active sequences one after another; each sequence's
  // arithmetic is exactly what it would be alone.
  for (int remaining = n_seq; remaining > 0;) {
    for (int b = 0; b < n_seq; ++b) {
      if (!active[b]) continue;
      int token = next[b];
      bool go_on = !is_stop(token);
      if (go_on) {
        out[b].push_back(token);
        if (on_token && !on_token(b, token)) go_on = false;
        if (static_cast<int>(out[b].size()) >= o.max_new_tokens) go_on = false;
      }
      if (!go_on) {
        active[b] = false;
        --remaining;
        continue;
      }
      m.model->forward(*m.state, m.pool, b, &token, 1, pos[b]++);
      next[b] = m.sampler.sample(m.state->logits.data(), sp, rng[b]);
    }
  }
  return out;
}

std::vector<float> Engine::logits(const std::vector<int>& tokens, int chunk) {
  Impl& m = *impl_;
  m.check_tokens(tokens, "the token list");
  if (tokens.size() > static_cast<size_t>(m.max_seq))
    throw Error(std::to_string(tokens.size()) + " tokens exceed the context of " + std::to_string(m.max_seq));
  std::lock_guard<std::mutex> lock(m.mutex);
  std::vector<float> out(tokens.size() * static_cast<size_t>(m.config.vocab));
  if (chunk < 0) throw Error("chunk must be >= 0 (0 = default), got " + std::to_string(chunk));
  m.prefill(0, tokens, out.data(), chunk);
  return out;
}

const ModelConfig& Engine::config() const { return impl_->config; }
std::size_t Engine::kv_cache_bytes() const { return impl_->state->kv_bytes; }
std::size_t Engine::weight_bytes() const { return impl_->model->weights().bytes; }
std::size_t Engine::weight_bytes_per_token() const { return impl_->model->weights().bytes_per_token; }
int Engine::n_layers_run() const { return static_cast<int>(impl_->plan.layers.size()); }
int Engine::n_attention_layers() const { return impl_->plan.n_kv_slots; }
std::vector<int> Engine::layers_run() const {
  std::vector<int> idx;
  for (const PlannedLayer& l : impl_->plan.layers) idx.push_back(l.index);
  return idx;
}
int Engine::max_seq() const { return impl_->max_seq; }
int Engine::max_batch() const { return impl_->state->max_batch; }
int Engine::threads() const { return impl_->pool.size(); }
const std::string& Engine::dtype() const { return impl_->options.dtype; }

}  // namespace shortrt
