#include "config.h"

#include <cmath>
#include <string>

#include "error.h"
#include "json.h"

namespace shortrt {
namespace {

const json::Value* field(const json::Value& obj, const char* key) {
  if (!obj.has(key)) return nullptr;
  const json::Value& v = obj.at(key);
  return v.is_null() ? nullptr : &v;
}

int positive_int(const json::Value& obj, const char* key) {
  const json::Value* v = field(obj, key);
  if (!v) throw Error(std::string("config.json: missing required field '") + key + "'");
  if (!v->is_number()) throw Error(std::string("config.json: '") + key + "' must be a number");
  double d = v->as_number();
  if (d < 1 || d != std::floor(d) || d > 1e9)
    throw Error(std::string("config.json: '") + key + "' must be a positive integer, got " +
                std::to_string(d));
  return static_cast<int>(d);
}

int optional_int(const json::Value& obj, const char* key, int fallback) {
  return field(obj, key) ? positive_int(obj, key) : fallback;
}

double number_or(const json::Value& obj, const char* key, double fallback) {
  const json::Value* v = field(obj, key);
  if (!v) return fallback;
  if (!v->is_number()) throw Error(std::string("config.json: '") + key + "' must be a number");
  return v->as_number();
}

bool bool_or(const json::Value& obj, const char* key, bool fallback) {
  const json::Value* v = field(obj, key);
  if (!v) return fallback;
  if (!v->is_bool()) throw Error(std::string("config.json: '") + key + "' must be true or false");
  return v->as_bool();
}

std::string architecture_of(const json::Value& root) {
  if (const json::Value* archs = field(root, "architectures")) {
    if (!archs->is_array() || archs->as_array().empty() || !archs->as_array()[0].is_string())
      throw Error("config.json: 'architectures' must be a non-empty list of names");
    return archs->as_array()[0].as_string();
  }
  // Some converters (e.g. GGUF -> transformers) omit 'architectures'; model_type names the family.
  const json::Value* type = field(root, "model_type");
  if (!type || !type->is_string())
    throw Error("config.json: neither 'architectures' nor 'model_type' is present");
  const std::string& t = type->as_string();
  if (t == "llama") return "LlamaForCausalLM";
  if (t == "mistral") return "MistralForCausalLM";
  if (t == "qwen2") return "Qwen2ForCausalLM";
  throw Error("unsupported model_type '" + t +
              "' (shortrt runs llama, mistral and qwen2 checkpoints)");
}

// transformers 5 keeps theta and scaling in 'rope_parameters'; older configs use
// 'rope_theta' + 'rope_scaling'. Both are accepted.
void parse_rope(const json::Value& root, ModelConfig& c) {
  const json::Value* params = field(root, "rope_parameters");
  const json::Value* scaling = field(root, "rope_scaling");
  if (params && !params->is_object()) throw Error("config.json: 'rope_parameters' must be an object");
  if (scaling && !scaling->is_object()) throw Error("config.json: 'rope_scaling' must be an object");
  c.rope_theta = static_cast<float>(number_or(root, "rope_theta", 10000.0));
  if (params) c.rope_theta = static_cast<float>(number_or(*params, "rope_theta", c.rope_theta));
  if (!(c.rope_theta > 0)) throw Error("config.json: rope_theta must be positive");
  const json::Value* spec = params ? params : scaling;
  if (!spec) return;
  std::string type = "default";
  for (const char* key : {"rope_type", "type"}) {
    if (const json::Value* t = field(*spec, key)) {
      if (!t->is_string()) throw Error(std::string("config.json: rope '") + key + "' must be a string");
      type = t->as_string();
      break;
    }
  }
  if (number_or(*spec, "partial_rotary_factor", 1.0) != 1.0)
    throw Error("config.json: partial_rotary_factor != 1 is not supported");
  if (type == "default") {
    c.rope_type = type;
  } else if (type == "linear" || type == "llama3") {
    c.rope_type = type;
    c.rope_factor = static_cast<float>(number_or(*spec, "factor", 0.0));
    if (!(c.rope_factor > 0)) throw Error("config.json: rope scaling '" + type + "' needs a positive 'factor'");
    if (type == "llama3") {
      c.rope_low_freq_factor = static_cast<float>(number_or(*spec, "low_freq_factor", 1.0));
      c.rope_high_freq_factor = static_cast<float>(number_or(*spec, "high_freq_factor", 4.0));
      c.rope_original_max_position = optional_int(*spec, "original_max_position_embeddings", 8192);
      if (!(c.rope_high_freq_factor > c.rope_low_freq_factor))
        throw Error("config.json: llama3 rope needs high_freq_factor > low_freq_factor");
    }
  } else {
    throw Error("unsupported rope scaling type '" + type +
                "' (shortrt supports default, linear and llama3)");
  }
}

}  // namespace

ModelConfig parse_config(const json::Value& root) {
  if (!root.is_object()) throw Error("config.json: top level must be an object");
  ModelConfig c;
  c.architecture = architecture_of(root);
  if (c.architecture != "LlamaForCausalLM" && c.architecture != "MistralForCausalLM" &&
      c.architecture != "Qwen2ForCausalLM")
    throw Error("unsupported architecture '" + c.architecture +
                "' (shortrt runs LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM)");

  c.hidden = positive_int(root, "hidden_size");
  c.intermediate = positive_int(root, "intermediate_size");
  c.n_layers = positive_int(root, "num_hidden_layers");
  c.n_heads = positive_int(root, "num_attention_heads");
  c.n_kv_heads = optional_int(root, "num_key_value_heads", c.n_heads);
  c.vocab = positive_int(root, "vocab_size");
  c.max_position = optional_int(root, "max_position_embeddings", 2048);
  if (field(root, "head_dim")) {
    c.head_dim = positive_int(root, "head_dim");
  } else {
    if (c.hidden % c.n_heads != 0)
      throw Error("config.json: hidden_size " + std::to_string(c.hidden) +
                  " is not divisible by num_attention_heads " + std::to_string(c.n_heads));
    c.head_dim = c.hidden / c.n_heads;
  }
  if (c.head_dim % 2 != 0) throw Error("config.json: head_dim must be even for RoPE");
  if (c.n_heads % c.n_kv_heads != 0)
    throw Error("config.json: num_attention_heads " + std::to_string(c.n_heads) +
                " is not a multiple of num_key_value_heads " + std::to_string(c.n_kv_heads));
  c.rms_eps = static_cast<float>(number_or(root, "rms_norm_eps", 1e-6));
  if (!(c.rms_eps > 0)) throw Error("config.json: rms_norm_eps must be positive");

  if (const json::Value* act = field(root, "hidden_act")) {
    if (!act->is_string() || act->as_string() != "silu")
      throw Error("unsupported hidden_act '" + (act->is_string() ? act->as_string() : std::string("?")) +
                  "' (shortrt implements SwiGLU with silu)");
  }
  if (bool_or(root, "mlp_bias", false)) throw Error("config.json: mlp_bias=true is not supported");
  bool attention_bias = bool_or(root, "attention_bias", false);
  if (c.architecture == "Qwen2ForCausalLM") {
    c.qkv_bias = true;
    if (bool_or(root, "use_sliding_window", false))
      throw Error("config.json: use_sliding_window=true is not supported");
  } else if (c.architecture == "MistralForCausalLM") {
    c.sliding_window = optional_int(root, "sliding_window", 0);
  }
  if (attention_bias && c.architecture != "Qwen2ForCausalLM") {
    throw Error("config.json: attention_bias=true is not supported for " + c.architecture);
  }
  parse_rope(root, c);
  c.tie_embeddings = bool_or(root, "tie_word_embeddings", false);

  if (const json::Value* eos = field(root, "eos_token_id")) {
    if (eos->is_number()) {
      c.eos_token_ids.push_back(static_cast<int>(eos->as_number()));
    } else if (eos->is_array()) {
      for (const json::Value& e : eos->as_array()) {
        if (!e.is_number()) throw Error("config.json: eos_token_id entries must be integers");
        c.eos_token_ids.push_back(static_cast<int>(e.as_number()));
      }
    } else {
      throw Error("config.json: eos_token_id must be an integer or a list of integers");
    }
  }
  return c;
}

ModelConfig load_config(const std::string& checkpoint_dir) {
  return parse_config(json::parse_file(checkpoint_dir + "/config.json"));
}

}  // namespace shortrt
