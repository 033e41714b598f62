// The checkpoint contract (C++ twin of shortrt/checkpoint.py): config.json,
// shortrt.json, the tensor set and the plan. Messages match the Python reader's.
#include "contract.h"

#include <sys/stat.h>

#include <algorithm>
#include <charconv>
#include <cmath>
#include <map>
#include <set>
#include <string>
#include <tuple>

#include "error.h"
#include "json.h"
#include "safetensors.h"

namespace shortrt {
namespace {

const char* const kFormat = "shortrt.layermap/1";

// Python's repr of a float: the shortest round-trip digits, ".0" on whole numbers.
std::string render_number(double x) {
  char buf[64];
  auto [end, ec] = std::to_chars(buf, buf + sizeof buf, x);
  std::string s(buf, ec == std::errc() ? end : buf);
  if (s.find_first_of(".en") == std::string::npos) s += ".0";
  return s;
}

// A short rendering of a JSON value for messages (as Python's json.dumps writes scalars).
std::string render(const json::Value& v) {
  switch (v.type()) {
    case json::Value::Type::Null: return "null";
    case json::Value::Type::Bool: return v.as_bool() ? "true" : "false";
    case json::Value::Type::String: return "\"" + v.as_string() + "\"";
    case json::Value::Type::Array: return "[...]";
    case json::Value::Type::Object: return "{...}";
    case json::Value::Type::Number: {
      if (v.is_integer_literal()) return std::to_string(v.as_int());
      return render_number(v.as_number());
    }
  }
  return "?";
}

// ---------------------------------------------------------------- config.json

const json::Value* field(const json::Value& obj, const char* key) {
  const json::Value* v = obj.find(key);
  return (v && !v->is_null()) ? v : nullptr;  // transformers writes null for unset options
}

int positive_int(const json::Value& obj, const char* key) {
  const json::Value* v = field(obj, key);
  if (!v) throw Error(std::string("config.json: missing required field '") + key + "'");
  if (!v->is_integer_literal() || v->as_int() < 1 || v->as_int() > 1000000000)
    throw Error(std::string("config.json: '") + key + "' must be a positive integer, got " + render(*v));
  return static_cast<int>(v->as_int());
}

int optional_int(const json::Value& obj, const char* key, int fallback) {
  return field(obj, key) ? positive_int(obj, key) : fallback;
}

double number_or(const json::Value& obj, const char* key, double fallback, const std::string& where = "") {
  const json::Value* v = field(obj, key);
  if (!v) return fallback;
  if (!v->is_number()) throw Error("config.json: '" + where + key + "' must be a number, got " + render(*v));
  return v->as_number();
}

bool bool_or(const json::Value& obj, const char* key, bool fallback) {
  const json::Value* v = field(obj, key);
  if (!v) return fallback;
  if (!v->is_bool()) throw Error(std::string("config.json: '") + key + "' must be true or false, got " + render(*v));
  return v->as_bool();
}

// (architecture, model_type) pairs: the one list.
const std::vector<std::pair<std::string, std::string>>& architecture_table() {
  static const std::vector<std::pair<std::string, std::string>> table = {
      {"LlamaForCausalLM", "llama"}, {"MistralForCausalLM", "mistral"}, {"Qwen2ForCausalLM", "qwen2"},
      {"Qwen3ForCausalLM", "qwen3"}, {"Olmo2ForCausalLM", "olmo2"}, {"Phi3ForCausalLM", "phi3"},
      {"Gemma3ForCausalLM", "gemma3_text"}};
  return table;
}

std::string architecture_of(const json::Value& root) {
  std::string arch;
  if (const json::Value* archs = field(root, "architectures")) {
    if (!archs->is_array() || archs->as_array().empty() || !archs->as_array()[0].is_string())
      throw Error("config.json: 'architectures' must be a non-empty list of names");
    arch = archs->as_array()[0].as_string();
  } else {
    // Some converters (GGUF -> transformers) omit 'architectures'; model_type names the family.
    const json::Value* type = field(root, "model_type");
    if (!type || !type->is_string()) throw Error("config.json: neither 'architectures' nor 'model_type' is present");
    std::vector<std::string> types;
    for (const auto& [a, t] : architecture_table()) {
      if (t == type->as_string()) arch = a;
      types.push_back(t);
    }
    std::sort(types.begin(), types.end());
    if (arch.empty()) {
      std::string list;
      for (const auto& t : types) list += (list.empty() ? "" : ", ") + t;
      throw Error("config.json: unsupported model_type '" + type->as_string() + "' (shortrt runs " + list + ")");
    }
  }
  const auto& names = supported_architectures();
  if (std::find(names.begin(), names.end(), arch) == names.end()) {
    std::string list;
    for (const auto& a : names) list += (list.empty() ? "" : ", ") + a;
    throw Error("config.json: unsupported architecture '" + arch + "' (shortrt runs " + list + ")");
  }
  return arch;
}

// Phi-3's longrope fields, as shortrt/checkpoint.py's _parse_longrope (the factor lists' length is checked
// against rotary_dim by the caller).
void parse_longrope(const json::Value& root, const json::Value& spec, ModelConfig& c) {
  c.rope_type = "longrope";
  for (const char* key : {"short_factor", "long_factor"}) {
    const json::Value* v = field(spec, key);
    bool ok = v && v->is_array() && !v->as_array().empty();
    if (ok)
      for (const json::Value& x : v->as_array()) ok = ok && x.is_number() && std::isfinite(x.as_number()) && x.as_number() > 0;
    if (!ok) throw Error(std::string("config.json: longrope needs 'rope.") + key + "', a list of positive numbers");
    std::vector<float>& out = key[0] == 's' ? c.rope_short_factor : c.rope_long_factor;
    for (const json::Value& x : v->as_array()) out.push_back(static_cast<float>(x.as_number()));
  }
  // In the rope object (transformers 5 copies it there), else at the top level (older Phi-3 configs).
  const json::Value& where = field(spec, "original_max_position_embeddings") ? spec : root;
  const int original = positive_int(where, "original_max_position_embeddings");
  if (original < 2) throw Error("config.json: longrope needs original_max_position_embeddings >= 2");
  const int max_position = optional_int(root, "max_position_embeddings", 2048);
  const double factor = number_or(spec, "factor", static_cast<double>(max_position) / original, "rope.");
  if (!(factor > 0)) throw Error("config.json: longrope 'rope.factor' must be positive");
  double attention = number_or(spec, "attention_factor", 0.0, "rope.");
  if (!field(spec, "attention_factor"))
    attention = factor <= 1.0 ? 1.0 : std::sqrt(1.0 + std::log(factor) / std::log(static_cast<double>(original)));
  if (!(attention > 0)) throw Error("config.json: longrope 'rope.attention_factor' must be positive");
  c.rope_original_max_position = original;
  c.rope_attention_factor = static_cast<float>(attention);
}

// transformers 5 keeps theta and scaling in 'rope_parameters'; older configs use
// 'rope_theta' + 'rope_scaling'. Both are accepted. partial_rotary: the family may rotate part of each
// head (Phi-3: 'partial_rotary_factor' in the rope object, else at the top level); returns that factor.
// params / scaling: those objects (or null); theta: rope_theta where params does not give it.
double parse_rope_spec(const json::Value& root, const json::Value* params, const json::Value* scaling, double theta,
                       ModelConfig& c, bool partial_rotary) {
  if (params && !params->is_object()) throw Error("config.json: 'rope_parameters' must be an object");
  if (scaling && !scaling->is_object()) throw Error("config.json: 'rope_scaling' must be an object");
  if (params) theta = number_or(*params, "rope_theta", theta, "rope_parameters.");
  if (!(theta > 0) || !std::isfinite(theta)) throw Error("config.json: rope_theta must be positive");
  c.rope_theta = static_cast<float>(theta);
  const json::Value* spec = params ? params : scaling;
  double factor = partial_rotary ? number_or(root, "partial_rotary_factor", 1.0) : 1.0;
  if (spec) factor = number_or(*spec, "partial_rotary_factor", factor, "rope.");
  if (factor != 1.0 && !partial_rotary) throw Error("config.json: partial_rotary_factor != 1 is not supported");
  if (!spec) return factor;
  std::string type = "default";
  for (const char* key : {"rope_type", "type"}) {
    if (const json::Value* t = field(*spec, key)) {
      if (!t->is_string()) throw Error(std::string("config.json: rope '") + key + "' must be a string");
      type = t->as_string();
      break;
    }
  }
  if (partial_rotary && (type == "longrope" || type == "su" || type == "yarn")) {  // transformers' Phi-3: all longrope
    parse_longrope(root, *spec, c);
    return factor;
  }
  if (type != "default" && type != "linear" && type != "llama3")
    throw Error("config.json: unsupported rope scaling type '" + type + "' (shortrt supports default, linear, llama3)");
  c.rope_type = type;
  if (type == "default") return factor;
  c.rope_factor = static_cast<float>(number_or(*spec, "factor", 0.0, "rope."));
  if (!(c.rope_factor > 0)) throw Error("config.json: rope scaling '" + type + "' needs a positive 'factor'");
  if (type == "llama3") {
    c.rope_low_freq_factor = static_cast<float>(number_or(*spec, "low_freq_factor", 1.0, "rope."));
    c.rope_high_freq_factor = static_cast<float>(number_or(*spec, "high_freq_factor", 4.0, "rope."));
    c.rope_original_max_position = optional_int(*spec, "original_max_position_embeddings", 8192);
    if (!(c.rope_high_freq_factor > c.rope_low_freq_factor))
      throw Error("config.json: llama3 rope needs high_freq_factor > low_freq_factor");
  }
  return factor;
}

double parse_rope(const json::Value& root, ModelConfig& c, bool partial_rotary) {
  return parse_rope_spec(root, field(root, "rope_parameters"), field(root, "rope_scaling"),
                         number_or(root, "rope_theta", 10000.0), c, partial_rotary);
}

// Gemma 3's fields beyond the Llama family's (engine.h's ModelConfig); refuses what shortrt does not match.
// As shortrt/checkpoint.py's _parse_gemma3 and _gemma3_rope.
void parse_gemma3(const json::Value& root, ModelConfig& c) {
  if (const json::Value* act = field(root, "hidden_activation")) {
    if (!act->is_string() || act->as_string() != "gelu_pytorch_tanh")
      throw Error("config.json: unsupported hidden_activation " + render(*act) +
                  " (shortrt implements Gemma 3's GeGLU with gelu_pytorch_tanh)");
  }
  if (bool_or(root, "use_bidirectional_attention", false))
    throw Error("config.json: use_bidirectional_attention=true is not supported (shortrt is causal)");
  if (field(root, "attn_logit_softcapping"))
    throw Error("config.json: attn_logit_softcapping is not supported (set it to null)");
  const double cap = number_or(root, "final_logit_softcapping", 0.0);
  if (cap < 0 || !std::isfinite(cap)) throw Error("config.json: final_logit_softcapping must be positive or null");
  const double scalar = number_or(root, "query_pre_attn_scalar", 256.0);
  if (!(scalar > 0) || !std::isfinite(scalar)) throw Error("config.json: query_pre_attn_scalar must be positive");
  c.sandwich_norm = c.norm_unit_offset = c.gelu_tanh = c.qk_norm = true;
  c.final_softcap = static_cast<float>(cap);
  c.attn_scale = static_cast<float>(std::pow(scalar, -0.5));
  c.embed_scale = static_cast<float>(std::sqrt(static_cast<double>(c.hidden)));
  // layer_types, or as transformers derives them: every sliding_window_pattern-th layer full.
  bool any_sliding = false;
  c.layer_sliding.assign(c.n_layers, 0);
  if (const json::Value* types = field(root, "layer_types")) {
    if (!types->is_array() || static_cast<int>(types->as_array().size()) != c.n_layers)
      throw Error("config.json: 'layer_types' must list num_hidden_layers = " + std::to_string(c.n_layers) +
                  " entries");
    for (int i = 0; i < c.n_layers; ++i) {
      const json::Value& t = types->as_array()[i];
      const bool sliding = t.is_string() && t.as_string() == "sliding_attention";
      if (!sliding && !(t.is_string() && t.as_string() == "full_attention"))
        throw Error("config.json: layer_types " + render(t) +
                    " is not supported (Gemma 3 layers are sliding_attention or full_attention)");
      c.layer_sliding[i] = sliding;
    }
  } else {
    const int pattern = optional_int(root, "sliding_window_pattern", 6);
    for (int i = 0; i < c.n_layers; ++i) c.layer_sliding[i] = (i + 1) % pattern != 0;
  }
  for (char s : c.layer_sliding) any_sliding = any_sliding || s;
  c.sliding_window = any_sliding ? optional_int(root, "sliding_window", 4096) : 0;
  // Two RoPEs: rope_parameters keyed by layer type, or rope_theta (+ rope_scaling) and rope_local_base_freq.
  const json::Value* params = field(root, "rope_parameters");
  const json::Value* full = nullptr;
  const json::Value* local = nullptr;
  if (params) {
    bool keyed = params->is_object();
    if (keyed)
      for (const auto& [key, v] : params->as_object()) keyed = keyed && (key == "full_attention" || key == "sliding_attention");
    if (!keyed)
      throw Error("config.json: Gemma 3's 'rope_parameters' must be keyed by layer type (full_attention, "
                  "sliding_attention)");
    full = field(*params, "full_attention");
    local = field(*params, "sliding_attention");
    if ((full && !full->is_object()) || (local && !local->is_object()))
      throw Error("config.json: each 'rope_parameters' entry must be an object");
  }
  if (local) {
    for (const char* key : {"rope_type", "type"}) {
      if (const json::Value* t = field(*local, key)) {
        if (!t->is_string() || t->as_string() != "default")
          throw Error("config.json: scaled RoPE on sliding_attention layers is not supported");
        break;
      }
    }
  }
  parse_rope_spec(root, full, params ? nullptr : field(root, "rope_scaling"), number_or(root, "rope_theta", 1e6), c,
                  false);
  double local_theta = number_or(root, "rope_local_base_freq", 10000.0);
  if (local) local_theta = number_or(*local, "rope_theta", local_theta, "rope_parameters.sliding_attention.");
  if (!(local_theta > 0) || !std::isfinite(local_theta))
    throw Error("config.json: the sliding_attention rope_theta must be positive");
  c.rope_local_theta = static_cast<float>(local_theta);
}

// ---------------------------------------------------------------- shortrt.json

struct MapError : Error {
  explicit MapError(const std::string& what) : Error("shortrt.json: " + what) {}
};

bool is_regular_file(const std::string& path) {
  struct stat st;
  return ::stat(path.c_str(), &st) == 0 && S_ISREG(st.st_mode);
}

bool path_exists(const std::string& path) {
  struct stat st;
  return ::lstat(path.c_str(), &st) == 0;
}

std::vector<int64_t> index_list(const json::Value& v, bool* ok) {
  std::vector<int64_t> out;
  *ok = v.is_array();
  if (!*ok) return out;
  for (const json::Value& e : v.as_array()) {
    if (!e.is_integer_literal()) {
      *ok = false;
      return out;
    }
    out.push_back(e.as_int());
  }
  return out;
}

std::string index_string(const std::vector<int64_t>& v) {
  std::string s = "[";
  for (size_t i = 0; i < v.size(); ++i) s += (i ? ", " : "") + std::to_string(v[i]);
  return s + "]";
}

// Range and repetition checks, worded as LayerMap.validate words them.
void check_indices(const std::vector<int64_t>& indices, int64_t n, const std::string& what) {
  for (int64_t i : indices)
    if (i < 0 || i >= n)
      throw MapError(what + " index " + std::to_string(i) + " is out of range for a model with " + std::to_string(n) +
                     " layers (valid: 0.." + std::to_string(n - 1) + ")");
  std::set<int64_t> seen, dup;
  for (int64_t i : indices)
    if (!seen.insert(i).second) dup.insert(i);
  if (!dup.empty())
    throw MapError(what + " indices are repeated: " + index_string(std::vector<int64_t>(dup.begin(), dup.end())));
}

struct Entry {
  LayerFlags flags;
  std::vector<int64_t> sources;
};

// Types first (every entry), then the semantic checks (LayerMap.validate's order).
Entry parse_entry(const json::Value& e, size_t i) {
  const std::string where = "layers[" + std::to_string(i) + "]";
  if (!e.is_object()) throw MapError(where + " must be an object");
  std::vector<std::string> keys;
  for (const auto& [k, v] : e.as_object()) keys.push_back(k);
  std::sort(keys.begin(), keys.end());
  for (const std::string& k : keys)
    if (k != "source" && k != "kind" && k != "attention" && k != "mlp")
      throw MapError(where + " has unknown key '" + k + "'");
  for (const char* k : {"source", "kind", "attention", "mlp"})
    if (!e.has(k)) throw MapError(where + " is missing '" + k + "'");
  const json::Value& kind = e.at("kind");
  const std::string k = kind.is_string() ? kind.as_string() : "";
  if (k != "layer" && k != "layer_replacement" && k != "mlp_replacement")
    throw MapError(where + ".kind " + render(kind) + " is not one of layer, layer_replacement, mlp_replacement");
  LayerFlags flags;
  for (const char* key : {"attention", "mlp"}) {
    const json::Value& v = e.at(key);
    if (!v.is_bool()) throw MapError(where + "." + key + " must be true or false, got " + render(v));
  }
  flags.attention = e.at("attention").as_bool();
  flags.mlp = e.at("mlp").as_bool();
  const json::Value& source = e.at("source");
  std::vector<int64_t> sources;
  if (k == "layer") {
    if (!source.is_integer_literal()) throw MapError(where + ".source must be a layer index, got " + render(source));
    sources.push_back(source.as_int());
  } else {
    bool ok = false;
    sources = index_list(source, &ok);
    if (!ok || sources.empty()) throw MapError(where + ".source of a " + k + " must be a non-empty list of layer indices");
  }
  if (k == "layer_replacement" && !(flags.attention && flags.mlp))
    throw MapError(where + " is a layer_replacement, which has attention and MLP");
  if (k == "mlp_replacement" && (flags.attention || !flags.mlp))
    throw MapError(where + " is an mlp_replacement: attention false, mlp true");
  return {flags, sources};
}

std::vector<LayerFlags> parse_layer_map(const json::Value& root, int n_layers) {
  if (!root.is_object()) throw MapError("top level must be an object");
  static const std::set<std::string> known = {"format", "source", "source_num_layers", "method", "layers",
                                              "removed", "scores", "calibration", "replacement",
                                              "healing", "budget"};
  std::vector<std::string> keys;
  for (const auto& [k, v] : root.as_object()) keys.push_back(k);
  std::sort(keys.begin(), keys.end());
  for (const std::string& k : keys)
    if (!known.count(k)) throw MapError("unknown key '" + k + "'");
  const json::Value* fmt = root.find("format");
  if (!fmt || !fmt->is_string() || fmt->as_string() != kFormat)
    throw MapError("unsupported format " + (fmt ? render(*fmt) : std::string("null")) + " (expected \"" + kFormat +
                   "\")");
  for (const char* key : {"source_num_layers", "layers", "method", "removed"})
    if (!root.has(key)) throw MapError(std::string("missing '") + key + "'");
  const json::Value& nv = root.at("source_num_layers");
  if (!nv.is_integer_literal() || nv.as_int() < 1)
    throw MapError("'source_num_layers' must be a positive integer, got " + render(nv));
  const int64_t n = nv.as_int();
  if (!root.at("method").is_string()) throw MapError("'method' must be a string");
  const json::Value* source = root.find("source");
  if (source && !source->is_null()) {
    if (!source->is_string()) throw MapError("'source' must be a string");
    const std::string& s = source->as_string();
    if (s != "default" && (s.empty() || s[0] != '/'))
      throw MapError("'source' must be \"default\" or an absolute path, got " + render(*source));
  } else {
    throw MapError("'source' must be \"default\" or an absolute path, got null");
  }
  for (const char* key : {"scores", "calibration", "replacement", "healing", "budget"}) {
    const json::Value* v = root.find(key);
    if (v && !v->is_null() && !v->is_object()) throw MapError(std::string("'") + key + "' must be an object");
  }
  const json::Value& layers = root.at("layers");
  if (!layers.is_array()) throw MapError("'layers' must be a list");
  const auto& entries = layers.as_array();
  if (entries.empty()) throw MapError("'layers' is empty: a checkpoint keeps at least one layer");
  if (static_cast<int>(entries.size()) != n_layers)
    throw Error("shortrt.json lists " + std::to_string(entries.size()) +
                " layers but config.json has num_hidden_layers = " + std::to_string(n_layers));
  std::vector<Entry> parsed;
  for (size_t i = 0; i < entries.size(); ++i) parsed.push_back(parse_entry(entries[i], i));
  bool ok = false;
  std::vector<int64_t> removed = index_list(root.at("removed"), &ok);
  if (!ok) throw MapError("'removed' must be a list of layer indices");
  std::set<int64_t> seen;
  std::vector<LayerFlags> out;
  for (size_t i = 0; i < parsed.size(); ++i) {
    const Entry& e = parsed[i];
    if (!e.flags.attention && !e.flags.mlp)
      throw MapError("layer entry " + std::to_string(i) + " has neither attention nor MLP: remove it instead");
    check_indices(e.sources, n, "layer entry " + std::to_string(i) + " source");
    for (int64_t s : e.sources)
      if (seen.count(s)) throw MapError("original layer " + std::to_string(s) + " appears in more than one entry");
    for (int64_t s : e.sources) seen.insert(s);
    out.push_back(e.flags);
  }
  check_indices(removed, n, "removed layer");
  std::vector<int64_t> both, lost;
  for (int64_t r : removed)
    if (seen.count(r)) both.push_back(r);
  if (!both.empty()) {
    std::sort(both.begin(), both.end());
    throw MapError("layers " + index_string(both) + " are both kept and removed");
  }
  std::set<int64_t> removed_set(removed.begin(), removed.end());
  for (int64_t i = 0; i < n; ++i)
    if (!seen.count(i) && !removed_set.count(i)) lost.push_back(i);
  if (!lost.empty()) throw MapError("original layers " + index_string(lost) + " are neither kept nor listed in 'removed'");
  return out;
}

// ---------------------------------------------------------------- tensors

struct Expected {
  std::string name;
  std::vector<int64_t> shape;
};

std::vector<Expected> expected_tensors(const ModelConfig& c, const std::vector<LayerFlags>& layers) {
  const int64_t h = c.hidden, q = static_cast<int64_t>(c.n_heads) * c.head_dim,
                kv = static_cast<int64_t>(c.n_kv_heads) * c.head_dim, inter = c.intermediate, vocab = c.vocab;
  std::vector<Expected> out = {{"model.embed_tokens.weight", {vocab, h}}, {"model.norm.weight", {h}}};
  if (!c.tie_embeddings) out.push_back({"lm_head.weight", {vocab, h}});
  for (size_t i = 0; i < layers.size(); ++i) {
    const std::string p = "model.layers." + std::to_string(i) + ".";
    if (layers[i].attention) {
      out.push_back({p + (c.post_norm ? "post_attention_layernorm.weight" : "input_layernorm.weight"), {h}});
      if (c.fused_projections) {
        out.push_back({p + "self_attn.qkv_proj.weight", {q + 2 * kv, h}});
      } else {
        out.push_back({p + "self_attn.q_proj.weight", {q, h}});
        out.push_back({p + "self_attn.k_proj.weight", {kv, h}});
        out.push_back({p + "self_attn.v_proj.weight", {kv, h}});
      }
      out.push_back({p + "self_attn.o_proj.weight", {h, q}});
      if (c.sandwich_norm) out.push_back({p + "post_attention_layernorm.weight", {h}});
      if (c.qkv_bias) {
        out.push_back({p + "self_attn.q_proj.bias", {q}});
        out.push_back({p + "self_attn.k_proj.bias", {kv}});
        out.push_back({p + "self_attn.v_proj.bias", {kv}});
      }
      if (c.qk_norm) {
        out.push_back({p + "self_attn.q_norm.weight", {c.qk_norm_whole ? q : c.head_dim}});
        out.push_back({p + "self_attn.k_norm.weight", {c.qk_norm_whole ? kv : c.head_dim}});
      }
    }
    if (layers[i].mlp) {
      out.push_back({p + (c.sandwich_norm ? "pre_feedforward_layernorm.weight"
                          : c.post_norm   ? "post_feedforward_layernorm.weight"
                                          : "post_attention_layernorm.weight"),
                     {h}});
      if (c.fused_projections) {
        out.push_back({p + "mlp.gate_up_proj.weight", {2 * inter, h}});
      } else {
        out.push_back({p + "mlp.gate_proj.weight", {inter, h}});
        out.push_back({p + "mlp.up_proj.weight", {inter, h}});
      }
      out.push_back({p + "mlp.down_proj.weight", {h, inter}});
      if (c.sandwich_norm) out.push_back({p + "post_feedforward_layernorm.weight", {h}});
    }
  }
  return out;
}

// "model.layers.<digits>.<rest>" -> (index, rest); false for other names.
bool layer_key(const std::string& name, long long* index, std::string* rest) {
  static const std::string prefix = "model.layers.";
  if (name.compare(0, prefix.size(), prefix) != 0) return false;
  size_t i = prefix.size(), j = i;
  while (j < name.size() && name[j] >= '0' && name[j] <= '9') ++j;
  if (j == i || j >= name.size() || name[j] != '.' || j + 1 >= name.size() || j - i > 9) return false;
  *index = std::stoll(name.substr(i, j - i));
  *rest = name.substr(j + 1);
  return true;
}

bool starts_with(const std::string& s, const char* prefix) { return s.rfind(prefix, 0) == 0; }

bool ignored_tensor(const std::string& name) {  // a buffer some exporters save; nobody reads it
  static const std::string tail = "rotary_emb.inv_freq";
  return name.size() >= tail.size() && name.compare(name.size() - tail.size(), tail.size(), tail) == 0 &&
         (name.size() == tail.size() || name[name.size() - tail.size() - 1] == '.');
}

}  // namespace

const std::vector<std::string>& supported_architectures() {
  static const std::vector<std::string> names = [] {
    std::vector<std::string> v;
    for (const auto& [a, t] : architecture_table()) v.push_back(a);
    return v;
  }();
  return names;
}

ModelConfig parse_config(const json::Value& root) {
  if (!root.is_object()) throw Error("config.json: top level must be an object");
  ModelConfig c;
  c.architecture = architecture_of(root);
  c.hidden = positive_int(root, "hidden_size");
  c.intermediate = positive_int(root, "intermediate_size");
  c.n_layers = positive_int(root, "num_hidden_layers");
  c.n_heads = positive_int(root, "num_attention_heads");
  c.n_kv_heads = optional_int(root, "num_key_value_heads", c.n_heads);
  c.vocab = positive_int(root, "vocab_size");
  c.max_position = optional_int(root, "max_position_embeddings", 2048);
  const bool gemma = c.architecture == "Gemma3ForCausalLM";
  if (field(root, "head_dim") || gemma) {
    c.head_dim = optional_int(root, "head_dim", 256);  // Gemma 3's default is 256, not hidden / heads
  } else {
    if (c.hidden % c.n_heads != 0)
      throw Error("config.json: hidden_size " + std::to_string(c.hidden) + " is not divisible by num_attention_heads " +
                  std::to_string(c.n_heads));
    c.head_dim = c.hidden / c.n_heads;
  }
  if (c.head_dim % 2 != 0) throw Error("config.json: head_dim must be even for RoPE");
  if (c.n_heads % c.n_kv_heads != 0)
    throw Error("config.json: num_attention_heads " + std::to_string(c.n_heads) +
                " is not a multiple of num_key_value_heads " + std::to_string(c.n_kv_heads));
  double eps = number_or(root, "rms_norm_eps", 1e-6);
  if (!(eps > 0)) throw Error("config.json: rms_norm_eps must be positive");
  c.rms_eps = static_cast<float>(eps);
  if (const json::Value* act = gemma ? nullptr : field(root, "hidden_act")) {
    if (!act->is_string() || act->as_string() != "silu")
      throw Error("config.json: unsupported hidden_act " + render(*act) + " (shortrt implements SwiGLU with silu)");
  }
  if (bool_or(root, "mlp_bias", false)) throw Error("config.json: mlp_bias=true is not supported");
  const bool attention_bias = bool_or(root, "attention_bias", false);
  c.qk_norm = c.architecture == "Qwen3ForCausalLM" || c.architecture == "Olmo2ForCausalLM";
  c.qk_norm_whole = c.post_norm = c.architecture == "Olmo2ForCausalLM";
  c.fused_projections = c.architecture == "Phi3ForCausalLM";
  if (c.architecture == "Qwen2ForCausalLM" || c.architecture == "Qwen3ForCausalLM") {
    c.qkv_bias = c.architecture == "Qwen2ForCausalLM";
    if (bool_or(root, "use_sliding_window", false)) throw Error("config.json: use_sliding_window=true is not supported");
  } else if (c.architecture == "MistralForCausalLM" || c.architecture == "Phi3ForCausalLM") {
    c.sliding_window = optional_int(root, "sliding_window", 0);
  }
  if (attention_bias && c.architecture != "Qwen2ForCausalLM")
    throw Error("config.json: attention_bias=true is not supported for " + c.architecture);
  if (gemma) {
    parse_gemma3(root, c);
  } else if (const json::Value* types = field(root, "layer_types")) {
    if (!types->is_array() || static_cast<int>(types->as_array().size()) != c.n_layers)
      throw Error("config.json: 'layer_types' must list num_hidden_layers = " + std::to_string(c.n_layers) +
                  " entries");
    for (const json::Value& t : types->as_array())
      if (!t.is_string() || t.as_string() != "full_attention")
        throw Error("config.json: layer_types " + render(t) + " is not supported (shortrt runs full_attention layers only)");
  }
  const double factor = gemma ? 1.0 : parse_rope(root, c, c.architecture == "Phi3ForCausalLM");
  c.rotary_dim = c.head_dim;
  if (factor != 1.0) {
    // transformers rotates int(head_dim * factor) leading dims of each head (Phi-3).
    c.rotary_dim = static_cast<int>(c.head_dim * factor);
    if (!(factor > 0.0 && factor < 1.0 && c.rotary_dim >= 2 && c.rotary_dim % 2 == 0))
      throw Error("config.json: partial_rotary_factor " + render_number(factor) + " must lie in (0, 1] and rotate an "
                  "even number of head_dim " + std::to_string(c.head_dim) + "'s dims (got " +
                  std::to_string(c.rotary_dim) + ")");
  }
  for (const auto& [key, list] : {std::pair<const char*, const std::vector<float>*>{"short_factor", &c.rope_short_factor},
                                  {"long_factor", &c.rope_long_factor}})
    if (c.rope_type == "longrope" && static_cast<int>(list->size()) != c.rotary_dim / 2)
      throw Error(std::string("config.json: longrope 'rope.") + key + "' must list rotary_dim / 2 = " +
                  std::to_string(c.rotary_dim / 2) + " numbers, got " + std::to_string(list->size()));
  c.tie_embeddings = bool_or(root, "tie_word_embeddings", gemma);  // Gemma 3 ties by default
  if (const json::Value* eos = field(root, "eos_token_id")) {
    bool ok = eos->is_integer_literal() || eos->is_array();
    if (eos->is_array())
      for (const json::Value& e : eos->as_array()) ok = ok && e.is_integer_literal();
    if (!ok) throw Error("config.json: eos_token_id must be an integer or a list of integers");
    if (eos->is_array()) {
      for (const json::Value& e : eos->as_array()) c.eos_token_ids.push_back(static_cast<int>(e.as_int()));
    } else {
      c.eos_token_ids.push_back(static_cast<int>(eos->as_int()));
    }
  }
  return c;
}

ModelConfig load_config(const std::string& checkpoint_dir) {
  const std::string path = checkpoint_dir + "/config.json";
  if (!path_exists(path)) throw Error(checkpoint_dir + " is not a checkpoint directory: config.json is missing");
  if (!is_regular_file(path)) throw Error(path + " is not a regular file");
  return parse_config(json::parse_file(path));
}

std::vector<LayerFlags> load_layer_map(const std::string& checkpoint_dir, int n_layers) {
  const std::string path = checkpoint_dir + "/shortrt.json";
  if (!path_exists(path)) return std::vector<LayerFlags>(n_layers);
  if (!is_regular_file(path)) throw Error(path + " is not a regular file");
  return parse_layer_map(json::parse_file(path), n_layers);
}

void check_tensors(const Checkpoint& ckpt, const ModelConfig& c, const std::vector<LayerFlags>& layers) {
  const std::vector<Expected> expected = expected_tensors(c, layers);
  std::set<std::string> wanted;
  for (const Expected& e : expected) wanted.insert(e.name);
  const long long k = static_cast<long long>(layers.size());
  // The Python reader's order: non-layer names, then by layer index, then by name.
  std::vector<std::tuple<int, long long, std::string, std::string>> found;
  for (const std::string& name : ckpt.names()) {
    long long index = 0;
    std::string rest;
    if (layer_key(name, &index, &rest))
      found.emplace_back(1, index, rest, name);
    else
      found.emplace_back(0, 0, name, name);
  }
  std::sort(found.begin(), found.end());
  const std::string where = ckpt.dir() + ": ";
  for (const auto& [group, index, rest, name] : found) {
    if (wanted.count(name) || ignored_tensor(name)) continue;
    if (name == "lm_head.weight" && c.tie_embeddings) continue;
    if (group == 1) {
      const std::string layer = std::to_string(index);
      if (index >= k)
        throw Error(where + "tensor '" + name + "' is for layer " + layer + " but config.json has num_hidden_layers = " +
                    std::to_string(k));
      // Which sublayer a tensor belongs to (shortrt.checkpoint.sublayer_prefixes): the norm goes with the
      // sublayer it wraps, before it or (OLMo-2) after it.
      // Gemma 3's sublayers own the norms on both sides.
      const bool attention_tensor =
          starts_with(rest, "self_attn.") ||
          starts_with(rest, c.post_norm ? "post_attention_layernorm." : "input_layernorm.") ||
          (c.sandwich_norm && starts_with(rest, "post_attention_layernorm."));
      const bool mlp_tensor =
          starts_with(rest, "mlp.") ||
          starts_with(rest, c.post_norm || c.sandwich_norm ? "post_feedforward_layernorm." : "post_attention_layernorm.") ||
          (c.sandwich_norm && starts_with(rest, "pre_feedforward_layernorm."));
      // Named only when shortrt.json says the layer lacks that sublayer (else the tensor is simply foreign).
      if (attention_tensor && !layers[index].attention)
        throw Error(where + "tensor '" + name + "' exists but shortrt.json says layer " + layer + " has no attention");
      if (mlp_tensor && !layers[index].mlp)
        throw Error(where + "tensor '" + name + "' exists but shortrt.json says layer " + layer + " has no MLP");
    }
    throw Error(where + "unexpected tensor '" + name + "' (not part of a " + c.architecture + ")");
  }
  for (const Expected& e : expected) {
    const TensorView* t = ckpt.find(e.name);
    if (!t) throw Error(where + "tensor '" + e.name + "' not found in the checkpoint");
    if (t->shape != e.shape)
      throw Error(where + "tensor '" + e.name + "': expected shape " + shape_string(e.shape) + ", found " +
                  shape_string(t->shape));
    if (t->dtype != DType::F32 && t->dtype != DType::F16 && t->dtype != DType::BF16)
      throw Error(where + "tensor '" + e.name + "' has dtype " + dtype_name(t->dtype) +
                  "; weights must be F32, F16, BF16");
  }
}

LayerPlan make_plan(const std::vector<LayerFlags>& layers, const std::vector<int>& skip_layers) {
  const int n = static_cast<int>(layers.size());
  std::vector<bool> skipped(n, false);
  for (int s : skip_layers) {
    if (s < 0 || s >= n)
      throw Error("skip_layers: layer " + std::to_string(s) + " is out of range for a checkpoint of " +
                  std::to_string(n) + " layers");
    if (skipped[s]) throw Error("skip_layers: layer " + std::to_string(s) + " is listed twice");
    skipped[s] = true;
  }
  LayerPlan plan;
  for (int i = 0; i < n; ++i) {
    if (skipped[i]) continue;
    PlannedLayer layer;
    layer.index = i;
    layer.attention = layers[i].attention;
    layer.mlp = layers[i].mlp;
    if (layer.attention) layer.kv_slot = plan.n_kv_slots++;
    plan.layers.push_back(layer);
  }
  if (plan.layers.empty())
    throw Error("skip_layers leaves no layer to run (the checkpoint has " + std::to_string(n) + ")");
  return plan;
}

LayerPlan build_plan(const std::string& checkpoint_dir, const ModelConfig& config,
                     const std::vector<int>& skip_layers) {
  std::vector<LayerFlags> layers = load_layer_map(checkpoint_dir, config.n_layers);
  Checkpoint ckpt(checkpoint_dir);
  check_tensors(ckpt, config, layers);
  return make_plan(layers, skip_layers);
}

}  // namespace shortrt
