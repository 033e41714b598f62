// shortrt::Engine: loads a checkpoint into a Model + State and generates.
#include <algorithm>
#include <atomic>
#include <chrono>
#include <mutex>
#include <random>
#include <string>
#include <thread>

#include "config.h"
#include "error.h"
#include "model.h"
#include "plan.h"
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
    plan = build_plan(dir, config.n_layers, o.skip_layers);
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

  // Runs the whole prompt of sequence `seq` from position 0, chunk by chunk;
  // false when `stop` said so before a chunk (the prompt is then not done).
  template <class Stop>
  bool prefill(int seq, const std::vector<int>& tokens, float* all_logits, int chunk, const Stop& stop) {
    const int n = static_cast<int>(tokens.size());
    if (chunk <= 0 || chunk > state->max_chunk) chunk = state->max_chunk;
    for (int begin = 0; begin < n; begin += chunk) {
      if (stop()) return false;
      int len = std::min(chunk, n - begin);
      float* out = all_logits ? all_logits + static_cast<size_t>(begin) * config.vocab : nullptr;
      model->forward(*state, pool, seq, tokens.data() + begin, len, begin, out);
    }
    return true;
  }

  EngineOptions options;
  ModelConfig config;
  ThreadPool pool;
  Sampler sampler;
  int max_seq = 0;
  LayerPlan plan;
  std::unique_ptr<Model> model;
  std::unique_ptr<State> state;

  // One generate/logits call at a time: they share State. `owner` is the thread
  // inside a call, so a call from that thread's callback fails instead of
  // waiting on itself. cancel() bumps `cancel_epoch`; a call started under an
  // older epoch stops.
  std::timed_mutex mutex;
  std::atomic<std::thread::id> owner{};
  std::atomic<uint64_t> cancel_epoch{0};
  class CallLock;
};

// Holds Impl::mutex for one call: refuses a re-entrant call from the owning
// thread, and while another thread's call runs, waits in short slices so that
// `stop` (Ctrl-C, cancel) is still polled.
class Engine::Impl::CallLock {
 public:
  template <class Stop>
  CallLock(Impl& m, const char* what, const Stop& stop) : m_(m) {
    if (m.owner.load() == std::this_thread::get_id())
      throw UsageError(std::string("Engine.") + what +
                       " called from inside this engine's own callback (the engine is busy with the call that "
                       "runs the callback); collect the tokens and call it after generate() returns");
    while (!m.mutex.try_lock_for(std::chrono::milliseconds(5)))
      if (stop()) return;
    m.owner.store(std::this_thread::get_id());
    locked_ = true;
  }
  ~CallLock() {
    if (!locked_) return;
    m_.owner.store(std::thread::id());
    m_.mutex.unlock();
  }
  bool locked() const { return locked_; }
  CallLock(const CallLock&) = delete;
  CallLock& operator=(const CallLock&) = delete;

 private:
  Impl& m_;
  bool locked_ = false;
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
  const uint64_t epoch = m.cancel_epoch.load();
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
  // Checked before every forward pass: cancel() since this call began, or the caller's poll.
  auto should_stop = [&] {
    return m.cancel_epoch.load(std::memory_order_relaxed) != epoch || (o.should_stop && o.should_stop());
  };

  const int n_seq = static_cast<int>(prompts.size());
  std::vector<std::vector<int>> out(n_seq);
  Impl::CallLock lock(m, "generate", should_stop);
  if (!lock.locked() || o.max_new_tokens == 0) return out;
  std::vector<std::mt19937_64> rng(n_seq, std::mt19937_64(o.seed));  // one stream per sequence
  std::vector<int> next(n_seq), pos(n_seq);
  std::vector<bool> active(n_seq, true);
  for (auto& o_b : out) o_b.reserve(o.max_new_tokens);  // no reallocation while decoding
  for (int b = 0; b < n_seq; ++b) {
    if (!m.prefill(b, prompts[b], nullptr, 0, should_stop)) return out;
    pos[b] = static_cast<int>(prompts[b].size());
    next[b] = m.sampler.sample(m.state->logits.data(), sp, rng[b]);
  }
  // Each step decodes the active sequences one after another; each sequence's
  // arithmetic is exactly what it would be alone.
  for (int remaining = n_seq; remaining > 0;) {
    if (should_stop()) break;
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

std::vector<float> Engine::logits(const std::vector<int>& tokens, int chunk,
                                  const std::function<bool()>& should_stop) {
  Impl& m = *impl_;
  const uint64_t epoch = m.cancel_epoch.load();
  m.check_tokens(tokens, "the token list");
  if (tokens.size() > static_cast<size_t>(m.max_seq))
    throw Error(std::to_string(tokens.size()) + " tokens exceed the context of " + std::to_string(m.max_seq));
  if (chunk < 0) throw Error("chunk must be >= 0 (0 = default), got " + std::to_string(chunk));
  auto stop = [&] {
    return m.cancel_epoch.load(std::memory_order_relaxed) != epoch || (should_stop && should_stop());
  };
  std::vector<float> out;
  Impl::CallLock lock(m, "logits", stop);
  if (lock.locked()) {
    out.resize(tokens.size() * static_cast<size_t>(m.config.vocab));
    if (m.prefill(0, tokens, out.data(), chunk, stop)) return out;
  }
  throw UsageError("Engine.logits was stopped before it finished");
}

void Engine::cancel() { impl_->cancel_epoch.fetch_add(1); }

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
