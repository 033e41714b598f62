// shortrt::Engine: loads a checkpoint into a Model + State and generates.
#include <algorithm>
#include <atomic>
#include <chrono>
#include <deque>
#include <mutex>
#include <random>
#include <string>
#include <thread>

#include "error.h"
#include "model.h"
#include "contract.h"
#include "sampler.h"
#include "shortrt/engine.h"
#include "threadpool.h"
#include "weights.h"

namespace shortrt {
namespace {

constexpr int kDefaultPrefillChunk = 64;
constexpr int kDefaultMaxSeq = 2048;

WeightType weight_type_of(const std::string& dtype) {
  if (dtype == "fp32") return WeightType::F32;
  if (dtype == "bf16") return WeightType::BF16;
  if (dtype == "int8") return WeightType::Q8;
  if (dtype == "int4") return WeightType::Q4;
  throw Error("unknown dtype '" + dtype + "' (expected fp32, bf16, int8 or int4)");
}

// The LM head's dtype name: "same" is the layers' dtype; "auto" is int8 under int4 layers
// (measured: perplexity 1.0073x fp32's instead of 1.092x for 17% more bytes per token,
// benchmarks/results/int4_quality.md), else the layers' dtype.
std::string lm_head_dtype_of(const EngineOptions& o) {
  if (o.lm_head_dtype == "auto") return o.dtype == "int4" ? "int8" : o.dtype;
  if (o.lm_head_dtype == "same") return o.dtype;
  if (o.lm_head_dtype == "fp32" || o.lm_head_dtype == "bf16" || o.lm_head_dtype == "int8" ||
      o.lm_head_dtype == "int4")
    return o.lm_head_dtype;
  throw Error("unknown lm_head_dtype '" + o.lm_head_dtype + "' (expected auto, same, fp32, bf16, int8 or int4)");
}

// One request from submit() to its last event.
struct Request {
  uint64_t id = 0;
  std::vector<int> prompt;
  int max_new_tokens = 0;
  SamplingParams sampling;
  std::vector<int> stop;
  std::mt19937_64 rng;
  int region = -1;      // KV region while running
  int prefilled = 0;    // prompt tokens in the cache
  int generated = 0;    // output tokens so far
  int pending = -1;     // the last output token, fed to the next step
  std::atomic<bool> cancelled{false};
  // Phi-3's longrope past the original context (Impl::outgrow): output holds the tokens generated so far;
  // `folded` of them were moved into the prompt to be prefilled again with the long factors.
  bool long_rope = false;
  int folded = 0;
  std::vector<int> output;
};

}  // namespace

const char* finish_reason_name(FinishReason reason) {
  switch (reason) {
    case FinishReason::None: return "";
    case FinishReason::Stop: return "stop";
    case FinishReason::Length: return "length";
    case FinishReason::Cancelled: return "cancelled";
  }
  return "";
}

struct Engine::Impl {
  Impl(const std::string& dir, const EngineOptions& o)
      : options(o), config(load_config(dir)), pool(o.threads), sampler(config.vocab) {
    WeightType type = weight_type_of(o.dtype);
    lm_head_dtype = lm_head_dtype_of(o);
    max_seq = o.max_seq > 0 ? o.max_seq : std::min(config.max_position, kDefaultMaxSeq);
    if (max_seq > config.max_position)
      throw Error("max_seq " + std::to_string(max_seq) + " exceeds the model's max_position_embeddings " +
                  std::to_string(config.max_position));
    // Gemma 3's sliding layers attend through their window (Model, KvCache); other families' windows not yet.
    if (config.layer_sliding.empty() && config.sliding_window > 0 && max_seq > config.sliding_window)
      throw Error("max_seq " + std::to_string(max_seq) + " exceeds the sliding window of " +
                  std::to_string(config.sliding_window) + " (sliding-window attention is not implemented)");
    prefill_chunk = std::min(o.prefill_chunk > 0 ? o.prefill_chunk : kDefaultPrefillChunk, max_seq);
    const int least = o.max_batch + prefill_chunk;
    step_tokens = o.step_tokens > 0 ? o.step_tokens : least;
    if (step_tokens < least)
      throw Error("step_tokens " + std::to_string(step_tokens) + " is less than max_batch + prefill_chunk = " +
                  std::to_string(least) + " (a prompt chunk must fit beside every decoding sequence)");
    plan = build_plan(dir, config, o.skip_layers);
    model = std::make_unique<Model>(config, load_weights(dir, config, plan, type, weight_type_of(lm_head_dtype)), plan.n_kv_slots, max_seq);
    std::vector<char> slot_sliding;
    if (!config.layer_sliding.empty())
      for (const PlannedLayer& p : plan.layers)
        if (p.attention) slot_sliding.push_back(config.layer_sliding[p.index]);
    state = std::make_unique<State>(config, plan.n_kv_slots, max_seq, o.max_batch, step_tokens,
                                    kv_type_of(o.kv_dtype), slot_sliding);
    running.resize(o.max_batch);
    for (int r = o.max_batch - 1; r >= 0; --r) free_regions.push_back(r);
    tokens.resize(step_tokens);
    segments.resize(o.max_batch);
    members.resize(o.max_batch);
    undelivered.reserve(4 * static_cast<size_t>(o.max_batch));
  }

  void check_tokens(const std::vector<int>& ids, const std::string& what) const {
    if (ids.empty()) throw Error(what + " is empty");
    for (size_t j = 0; j < ids.size(); ++j)
      if (ids[j] < 0 || ids[j] >= config.vocab)
        throw Error("token id " + std::to_string(ids[j]) + " at position " + std::to_string(j) + " of " + what +
                    " is outside the vocabulary of " + std::to_string(config.vocab));
  }

  void check_request(const std::vector<int>& prompt, const GenerationOptions& o, const std::string& what) const {
    validate(SamplingParams{o.temperature, o.top_k, o.top_p});
    if (o.max_new_tokens < 0) throw Error("max_new_tokens must be >= 0, got " + std::to_string(o.max_new_tokens));
    check_tokens(prompt, what);
    if (prompt.size() + static_cast<size_t>(o.max_new_tokens) > static_cast<size_t>(max_seq))
      throw Error("prompt of " + std::to_string(prompt.size()) + " tokens + " + std::to_string(o.max_new_tokens) +
                  " new tokens exceeds the context of " + std::to_string(max_seq));
  }

  // Call with queue_mutex held.
  uint64_t enqueue(const std::vector<int>& prompt, const GenerationOptions& o) {
    auto r = std::make_unique<Request>();
    r->id = next_id++;
    r->prompt = prompt;
    r->max_new_tokens = o.max_new_tokens;
    r->sampling = SamplingParams{o.temperature, o.top_k, o.top_p};
    r->stop = o.use_default_stop ? config.eos_token_ids : o.stop_tokens;
    r->rng.seed(o.seed);
    const uint64_t id = r->id;
    if (model->has_long_rope()) {
      r->long_rope = long_rope_for(prompt.size());
      r->output.reserve(static_cast<size_t>(o.max_new_tokens));
    }
    if (r->max_new_tokens == 0) {
      undelivered.push_back({id, -1, FinishReason::Length});
      ++requests_finished;
    } else {
      queued.push_back(std::move(r));
    }
    return id;
  }

  // Phi-3's longrope: transformers picks the short factors for a forward over at most
  // original_max_position_embeddings tokens and the long ones beyond, for every position. A sequence of n
  // tokens therefore runs with the long factors from the start when n is past that context.
  bool long_rope_for(size_t n) const {
    return model->has_long_rope() && n > static_cast<size_t>(config.rope_original_max_position);
  }

  // Call with queue_mutex held. A decoding longrope request whose next token would take it past the original
  // context: every cached key and value was computed with the short factors, and transformers' forward over
  // the longer sequence recomputes them all with the long ones. So the request becomes a prompt of all its
  // tokens (the pending one included), prefilled again from position 0 with the long factors; its last
  // chunk's logits give the next token. Once per request, at the cost of one prefill of that length.
  void outgrow(Request* r) {
    r->prompt.insert(r->prompt.end(), r->output.begin() + r->folded, r->output.end());
    r->folded = r->generated;
    r->prefilled = 0;
    r->pending = -1;
    r->long_rope = true;
  }

  // Call with queue_mutex held: frees the region of running request `r` at once.
  void release(int region, FinishReason why, int token) {
    Request* r = running[region].get();
    undelivered.push_back({r->id, token, why});
    ++requests_finished;
    running[region].reset();
    free_regions.push_back(region);
  }

  // Call with queue_mutex held, between steps: cancelled requests out, queued ones into free regions.
  void admit() {
    for (int g = 0; g < static_cast<int>(running.size()); ++g)
      if (running[g] && running[g]->cancelled) release(g, FinishReason::Cancelled, -1);
    while (!queued.empty() && !free_regions.empty()) {
      const int g = free_regions.back();
      free_regions.pop_back();
      queued.front()->region = g;
      running[g] = std::move(queued.front());
      queued.pop_front();
      order.push_back(running[g]->id);
    }
  }

  // One step; its events are appended to `events` (a buffer the caller reuses, so a
  // decode loop allocates nothing per token).
  void step(std::vector<RequestEvent>& events) {
    std::lock_guard<std::mutex> step_lock(step_mutex);
    int n_rows = 0, n_segs = 0;
    {
      std::lock_guard<std::mutex> lock(queue_mutex);
      admit();
      // Decode rows first (one per decoding request), then whole prefill chunks in
      // arrival order while they fit: a prompt's chunks never depend on the others.
      for (int g = 0; g < static_cast<int>(running.size()); ++g) {
        Request* r = running[g].get();
        if (!r || r->pending < 0) continue;
        const int pos = static_cast<int>(r->prompt.size()) + r->generated - r->folded - 1;
        if (!r->long_rope && long_rope_for(static_cast<size_t>(pos) + 1)) {
          outgrow(r);  // prefilled again below, from position 0
          continue;
        }
        tokens[n_rows] = r->pending;
        segments[n_segs] = Segment{g, pos, n_rows, 1, true, r->long_rope};
        members[n_segs++] = r;
        ++n_rows;
      }
      for (uint64_t id : order) {
        Request* r = nullptr;
        for (auto& slot : running)
          if (slot && slot->id == id) r = slot.get();
        if (!r || r->pending >= 0) continue;
        const int n = std::min(prefill_chunk, static_cast<int>(r->prompt.size()) - r->prefilled);
        if (n_rows + n > step_tokens) break;
        std::copy(r->prompt.begin() + r->prefilled, r->prompt.begin() + r->prefilled + n, tokens.begin() + n_rows);
        const bool last = r->prefilled + n == static_cast<int>(r->prompt.size());
        segments[n_segs] = Segment{r->region, r->prefilled, n_rows, n, last, r->long_rope};
        members[n_segs++] = r;
        n_rows += n;
      }
      in_step = n_segs > 0;
    }
    if (n_segs > 0) {
      try {
        model->forward_step(*state, pool, tokens.data(), segments.data(), n_segs);
      } catch (...) {
        std::lock_guard<std::mutex> lock(queue_mutex);
        in_step = false;
        throw;
      }
      ++steps;
      std::lock_guard<std::mutex> lock(queue_mutex);
      in_step = false;
      int logit_row = 0;
      for (int i = 0; i < n_segs; ++i) {
        Request* r = members[i];
        const Segment& g = segments[i];
        if (r->pending < 0) r->prefilled += g.n;
        if (!g.logits) continue;
        const float* logits = state->logits.data() + static_cast<size_t>(logit_row++) * config.vocab;
        if (r->cancelled) continue;  // released below
        const int token = sampler.sample(logits, r->sampling, r->rng);
        if (std::find(r->stop.begin(), r->stop.end(), token) != r->stop.end()) {
          release(g.seq, FinishReason::Stop, -1);
          continue;
        }
        ++r->generated;
        ++tokens_generated;
        if (model->has_long_rope()) r->output.push_back(token);  // reserved: no allocation
        if (r->generated >= r->max_new_tokens) {
          release(g.seq, FinishReason::Length, token);
          continue;
        }
        r->pending = token;
        events.push_back({r->id, token, FinishReason::None});
      }
      for (int g = 0; g < static_cast<int>(running.size()); ++g)
        if (running[g] && running[g]->cancelled) release(g, FinishReason::Cancelled, -1);
      order.erase(std::remove_if(order.begin(), order.end(),
                                 [&](uint64_t id) {
                                   for (auto& slot : running)
                                     if (slot && slot->id == id) return false;
                                   return true;
                                 }),
                  order.end());
    }
    std::lock_guard<std::mutex> lock(queue_mutex);
    // Finishing events (released above, or by cancel/submit between steps) go after the
    // running ones of this step; per request they are its last event.
    events.insert(events.end(), undelivered.begin(), undelivered.end());
    undelivered.clear();
  }

  void cancel(uint64_t id) {
    std::lock_guard<std::mutex> lock(queue_mutex);
    for (auto it = queued.begin(); it != queued.end(); ++it) {
      if ((*it)->id == id) {
        undelivered.push_back({id, -1, FinishReason::Cancelled});
        ++requests_finished;
        queued.erase(it);
        return;
      }
    }
    for (int g = 0; g < static_cast<int>(running.size()); ++g) {
      if (running[g] && running[g]->id == id) {
        running[g]->cancelled = true;
        if (!in_step) release(g, FinishReason::Cancelled, -1);  // else the step in flight frees it
        return;
      }
    }
  }

  EngineOptions options;
  std::string lm_head_dtype;  // resolved ("same" and "auto" replaced by a dtype)
  ModelConfig config;
  ThreadPool pool;
  Sampler sampler;
  int max_seq = 0, prefill_chunk = 0, step_tokens = 0;
  LayerPlan plan;
  std::unique_ptr<Model> model;
  std::unique_ptr<State> state;

  // One generate/logits call at a time. `owner` is the thread inside a call, so a
  // call from that thread's callback fails instead of waiting on itself. cancel()
  // bumps `cancel_epoch`; a call started under an older epoch stops.
  std::timed_mutex call_mutex;
  std::atomic<std::thread::id> owner{};
  std::atomic<uint64_t> cancel_epoch{0};
  class CallLock;

  // Requests. queue_mutex guards everything below; step_mutex makes steps one at a time.
  mutable std::mutex queue_mutex;
  std::mutex step_mutex;
  uint64_t next_id = 1;
  std::deque<std::unique_ptr<Request>> queued;
  std::vector<std::unique_ptr<Request>> running;  // [max_batch], by KV region
  std::vector<int> free_regions;
  std::vector<uint64_t> order;                    // running requests in arrival order
  std::vector<RequestEvent> undelivered;          // events not yet returned by step() (last ones, mostly)
  bool in_step = false;                           // a forward pass is using the running requests
  uint64_t tokens_generated = 0, requests_finished = 0, steps = 0;
  // Step scratch, sized once.
  std::vector<int> tokens;
  std::vector<Segment> segments;
  std::vector<Request*> members;
};

// Holds Impl::call_mutex for one generate/logits call: refuses a re-entrant call
// from the owning thread, and while another thread's call runs, waits in short
// slices so that `stop` (Ctrl-C, cancel) is still polled.
class Engine::Impl::CallLock {
 public:
  template <class Stop>
  CallLock(Impl& m, const char* what, const Stop& stop) : m_(m) {
    if (m.owner.load() == std::this_thread::get_id())
      throw UsageError(std::string("Engine.") + what +
                       " called from inside this engine's own callback (the engine is busy with the call that "
                       "runs the callback); collect the tokens and call it after generate() returns");
    while (!m.call_mutex.try_lock_for(std::chrono::milliseconds(5)))
      if (stop()) return;
    m.owner.store(std::this_thread::get_id());
    locked_ = true;
  }
  ~CallLock() {
    if (!locked_) return;
    m_.owner.store(std::thread::id());
    m_.call_mutex.unlock();
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
  kv_type_of(options.kv_dtype);
  lm_head_dtype_of(options);
  if (options.threads < 0) throw Error("threads must be >= 0 (0 = all cores), got " + std::to_string(options.threads));
  if (options.max_seq < 0) throw Error("max_seq must be >= 0 (0 = default), got " + std::to_string(options.max_seq));
  if (options.max_batch < 1) throw Error("max_batch must be >= 1, got " + std::to_string(options.max_batch));
  if (options.prefill_chunk < 0)
    throw Error("prefill_chunk must be >= 0 (0 = default), got " + std::to_string(options.prefill_chunk));
  if (options.step_tokens < 0)
    throw Error("step_tokens must be >= 0 (0 = default), got " + std::to_string(options.step_tokens));
  return std::unique_ptr<Engine>(new Engine(std::make_unique<Impl>(dir, options)));
}

Engine::Engine(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
Engine::~Engine() = default;

uint64_t Engine::submit(const std::vector<int>& prompt, const GenerationOptions& options) {
  Impl& m = *impl_;
  m.check_request(prompt, options, "the prompt");
  std::lock_guard<std::mutex> lock(m.queue_mutex);
  return m.enqueue(prompt, options);
}

void Engine::cancel(uint64_t request) { impl_->cancel(request); }

std::vector<RequestEvent> Engine::step() {
  std::vector<RequestEvent> events;
  impl_->step(events);
  return events;
}

bool Engine::has_work() const {
  std::lock_guard<std::mutex> lock(impl_->queue_mutex);
  if (!impl_->queued.empty() || !impl_->undelivered.empty()) return true;
  for (const auto& r : impl_->running)
    if (r) return true;
  return false;
}

EngineStats Engine::stats() const {
  const Impl& m = *impl_;
  std::lock_guard<std::mutex> lock(m.queue_mutex);
  EngineStats s;
  for (const auto& r : m.running)
    if (r) ++s.running;
  s.queued = static_cast<int>(m.queued.size());
  s.max_batch = m.state->max_batch;
  s.kv_bytes = m.state->kv_bytes;
  s.kv_bytes_used = m.state->kv_bytes / m.state->max_batch * s.running;
  s.tokens_generated = m.tokens_generated;
  s.requests_finished = m.requests_finished;
  s.steps = m.steps;
  return s;
}

int Engine::prefill_chunk() const { return impl_->prefill_chunk; }
int Engine::step_tokens() const { return impl_->step_tokens; }

std::vector<std::vector<int>> Engine::generate(const std::vector<std::vector<int>>& prompts,
                                               const GenerationOptions& o, const TokenCallback& on_token) {
  Impl& m = *impl_;
  if (prompts.empty()) throw Error("no prompts given");
  if (static_cast<int>(prompts.size()) > m.state->max_batch)
    throw Error(std::to_string(prompts.size()) + " prompts exceed the engine's max_batch of " +
                std::to_string(m.state->max_batch));
  for (size_t i = 0; i < prompts.size(); ++i)  // every prompt is checked before any is submitted
    m.check_request(prompts[i], o, prompts.size() == 1 ? "the prompt" : "prompt " + std::to_string(i));
  const uint64_t epoch = m.cancel_epoch.load();
  // Checked before every step: cancel() since this call began, or the caller's poll.
  auto should_stop = [&] {
    return m.cancel_epoch.load(std::memory_order_relaxed) != epoch || (o.should_stop && o.should_stop());
  };
  const int n_seq = static_cast<int>(prompts.size());
  std::vector<std::vector<int>> out(n_seq);
  Impl::CallLock lock(m, "generate", should_stop);
  if (!lock.locked() || o.max_new_tokens == 0) return out;
  std::vector<uint64_t> ids(n_seq);
  {
    std::lock_guard<std::mutex> lock(m.queue_mutex);
    for (int b = 0; b < n_seq; ++b) ids[b] = m.enqueue(prompts[b], o);
  }
  for (auto& o_b : out) o_b.reserve(o.max_new_tokens);  // no reallocation while decoding
  std::vector<bool> done(n_seq, false);
  int remaining = n_seq;
  // Events of requests submitted by others while this loop steps are kept for their own step() caller.
  std::vector<RequestEvent> foreign, events;
  events.reserve(4 * static_cast<size_t>(m.state->max_batch));
  try {
    while (remaining > 0 && !should_stop()) {
      events.clear();
      m.step(events);
      for (const RequestEvent& e : events) {
        auto it = std::find(ids.begin(), ids.end(), e.request);
        if (it == ids.end()) {
          foreign.push_back(e);
          continue;
        }
        const int b = static_cast<int>(it - ids.begin());
        if (done[b]) continue;
        if (e.token >= 0) {
          out[b].push_back(e.token);
          if (on_token && !on_token(b, e.token) && e.finish == FinishReason::None) {
            m.cancel(e.request);  // the callback stopped it: its token is kept
            done[b] = true;
            --remaining;
            continue;
          }
        }
        if (e.finish != FinishReason::None) {
          done[b] = true;
          --remaining;
        }
      }
    }
  } catch (...) {
    for (int b = 0; b < n_seq; ++b)
      if (!done[b]) m.cancel(ids[b]);
    throw;
  }
  for (int b = 0; b < n_seq; ++b)  // stopped early: the rest of its requests end now
    if (!done[b]) m.cancel(ids[b]);
  std::lock_guard<std::mutex> queue_lock(m.queue_mutex);
  // This call's requests are over: drop what is left of theirs (the Cancelled event of one its
  // callback stopped), give back the others'.
  auto ours = [&](const RequestEvent& e) { return std::find(ids.begin(), ids.end(), e.request) != ids.end(); };
  m.undelivered.erase(std::remove_if(m.undelivered.begin(), m.undelivered.end(), ours), m.undelivered.end());
  m.undelivered.insert(m.undelivered.begin(), foreign.begin(), foreign.end());
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
  Impl::CallLock lock(m, "logits", stop);
  if (!lock.locked()) throw UsageError("Engine.logits was stopped before it finished");
  std::lock_guard<std::mutex> step_lock(m.step_mutex);
  int region = -1;
  {
    std::lock_guard<std::mutex> queue_lock(m.queue_mutex);
    if (m.free_regions.empty()) throw Error("logits() needs a free KV region; every one is running a request");
    region = m.free_regions.back();
  }
  std::vector<float> out(tokens.size() * static_cast<size_t>(m.config.vocab));
  const int n = static_cast<int>(tokens.size());
  if (chunk == 0 || chunk > m.state->max_chunk) chunk = m.state->max_chunk;
  for (int begin = 0; begin < n; begin += chunk) {
    if (stop()) throw UsageError("Engine.logits was stopped before it finished");
    const int len = std::min(chunk, n - begin);
    // longrope: transformers' forward over all the tokens, so the long factors for every chunk when they are
    // past the original context.
    m.model->forward_all_logits(*m.state, m.pool, region, tokens.data() + begin, len, begin,
                                out.data() + static_cast<size_t>(begin) * m.config.vocab, m.long_rope_for(tokens.size()));
  }
  return out;
}

void Engine::cancel() {
  Impl& m = *impl_;
  m.cancel_epoch.fetch_add(1);
  std::vector<uint64_t> all;
  {
    std::lock_guard<std::mutex> lock(m.queue_mutex);
    for (const auto& r : m.queued) all.push_back(r->id);
    for (const auto& r : m.running)
      if (r) all.push_back(r->id);
  }
  for (uint64_t id : all) m.cancel(id);
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
const std::string& Engine::kv_dtype() const { return impl_->options.kv_dtype; }
const std::string& Engine::lm_head_dtype() const { return impl_->lm_head_dtype; }

}  // namespace shortrt
