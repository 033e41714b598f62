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
                             int max_batch, const std::vector<int>& skip_layers) {
  shortrt::EngineOptions o;
  o.dtype = dtype;
  o.threads = threads;
  o.max_seq = max_seq;
  o.max_batch = max_batch;
  o.skip_layers = skip_layers;
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

// Test hook: one attention head on the "ref" or "avx2" path.
py::array_t<float> attend_head(py::array_t<float, py::array::c_style | py::array::forcecast> q,
                               py::array_t<float, py::array::c_style | py::array::forcecast> keys,
                               py::array_t<float, py::array::c_style | py::array::forcecast> values, float scale,
                               const std::string& path) {
  if (q.ndim() != 1 || keys.ndim() != 2 || values.ndim() != 2 || keys.shape(0) != values.shape(0) ||
      keys.shape(1) != values.shape(1) || keys.shape(1) < q.shape(0) || keys.shape(0) < 1)
    throw std::invalid_argument("attend_head: q [hd], keys and values [n, stride >= hd], n >= 1");
  const int hd = static_cast<int>(q.shape(0));
  if (hd > 512) throw std::invalid_argument("attend_head: head_dim > 512");
  py::array_t<float> out(hd);
  if (path == "avx2") {
    if (!shortrt::avx2_kernels()) throw std::invalid_argument("attend_head: this CPU has no AVX2/FMA");
    if (hd % 8 != 0) throw std::invalid_argument("attend_head: the avx2 path needs head_dim % 8 == 0");
    shortrt::detail::attend_head_avx2(q.data(), keys.data(), values.data(), keys.shape(1), keys.shape(0), hd, scale,
                                      out.mutable_data());
  } else if (path == "ref") {
    shortrt::attend_head_ref(q.data(), keys.data(), values.data(), keys.shape(1), keys.shape(0), hd, scale,
                             out.mutable_data());
  } else {
    throw std::invalid_argument("attend_head: path must be 'ref' or 'avx2'");
  }
  return out;
}

}  // namespace

void register_engine(py::module_& m) {
  py::class_<Engine>(m, "Engine", "The C++ inference engine over one checkpoint directory.")
      .def(py::init(&load), py::arg("path"), py::arg("dtype") = "fp32", py::arg("threads") = 0,
           py::arg("max_seq") = 0, py::arg("max_batch") = 1, py::arg("skip_layers") = std::vector<int>{})
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
        py::arg("path"), "Test hook: softmax(scale * keys @ q) @ values on the 'ref' or 'avx2' attention kernel.");
}
