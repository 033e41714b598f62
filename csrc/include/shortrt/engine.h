// shortrt public C++ API: load a (pruned) checkpoint directory and generate tokens.
//
// This is the only header an embedding application needs. It exposes no
// internal types: the engine's weights, scratch and KV cache stay behind a
// pimpl. Every error (bad checkpoint, bad option, prompt too long) is thrown
// as a std::runtime_error subclass whose message names the problem: misuse of
// an engine as UsageError, a worker thread the OS refused as std::system_error.
//
// Threads: an Engine may be shared. Calls to generate() and logits() from
// several threads run one at a time (each waits for the one before), and
// cancel() may be called from any thread. A callback must not call back into
// its own engine: that throws UsageError instead of deadlocking.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

namespace shortrt {

// The engine was used in a way it cannot serve (a call from inside its own
// callback), or a logits() call was stopped before it finished. Not derived
// from the input-error type, so Python raises RuntimeError.
struct UsageError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// The architecture as read from config.json (after validation).
struct ModelConfig {
  std::string architecture;  // "LlamaForCausalLM" | "MistralForCausalLM" | "Qwen2ForCausalLM" | "Qwen3ForCausalLM"
                             // | "Olmo2ForCausalLM" | "Phi3ForCausalLM" | "Gemma3ForCausalLM"
  int hidden = 0;            // hidden_size
  int intermediate = 0;      // intermediate_size
  int n_layers = 0;          // num_hidden_layers of the checkpoint
  int n_heads = 0;           // num_attention_heads
  int n_kv_heads = 0;        // num_key_value_heads (GQA)
  int head_dim = 0;          // head_dim, or hidden / n_heads
  int vocab = 0;             // vocab_size
  int max_position = 0;      // max_position_embeddings
  float rms_eps = 1e-6f;     // rms_norm_eps
  float rope_theta = 10000.0f;
  std::string rope_type = "default";  // "default" | "linear" | "llama3" | "longrope"
  float rope_factor = 1.0f;           // linear and llama3
  float rope_low_freq_factor = 1.0f;  // llama3
  float rope_high_freq_factor = 4.0f; // llama3
  int rope_original_max_position = 0; // llama3; longrope: the context the short factors serve
  // Phi-3's longrope: inv_freq[i] = 1 / (factor[i] * theta^(2i / rotary_dim)), factor = the short list while a
  // sequence is at most rope_original_max_position long, the long list beyond; cos and sin times
  // rope_attention_factor. A request that grows past it is prefilled again with the long ones (engine.cpp).
  std::vector<float> rope_short_factor, rope_long_factor;  // [rotary_dim / 2] each
  float rope_attention_factor = 1.0f;
  bool tie_embeddings = false;        // tie_word_embeddings
  bool qkv_bias = false;              // Qwen2
  bool qk_norm = false;               // Qwen3, OLMo-2: RMSNorm of q and k before RoPE
  bool qk_norm_whole = false;         // OLMo-2: that norm spans the whole projection, not each head (Qwen3)
  bool post_norm = false;             // OLMo-2: layer norms on each sublayer's output, no input norms
  bool fused_projections = false;     // Phi-3: self_attn.qkv_proj and mlp.gate_up_proj tensors
  int rotary_dim = 0;                 // leading dims of each head RoPE rotates (head_dim; Phi-3 partial_rotary_factor)
  int sliding_window = 0;             // Mistral's window (0 = none; max_seq may not exceed it), or the
                                      // window of Gemma 3's sliding_attention layers
  // Gemma 3 (all off elsewhere): input_layernorm / post_attention_layernorm around the attention and
  // pre_ / post_feedforward_layernorm around the MLP; RMSNorms scale by (1 + w); GeGLU with tanh GELU.
  bool sandwich_norm = false;
  bool norm_unit_offset = false;
  bool gelu_tanh = false;
  float embed_scale = 1.0f;           // the embedding times this (Gemma 3: sqrt(hidden) as float32)
  float attn_scale = 0.0f;            // scores times this (query_pre_attn_scalar ** -0.5); 0: 1/sqrt(head_dim)
  float final_softcap = 0.0f;         // logits = cap * tanh(logits / cap); 0: none
  std::vector<char> layer_sliding;    // per checkpoint layer: 1 = sliding_attention (empty: none)
  float rope_local_theta = 0.0f;      // RoPE base of the sliding layers (plain RoPE)
  std::vector<int> eos_token_ids;     // eos_token_id (int or list)
};

struct EngineOptions {
  std::string dtype = "fp32";    // weight format: "fp32" | "bf16" | "int8" | "int4"
  // Format of the LM head (the output projection, read every token and never
  // shrunk by pruning): "auto" (int8 when dtype is int4, else dtype) | "same"
  // (= dtype) | "fp32" | "bf16" | "int8" | "int4". With tied embeddings the
  // embedding table stays in dtype; one copy serves both when the formats agree.
  std::string lm_head_dtype = "auto";
  // KV cache format: "fp32" | "f16" | "bf16" (half the bytes) | "int8" (a quarter, plus one
  // fp32 scale per kv head and position for K and for V).
  std::string kv_dtype = "fp32";
  int threads = 0;               // 0 = all cores
  int max_seq = 0;               // 0 = min(max_position_embeddings, 2048)
  int max_batch = 1;             // sequences running at once (each has its own KV region)
  std::vector<int> skip_layers;  // checkpoint layer indices not to run (never read from disk)
  // A prompt is prefilled in chunks of this many tokens (0 = 64), always the same
  // chunks whatever else runs, so a sequence gives the same bits alone or batched.
  int prefill_chunk = 0;
  // Rows of one step (0 = max_batch + prefill_chunk, the least that lets a chunk
  // of prefill run beside max_batch decoding sequences).
  int step_tokens = 0;
};

// Smallest temperature that samples: a finite temperature below it (0
// included) is greedy, since logits / temperature overflows float long before
// 0 and the distribution tends to argmax anyway. NaN or negative is an error.
constexpr float kMinSamplingTemperature = 1e-4f;

struct GenerationOptions {
  int max_new_tokens = 64;   // >= 0; prompt + max_new_tokens must fit in max_seq
  float temperature = 0.0f;  // 0 = greedy; < kMinSamplingTemperature is greedy too
  int top_k = 0;             // >= 0; 0 = no top-k cut
  float top_p = 1.0f;        // nucleus mass in (0, 1]
  uint64_t seed = 0;
  // Generation of a sequence ends when it produces one of these (not returned).
  // use_default_stop = true means: the config's eos_token_id(s).
  std::vector<int> stop_tokens;
  bool use_default_stop = true;
  // Polled on the calling thread before every forward pass (each prefill chunk,
  // each decode step) and while waiting for another thread's call to finish.
  // Returning true ends generate() early with the tokens produced so far; an
  // exception it throws propagates. The Python binding checks Ctrl-C here.
  std::function<bool()> should_stop;
};

// Called once per generated token, on the thread that called generate():
// (sequence index in the batch, token id). Returning false stops that sequence
// (the token itself is kept); an exception it throws propagates out of generate().
using TokenCallback = std::function<bool(int sequence, int token)>;

enum class FinishReason { None, Stop, Length, Cancelled };
const char* finish_reason_name(FinishReason reason);  // "", "stop", "length", "cancelled"

// What one step did for one request.
struct RequestEvent {
  uint64_t request = 0;
  int token = -1;  // the new output token, or -1 when the step ended the request without one
  // Stop: a stop token was sampled (not output; token is -1). Length: max_new_tokens
  // reached (this event carries the last token). Cancelled: cancel() was called.
  FinishReason finish = FinishReason::None;
};

struct EngineStats {
  int running = 0;               // requests holding a KV region
  int queued = 0;                // requests waiting for one
  int max_batch = 0;             // KV regions
  std::size_t kv_bytes = 0;      // the whole KV cache
  std::size_t kv_bytes_used = 0; // the regions held by running requests
  uint64_t tokens_generated = 0;
  uint64_t requests_finished = 0;
  uint64_t steps = 0;
};

class Engine {
 public:
  static std::unique_ptr<Engine> load(const std::string& checkpoint_dir,
                                      const EngineOptions& options = {});
  ~Engine();
  Engine(const Engine&) = delete;
  Engine& operator=(const Engine&) = delete;

  // Generates for every prompt (at most max_batch of them); returns the new
  // tokens of each. Each result equals what generating that prompt alone gives.
  std::vector<std::vector<int>> generate(const std::vector<std::vector<int>>& prompts,
                                         const GenerationOptions& options,
                                         const TokenCallback& on_token = {});

  // The request-level interface (continuous batching). submit() and cancel() may be
  // called from any thread, also while step() runs in another; step() runs one
  // forward pass over every running request: one new token for each decoding one
  // plus, within step_tokens, chunks of the prompts still prefilling. Requests
  // wait in a queue for a free KV region; a finished or cancelled request frees
  // its region at once. Events come in order per request. generate() is a loop
  // over these, so a request gives the same tokens alone, batched, or via generate().
  uint64_t submit(const std::vector<int>& prompt, const GenerationOptions& options);
  void cancel(uint64_t request);  // unknown or finished ids are ignored
  std::vector<RequestEvent> step();
  bool has_work() const;          // something running, queued, or an event not yet returned
  EngineStats stats() const;
  int prefill_chunk() const;
  int step_tokens() const;

  // Logits of every position of one sequence: [tokens.size()][vocab], row-major.
  // chunk = tokens per forward pass: 0 = the prefill chunk (512), 1 = token by
  // token through the KV cache as in decoding (tests compare the two).
  // should_stop is polled before each forward pass; true abandons the call
  // (throws UsageError), an exception it throws propagates.
  std::vector<float> logits(const std::vector<int>& tokens, int chunk = 0,
                            const std::function<bool()>& should_stop = {});

  // Makes every generate() already running or waiting on this engine, on any
  // thread, return after its current forward pass with the tokens produced so
  // far (a logits() call throws UsageError), and cancels every submitted
  // request. Calls and requests that start later are not affected.
  // Thread-safe and does not wait: for shutdown, or a server dropping its work.
  void cancel();

  const ModelConfig& config() const;
  std::size_t kv_cache_bytes() const;   // K and V (and int8 scales) for all retained attentions
  std::size_t weight_bytes() const;     // weights held to run the plan (tied embedding counted once)
  std::size_t weight_bytes_per_token() const;  // weights read per decoded token
  int n_layers_run() const;             // decoder layers executed per token
  int n_attention_layers() const;       // KV slots
  std::vector<int> layers_run() const;  // checkpoint indices of executed layers
  int max_seq() const;
  int max_batch() const;
  int threads() const;
  const std::string& dtype() const;
  const std::string& kv_dtype() const;
  const std::string& lm_head_dtype() const;  // resolved: never "same" or "auto"

 private:
  struct Impl;
  explicit Engine(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace shortrt
