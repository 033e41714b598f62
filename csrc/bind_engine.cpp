// Python binding of shortrt::Engine as shortrt._C.Engine (wrapped by shortrt/engine.py).
// Every call that computes releases the GIL; the per-token callback re-acquires
// it only for the duration of the Python call. shortrt::Error becomes
// shortrt._C.FormatError (a ValueError) via the translator in bind_safetensors.cpp.
#include <pybind11/functional.h>
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstring>
#include <optional>
#include <string>
#include <vector>

#include "attention.h"
#include "kernels.h"
#include "shortrt/engine.h"

namespace py = pybind11;
using shortrt::Engine;

namespace {

py::dict config_dict(const shortrt::ModelConfig& c) {
  py::dict d;
  d["architecture"] = c.architecture;
  d["hidden_size"] = c.hidden;
  d["intermediate_size"] = c.intermediate;
  d["num_hidden_layers"] = c.n_layers;
  d["num_attention_heads"] = c.n_heads;
  d["num_key_value_heads"] = c.n_kv_heads;
  d["head_dim"] = c.head_dim;
  d["vocab_size"] = c.vocab;
  d["max_position_embeddings"] = c.max_position;
  d["rms_norm_eps"] = c.rms_eps;
  d["rope_theta"] = c.rope_theta;
  d["rope_type"] = c.rope_type;
  d["tie_word_embeddings"] = c.tie_embeddings;
  d["eos_token_ids"] = c.eos_token_ids;
  return d;
}

std::unique_ptr<Engine> load(const std::string& path, const std::string& dtype, int threads, int max_seq,
                             int max_batch, const std::vector<int>& skip_layers, int prefill_chunk, int step_tokens) {
  shortrt::EngineOptions o;
  o.dtype = dtype;
  o.threads = threads;
  o.max_seq = max_seq;
  o.max_batch = max_batch;
  o.skip_layers = skip_layers;
  o.prefill_chunk = prefill_chunk;
  o.step_tokens = step_tokens;
  py::gil_scoped_release release;
  return Engine::load(path, o);
}

std::vector<std::vector<int>> generate(Engine& e, const std::vector<std::vector<int>>& prompts, int max_new_tokens,
                                       float temperature, int top_k, float top_p, uint64_t seed,
                                       std::optional<std::vector<int>> stop, py::object callback) {
  shortrt::GenerationOptions o;
  o.max_new_tokens = max_new_tokens;
  o.temperature = temperature;
  o.top_k = top_k;
  o.top_p = top_p;
  o.seed = seed;
  if (stop) {
    o.use_default_stop = false;
    o.stop_tokens = *stop;
  }
  shortrt::TokenCallback on_token;
  if (!callback.is_none()) {
    on_token = [&callback](int seq, int token) {
      py::gil_scoped_acquire acquire;
      py::object r = callback(seq, token);
      return r.is_none() || r.cast<bool>();  // None (no return) means: go on
    };
  }
  py::gil_scoped_release release;
  return e.generate(prompts, o, on_token);
}

uint64_t submit(Engine& e, const std::vector<int>& prompt, int max_new_tokens, float temperature, int top_k,
                float top_p, uint64_t seed, std::optional<std::vector<int>> stop) {
  shortrt::GenerationOptions o;
  o.max_new_tokens = max_new_tokens;
  o.temperature = temperature;
  o.top_k = top_k;
  o.top_p = top_p;
  o.seed = seed;
  if (stop) {
    o.use_default_stop = false;
    o.stop_tokens = *stop;
  }
  return e.submit(prompt, o);
}

// [(request, token, finish)] with finish None while the request runs.
py::list step(Engine& e) {
  std::vector<shortrt::RequestEvent> events;
  {
    py::gil_scoped_release release;
    events = e.step();
  }
  py::list out;
  for (const auto& ev : events) {
    py::object finish = py::none();
    if (ev.finish != shortrt::FinishReason::None) finish = py::str(shortrt::finish_reason_name(ev.finish));
    out.append(py::make_tuple(ev.request, ev.token, finish));
  }
  return out;
}

py::dict stats(const Engine& e) {
  const shortrt::EngineStats s = e.stats();
  py::dict d;
  d["running"] = s.running;
  d["queued"] = s.queued;
  d["max_batch"] = s.max_batch;
  d["kv_regions_used"] = s.running;
  d["kv_bytes"] = s.kv_bytes;
  d["kv_bytes_used"] = s.kv_bytes_used;
  d["tokens_generated"] = s.tokens_generated;
  d["requests_finished"] = s.requests_finished;
  d["steps"] = s.steps;
  return d;
}

py::array_t<float> logits(Engine& e, const std::vector<int>& tokens, int chunk) {
  std::vector<float> values;
  {
    py::gil_scoped_release release;
    values = e.logits(tokens, chunk);
  }
  const py::ssize_t vocab = e.config().vocab;
  py::array_t<float> out({static_cast<py::ssize_t>(tokens.size()), vocab});
  std::memcpy(out.mutable_data(), values.data(), values.size() * sizeof(float));
  return out;
}

bool attention_path(const std::string& path, int hd, const char* who) {
  if (path == "avx2") {
    if (!shortrt::avx2_kernels()) throw std::invalid_argument(std::string(who) + ": this CPU has no AVX2/FMA");
    if (hd % 8 != 0) throw std::invalid_argument(std::string(who) + ": the avx2 path needs head_dim % 8 == 0");
    return true;
  }
  if (path == "ref") return false;
  throw std::invalid_argument(std::string(who) + ": path must be 'ref' or 'avx2'");
}

// Test hook: the decode kernel on the "ref" or "avx2" path for one group of
// query heads q [group, hd] (or one head [hd]) sharing keys / values
// [n, stride >= hd]: softmax(scale * keys @ q_g) @ values for each head.
py::array_t<float> attend_head(py::array_t<float, py::array::c_style | py::array::forcecast> q,
                               py::array_t<float, py::array::c_style | py::array::forcecast> keys,
                               py::array_t<float, py::array::c_style | py::array::forcecast> values, float scale,
                               const std::string& path) {
  if (q.ndim() < 1 || q.ndim() > 2 || keys.ndim() != 2 || values.ndim() != 2 || keys.shape(0) != values.shape(0) ||
      keys.shape(1) != values.shape(1) || keys.shape(1) < q.shape(q.ndim() - 1) || keys.shape(0) < 1)
    throw std::invalid_argument("attend_head: q [hd] or [group, hd], keys and values [n, stride >= hd], n >= 1");
  const int hd = static_cast<int>(q.shape(q.ndim() - 1));
  const int group = q.ndim() == 2 ? static_cast<int>(q.shape(0)) : 1;
  if (hd > 512) throw std::invalid_argument("attend_head: head_dim > 512");
  if (group < 1 || group > shortrt::kMaxAttendGroup)
    throw std::invalid_argument("attend_head: group must be 1.." + std::to_string(shortrt::kMaxAttendGroup));
  const bool avx2 = attention_path(path, hd, "attend_head");
  std::vector<float> acc(static_cast<size_t>(group) * hd), m(group), l(group);
  (avx2 ? shortrt::detail::attend_partial_avx2 : shortrt::attend_partial_ref)(
      q.data(), group, keys.data(), values.data(), keys.shape(1), keys.shape(0), hd, scale, acc.data(), m.data(),
      l.data());
  py::array_t<float> out(q.request().shape);
  float* o = out.mutable_data();
  for (int g = 0; g < group; ++g) {
    const float inv = 1.0f / l[g];
    for (int i = 0; i < hd; ++i) o[g * hd + i] = acc[g * hd + i] * inv;
  }
  return out;
}

// Test hook: decode attention of one new token over the whole cache, as the
// engine runs it (key ranges as parallel work items, merged): q [n_heads, hd],
// keys / values [n_keys, n_kv_heads * hd] -> [n_heads, hd].
py::array_t<float> attention_decode(py::array_t<float, py::array::c_style | py::array::forcecast> q,
                                    py::array_t<float, py::array::c_style | py::array::forcecast> keys,
                                    py::array_t<float, py::array::c_style | py::array::forcecast> values,
                                    int n_kv_heads, const std::string& path, int threads) {
  if (q.ndim() != 2 || keys.ndim() != 2 || values.ndim() != 2 || keys.shape(0) != values.shape(0) ||
      keys.shape(1) != values.shape(1) || keys.shape(0) < 1 || n_kv_heads < 1 || q.shape(0) % n_kv_heads != 0 ||
      keys.shape(1) != n_kv_heads * q.shape(1))
    throw std::invalid_argument("attention_decode: q [n_heads, hd], keys and values [n, n_kv_heads * hd], "
                                "n_heads a multiple of n_kv_heads, n >= 1");
  const int hd = static_cast<int>(q.shape(1));
  if (hd > 512) throw std::invalid_argument("attention_decode: head_dim > 512");
  shortrt::AttentionArgs args;
  args.qkv = q.data();
  args.qkv_dim = q.shape(0) * hd;
  args.keys = keys.data();
  args.values = values.data();
  args.kv_row_stride = keys.shape(1);  // this hook takes [position][kv_head][head_dim]
  args.kv_head_stride = hd;
  args.n = 1;
  args.pos = static_cast<int>(keys.shape(0)) - 1;
  args.n_heads = static_cast<int>(q.shape(0));
  args.n_kv_heads = n_kv_heads;
  args.head_dim = hd;
  py::array_t<float> out({q.shape(0), q.shape(1)});
  args.out = out.mutable_data();
  const bool avx2 = attention_path(path, hd, "attention_decode");
  shortrt::ThreadPool pool(threads);
  shortrt::attention_decode(args, pool, avx2);
  return out;
}

}  // namespace

void register_engine(py::module_& m) {
  py::class_<Engine>(m, "Engine", "The C++ inference engine over one checkpoint directory.")
      .def(py::init(&load), py::arg("path"), py::arg("dtype") = "fp32", py::arg("threads") = 0,
           py::arg("max_seq") = 0, py::arg("max_batch") = 1, py::arg("skip_layers") = std::vector<int>{},
           py::arg("prefill_chunk") = 0, py::arg("step_tokens") = 0)
      .def("submit", &submit, py::arg("prompt"), py::arg("max_new_tokens") = 64, py::arg("temperature") = 0.0f,
           py::arg("top_k") = 0, py::arg("top_p") = 1.0f, py::arg("seed") = 0, py::arg("stop") = py::none(),
           "Queue a request; returns its id. Thread-safe.")
      .def("step", &step,
           "One forward pass over every running request (GIL released): [(request, token, finish)], token -1 "
           "when the step ended the request without a new token, finish None, 'stop', 'length' or 'cancelled'.")
      .def("cancel", &Engine::cancel, py::arg("request"), py::call_guard<py::gil_scoped_release>(),
           "Cancel a request (thread-safe; its KV region is freed at once, or by the step in flight).")
      .def("stats", &stats)
      .def_property_readonly("has_work", &Engine::has_work)
      .def_property_readonly("prefill_chunk", &Engine::prefill_chunk)
      .def_property_readonly("step_tokens", &Engine::step_tokens)
      .def("generate", &generate, py::arg("prompts"), py::arg("max_new_tokens") = 64,
           py::arg("temperature") = 0.0f, py::arg("top_k") = 0, py::arg("top_p") = 1.0f, py::arg("seed") = 0,
           py::arg("stop") = py::none(), py::arg("callback") = py::none(),
           "New token ids for each prompt. callback(seq, token) -> bool|None runs per token; False stops that "
           "sequence. stop=None means the config's eos_token_id(s).")
      .def("logits", &logits, py::arg("tokens"), py::arg("chunk") = 0,
           "Logits of every position: float32 [len(tokens), vocab]. chunk = tokens per forward pass "
           "(0 = prefill chunk, 1 = token by token through the KV cache).")
      .def_property_readonly("config", [](const Engine& e) { return config_dict(e.config()); })
      .def_property_readonly("kv_cache_bytes", &Engine::kv_cache_bytes)
      .def_property_readonly("weight_bytes", &Engine::weight_bytes)
      .def_property_readonly("weight_bytes_per_token", &Engine::weight_bytes_per_token)
      .def_property_readonly("num_layers", &Engine::n_layers_run)
      .def_property_readonly("num_attention_layers", &Engine::n_attention_layers)
      .def_property_readonly("layers_run", &Engine::layers_run)
      .def_property_readonly("max_seq", &Engine::max_seq)
      .def_property_readonly("max_batch", &Engine::max_batch)
      .def_property_readonly("threads", &Engine::threads)
      .def_property_readonly("dtype", &Engine::dtype);
  m.def("attend_head", &attend_head, py::arg("q"), py::arg("keys"), py::arg("values"), py::arg("scale"),
        py::arg("path"),
        "Test hook: softmax(scale * keys @ q_g) @ values for each head g of q ([hd] or [group, hd]) on the "
        "'ref' or 'avx2' decode attention kernel.");
  m.def("attention_decode", &attention_decode, py::arg("q"), py::arg("keys"), py::arg("values"),
        py::arg("n_kv_heads"), py::arg("path"), py::arg("threads") = 2,
        "Test hook: the engine's decode attention of one token over keys/values [n, n_kv_heads * hd].");
}
