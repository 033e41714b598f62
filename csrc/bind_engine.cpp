// Python binding of shortrt::Engine as shortrt._C.Engine (wrapped by shortrt/engine.py).
// shortrt::Error becomes shortrt._C.FormatError (a ValueError) via the
// translator in bind_safetensors.cpp; shortrt::UsageError and a refused worker
// thread (std::system_error) become RuntimeError.
//
// Calls that compute (load, generate, logits) run without the GIL, and three
// rules keep them safe next to Python's own threads and its shutdown:
//  - The GIL is taken back by hand, never in a destructor, and never once the
//    interpreter is finalizing: a daemon thread that asks for the GIL then is
//    ended with pthread_exit, a forced unwind that aborts the process when it
//    meets a destructor (pybind11's gil_scoped_release). Such a thread sleeps
//    until the process exits instead, touching nothing.
//  - The per-token callback and the Ctrl-C poll call Python through the C API
//    (no C++ object that would need the GIL to be destroyed) and carry a
//    Python exception out of the engine as PythonErrorRaised, re-raised here.
//  - An atexit hook cancels every call in flight and waits (up to 3 s) until
//    they are back in Python; calls that start after it raise RuntimeError.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#if defined(__GLIBCXX__)
#include <cxxabi.h>
#endif

#include <algorithm>
#include <cfloat>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <exception>
#include <optional>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "attention.h"
#include "error.h"
#include "kernels.h"
#include "kv_cache.h"
#include "shortrt/engine.h"

namespace py = pybind11;
using shortrt::Engine;

namespace {

// ---- computing without the GIL ---------------------------------------------

bool interpreter_finalizing() {
#if PY_VERSION_HEX >= 0x030D0000
  return Py_IsFinalizing();
#else
  return _Py_IsFinalizing();
#endif
}

// Takes the GIL back for this thread, or, once Python is finalizing (when
// taking it would end the thread by a forced unwind), sleeps until the process
// exits: nothing of Python may be touched any more, and the engine it uses is
// kept alive by the Python frame that called it.
void take_gil(PyThreadState* ts) {
  if (interpreter_finalizing())
    for (;;) std::this_thread::sleep_for(std::chrono::hours(1));
  PyEval_RestoreThread(ts);
}

// Thrown through the engine by the callback / poll below once they have
// stashed the Python exception; the binding re-raises that exception.
struct PythonErrorRaised {};

// Runs f() without the GIL; rethrows what it threw once the GIL is back. `ts`
// holds this thread's state meanwhile, for code inside f() that takes the GIL.
template <class F>
auto without_gil(F&& f, PyThreadState*& ts) -> decltype(f()) {
  ts = PyEval_SaveThread();
  std::exception_ptr error;
  std::optional<decltype(f())> result;
  try {
    result.emplace(f());
#if defined(__GLIBCXX__)
  } catch (abi::__forced_unwind&) {
    throw;  // Python is ending this thread at exit: the GIL is not ours to touch
#endif
  } catch (...) {
    error = std::current_exception();
  }
  take_gil(ts);
  if (error) std::rethrow_exception(error);
  return std::move(*result);
}

// Calls computing right now (GIL-protected; an engine appears once per call),
// and whether the interpreter has begun exiting (no new call may start).
std::vector<Engine*>& calls_in_flight() {
  static auto* calls = new std::vector<Engine*>();  // never destroyed: the atexit hook may outlive statics
  return *calls;
}
bool g_exiting = false;

// One generate() or logits() call: the GIL-free part, the Ctrl-C poll, the
// per-token callback and the exception they may carry. Made with the GIL held.
class Call {
 public:
  explicit Call(Engine& e) : engine_(e) {
    if (g_exiting)
      throw std::runtime_error("shortrt: the interpreter is exiting; this Engine no longer generates");
    // Python runs signal handlers (KeyboardInterrupt) on the main thread only.
    py::object main = py::module_::import("threading").attr("main_thread")();
    poll_signals_ = main.attr("ident").cast<unsigned long>() == PyThread_get_thread_ident();
    calls_in_flight().push_back(&engine_);
  }
  ~Call() {
    auto& calls = calls_in_flight();
    calls.erase(std::find(calls.begin(), calls.end(), &engine_));
    Py_XDECREF(err_type_);
    Py_XDECREF(err_value_);
    Py_XDECREF(err_traceback_);
  }
  Call(const Call&) = delete;
  Call& operator=(const Call&) = delete;

  // f() without the GIL; raises the Python exception a poll or callback caught.
  template <class F>
  auto run(F&& f) -> decltype(f()) {
    last_poll_ = std::chrono::steady_clock::now();
    try {
      return without_gil(f, ts_);
    } catch (const PythonErrorRaised&) {
      PyErr_Restore(err_type_, err_value_, err_traceback_);
      err_type_ = err_value_ = err_traceback_ = nullptr;
      throw py::error_already_set();
    }
  }

  // GenerationOptions::should_stop, without the GIL: on the main thread, at
  // most every kPollInterval, takes the GIL to run Python's signal handlers.
  bool poll() {
    if (!poll_signals_) return false;
    const auto now = std::chrono::steady_clock::now();
    if (now - last_poll_ < kPollInterval) return false;
    last_poll_ = now;
    take_gil(ts_);
    const bool raised = PyErr_CheckSignals() != 0;
    if (raised) stash_error();
    ts_ = PyEval_SaveThread();
    if (raised) throw PythonErrorRaised{};
    return false;
  }

  // The TokenCallback, without the GIL: callback(seq, token); None or a true
  // value goes on, a false value stops the sequence, an exception ends the call.
  bool call_back(PyObject* callback, int seq, int token) {
    take_gil(ts_);
    PyObject* r = PyObject_CallFunction(callback, "ii", seq, token);
    int go_on = 1;
    if (r && r != Py_None) go_on = PyObject_IsTrue(r);
    Py_XDECREF(r);
    const bool raised = !r || go_on < 0;
    if (raised) stash_error();
    ts_ = PyEval_SaveThread();
    if (raised) throw PythonErrorRaised{};
    return go_on != 0;
  }

 private:
  static constexpr std::chrono::milliseconds kPollInterval{5};

  void stash_error() { PyErr_Fetch(&err_type_, &err_value_, &err_traceback_); }

  Engine& engine_;
  PyThreadState* ts_ = nullptr;
  bool poll_signals_ = false;
  std::chrono::steady_clock::time_point last_poll_;
  PyObject *err_type_ = nullptr, *err_value_ = nullptr, *err_traceback_ = nullptr;
};

// atexit: cancel every call in flight and give them up to 3 s to return to
// Python (the GIL released meanwhile, so their callbacks can run). Cancelling
// again on each round catches a call that read its cancel epoch late.
void stop_generation_at_exit() {
  g_exiting = true;
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(3);
  while (!calls_in_flight().empty() && std::chrono::steady_clock::now() < deadline) {
    for (Engine* e : calls_in_flight()) e->cancel();
    Py_BEGIN_ALLOW_THREADS
    std::this_thread::sleep_for(std::chrono::milliseconds(2));
    Py_END_ALLOW_THREADS
  }
}

std::string number(double v) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%g", v);
  return buf;
}

// Python ints the engine takes as int: a clear ValueError naming the argument
// instead of pybind11's conversion error.
int int_arg(int64_t value, int64_t lo, const char* name) {
  if (value < lo || value > INT32_MAX)
    throw std::invalid_argument(std::string(name) + " must be an integer in [" + std::to_string(lo) + ", " +
                                std::to_string(INT32_MAX) + "], got " + std::to_string(value));
  return static_cast<int>(value);
}

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
                             int max_batch, const std::vector<int>& skip_layers, int prefill_chunk, int step_tokens,
                             const std::string& kv_dtype, const std::string& lm_head_dtype) {
  shortrt::EngineOptions o;
  o.dtype = dtype;
  o.kv_dtype = kv_dtype;
  o.lm_head_dtype = lm_head_dtype;
  o.threads = threads;
  o.max_seq = max_seq;
  o.max_batch = max_batch;
  o.skip_layers = skip_layers;
  o.prefill_chunk = prefill_chunk;
  o.step_tokens = step_tokens;
  PyThreadState* ts = nullptr;
  return without_gil([&] { return Engine::load(path, o); }, ts);
}

// The checked GenerationOptions of a generate() or submit() call.
shortrt::GenerationOptions generation_options(int64_t max_new_tokens, double temperature, int64_t top_k, double top_p,
                                              py::handle seed, const std::optional<std::vector<int>>& stop) {
  shortrt::GenerationOptions o;
  o.max_new_tokens = int_arg(max_new_tokens, 0, "max_new_tokens");
  if (!(temperature >= 0.0) || !std::isfinite(temperature))
    throw std::invalid_argument("temperature must be a finite number >= 0, got " + number(temperature));
  o.temperature = static_cast<float>(std::min<double>(temperature, FLT_MAX));  // below 1e-4: greedy
  o.top_k = int_arg(top_k, 0, "top_k");
  if (!(top_p > 0.0 && top_p <= 1.0)) throw std::invalid_argument("top_p must be in (0, 1], got " + number(top_p));
  o.top_p = static_cast<float>(top_p);
  PyObject* seed_int = PyNumber_Index(seed.ptr());  // any integer type (numpy's too), not a float
  o.seed = seed_int ? PyLong_AsUnsignedLongLong(seed_int) : 0;
  Py_XDECREF(seed_int);
  if (PyErr_Occurred()) {
    PyErr_Clear();
    throw std::invalid_argument("seed must be an integer in [0, 2**64), got " + std::string(py::repr(seed)));
  }
  if (stop) {
    o.use_default_stop = false;
    o.stop_tokens = *stop;
  }
  return o;
}

std::vector<std::vector<int>> generate(Engine& e, const std::vector<std::vector<int>>& prompts, int64_t max_new_tokens,
                                       double temperature, int64_t top_k, double top_p, py::handle seed,
                                       std::optional<std::vector<int>> stop, py::handle callback) {
  // seed and callback are handles, not objects: if Python ends this thread at
  // exit while it computes, no destructor must need the GIL on the way out.
  shortrt::GenerationOptions o = generation_options(max_new_tokens, temperature, top_k, top_p, seed, stop);
  Call call(e);
  o.should_stop = [&call] { return call.poll(); };
  shortrt::TokenCallback on_token;
  if (!callback.is_none()) {
    PyObject* fn = callback.ptr();  // the caller's reference keeps it alive for the whole call
    on_token = [&call, fn](int seq, int token) { return call.call_back(fn, seq, token); };
  }
  return call.run([&] { return e.generate(prompts, o, on_token); });
}

uint64_t submit(Engine& e, const std::vector<int>& prompt, int64_t max_new_tokens, double temperature, int64_t top_k,
                double top_p, py::handle seed, std::optional<std::vector<int>> stop) {
  return e.submit(prompt, generation_options(max_new_tokens, temperature, top_k, top_p, seed, stop));
}

// [(request, token, finish)] with finish None while the request runs.
py::list step(Engine& e) {
  std::vector<shortrt::RequestEvent> events;
  {
    Call call(e);  // counted as in flight: the atexit hook cancels every request and waits for it
    events = call.run([&] { return e.step(); });
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
    Call call(e);
    values = call.run([&] { return e.logits(tokens, chunk, [&call] { return call.poll(); }); });
  }
  const py::ssize_t vocab = e.config().vocab;
  py::array_t<float> out({static_cast<py::ssize_t>(tokens.size()), vocab});
  std::memcpy(out.mutable_data(), values.data(), values.size() * sizeof(float));
  return out;
}

// The kernel table a test hook runs: "ref", "avx2" or "avx512" (which need the CPU
// to have them and, for attend_head, head_dim % 8 == 0; the engine's table would run
// the reference then).
const shortrt::KernelTable& attention_path(const std::string& path, int hd, const char* who) {
  if (path == "avx2" || path == "avx512") {
    const shortrt::KernelTable* t = path == "avx2" ? shortrt::avx2_kernels() : shortrt::avx512_kernels();
    if (!t) throw std::invalid_argument(std::string(who) + ": this CPU has no " + (path == "avx2" ? "AVX2/FMA" : "AVX-512"));
    if (hd % 8 != 0) throw std::invalid_argument(std::string(who) + ": the " + path + " path needs head_dim % 8 == 0");
    return *t;
  }
  if (path == "ref") return shortrt::reference_kernels();
  throw std::invalid_argument(std::string(who) + ": path must be 'ref', 'avx2' or 'avx512'");
}

shortrt::KvType kv_type_arg(const std::string& kv_dtype, const char* who) {
  try {
    return shortrt::kv_type_of(kv_dtype);
  } catch (const shortrt::Error& e) {
    throw std::invalid_argument(std::string(who) + ": " + e.what());
  }
}

// Rows of `hd` values (row r at x + r * stride) stored in a kv_dtype as the engine's
// KvCache stores them: elements with the same stride, and one scale per row (int8).
struct StoredRows {
  shortrt::KvType type;
  std::vector<uint8_t> data;
  std::vector<float> scales;
  size_t elem;
  StoredRows(shortrt::KvType t, const float* x, int64_t n_rows, int64_t stride, int hd)
      : type(t), data(), scales(n_rows, 1.0f), elem(shortrt::kv_element_bytes(t)) {
    data.assign(static_cast<size_t>(n_rows * stride) * elem, 0);
    for (int64_t r = 0; r < n_rows; ++r)
      shortrt::kv_store_row(t, x + r * stride, hd, data.data() + r * stride * elem, &scales[r]);
  }
  const void* ptr() const { return data.data(); }
};

using F32In = py::array_t<float, py::array::c_style | py::array::forcecast>;

// Test hook: rows x [n, hd] stored in kv_dtype and read back as float (int8 times its row
// scale): what the attention kernels see of them.
py::array_t<float> kv_round_trip(F32In x, const std::string& kv_dtype) {
  if (x.ndim() != 2 || x.shape(1) < 1) throw std::invalid_argument("kv_round_trip: x must be [n, head_dim]");
  const shortrt::KvType t = kv_type_arg(kv_dtype, "kv_round_trip");
  const int64_t n = x.shape(0);
  const int hd = static_cast<int>(x.shape(1));
  StoredRows rows(t, x.data(), n, hd, hd);
  py::array_t<float> out({x.shape(0), x.shape(1)});
  for (int64_t r = 0; r < n; ++r)
    shortrt::kv_load_row(t, rows.data.data() + r * hd * rows.elem, rows.scales[r], hd, out.mutable_data() + r * hd);
  return out;
}

// Runs the kernel table's attend_partial entry of `type` on stored rows.
void run_partial(const shortrt::KernelTable& k, shortrt::KvType type, const float* q, int group, const StoredRows& K,
                 const StoredRows& V, int64_t stride, int64_t n, int hd, float scale, float* acc, float* m, float* l) {
  switch (type) {
    case shortrt::KvType::F32:
      return k.attend_partial(q, group, static_cast<const float*>(K.ptr()), static_cast<const float*>(V.ptr()), stride,
                              n, hd, scale, acc, m, l);
    case shortrt::KvType::F16:
      return k.attend_partial_f16(q, group, static_cast<const uint16_t*>(K.ptr()),
                                  static_cast<const uint16_t*>(V.ptr()), stride, n, hd, scale, acc, m, l);
    case shortrt::KvType::BF16:
      return k.attend_partial_bf16(q, group, static_cast<const uint16_t*>(K.ptr()),
                                   static_cast<const uint16_t*>(V.ptr()), stride, n, hd, scale, acc, m, l);
    case shortrt::KvType::Q8:
      return k.attend_partial_q8(q, group, static_cast<const int8_t*>(K.ptr()), static_cast<const int8_t*>(V.ptr()),
                                 stride, K.scales.data(), V.scales.data(), 1, n, hd, scale, acc, m, l);
  }
}

// Test hook: the decode kernel on the "ref", "avx2" or "avx512" path for one group of
// query heads q [group, hd] (or one head [hd]) sharing keys / values [n, stride >= hd]
// (stored in kv_dtype first): softmax(scale * keys @ q_g) @ values for each head.
py::array_t<float> attend_head(F32In q, F32In keys, F32In values, float scale, const std::string& path,
                               const std::string& kv_dtype) {
  if (q.ndim() < 1 || q.ndim() > 2 || keys.ndim() != 2 || values.ndim() != 2 || keys.shape(0) != values.shape(0) ||
      keys.shape(1) != values.shape(1) || keys.shape(1) < q.shape(q.ndim() - 1) || keys.shape(0) < 1)
    throw std::invalid_argument("attend_head: q [hd] or [group, hd], keys and values [n, stride >= hd], n >= 1");
  const int hd = static_cast<int>(q.shape(q.ndim() - 1));
  const int group = q.ndim() == 2 ? static_cast<int>(q.shape(0)) : 1;
  if (hd > 512) throw std::invalid_argument("attend_head: head_dim > 512");
  if (group < 1 || group > shortrt::kMaxAttendGroup)
    throw std::invalid_argument("attend_head: group must be 1.." + std::to_string(shortrt::kMaxAttendGroup));
  const shortrt::KernelTable& k = attention_path(path, hd, "attend_head");
  const shortrt::KvType type = kv_type_arg(kv_dtype, "attend_head");
  const int64_t n = keys.shape(0), stride = keys.shape(1);
  const StoredRows K(type, keys.data(), n, stride, hd), V(type, values.data(), n, stride, hd);
  std::vector<float> acc(static_cast<size_t>(group) * hd), m(group), l(group);
  run_partial(k, type, q.data(), group, K, V, stride, n, hd, scale, acc.data(), m.data(), l.data());
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
// keys / values [n_keys, n_kv_heads * hd] (stored in kv_dtype first, one scale per
// position and kv head for int8) -> [n_heads, hd].
py::array_t<float> attention_decode(F32In q, F32In keys, F32In values, int n_kv_heads, const std::string& path,
                                    int threads, const std::string& kv_dtype) {
  if (q.ndim() != 2 || keys.ndim() != 2 || values.ndim() != 2 || keys.shape(0) != values.shape(0) ||
      keys.shape(1) != values.shape(1) || keys.shape(0) < 1 || n_kv_heads < 1 || q.shape(0) % n_kv_heads != 0 ||
      keys.shape(1) != n_kv_heads * q.shape(1))
    throw std::invalid_argument("attention_decode: q [n_heads, hd], keys and values [n, n_kv_heads * hd], "
                                "n_heads a multiple of n_kv_heads, n >= 1");
  const int hd = static_cast<int>(q.shape(1));
  if (hd > 512) throw std::invalid_argument("attention_decode: head_dim > 512");
  const shortrt::KernelTable& k = attention_path(path, hd, "attention_decode");
  const shortrt::KvType type = kv_type_arg(kv_dtype, "attention_decode");
  // [position][kv_head] rows of hd: as rows of a [n * n_kv_heads, hd] matrix.
  const int64_t n_rows = keys.shape(0) * n_kv_heads;
  const StoredRows K(type, keys.data(), n_rows, hd, hd), V(type, values.data(), n_rows, hd, hd);
  shortrt::AttentionArgs args;
  args.qkv = q.data();
  args.qkv_dim = q.shape(0) * hd;
  args.kv_type = type;
  args.keys = K.ptr();
  args.values = V.ptr();
  args.kv_row_stride = keys.shape(1);  // this hook takes [position][kv_head][head_dim]
  args.kv_head_stride = hd;
  args.key_scales = K.scales.data();
  args.value_scales = V.scales.data();
  args.scale_row_stride = n_kv_heads;
  args.scale_head_stride = 1;
  args.n = 1;
  args.pos = static_cast<int>(keys.shape(0)) - 1;
  args.n_heads = static_cast<int>(q.shape(0));
  args.n_kv_heads = n_kv_heads;
  args.head_dim = hd;
  py::array_t<float> out({q.shape(0), q.shape(1)});
  args.out = out.mutable_data();
  shortrt::ThreadPool pool(threads);
  shortrt::AttentionScratch scratch(static_cast<int>(keys.shape(0)), args.n_heads, n_kv_heads, hd);
  shortrt::attention_decode(args, scratch, pool, k);
  return out;
}

// Test hook: prefill attention of the last q.shape(0) positions over the whole cache, as the
// engine runs it (attention_matmul): q [n, n_heads, hd], keys / values [n_keys, n_kv_heads * hd]
// (stored in kv_dtype first), query token t at position n_keys - n + t -> [n, n_heads, hd].
py::array_t<float> attention_prefill(F32In q, F32In keys, F32In values, int n_kv_heads, const std::string& path,
                                     int threads, const std::string& kv_dtype, bool matmuls, int repeat) {
  if (q.ndim() != 3 || keys.ndim() != 2 || values.ndim() != 2 || keys.shape(0) != values.shape(0) ||
      keys.shape(1) != values.shape(1) || n_kv_heads < 1 || q.shape(1) % n_kv_heads != 0 || q.shape(0) < 1 ||
      keys.shape(0) < q.shape(0) || keys.shape(1) != n_kv_heads * q.shape(2))
    throw std::invalid_argument("attention_prefill: q [n, n_heads, hd], keys and values [n_keys >= n, n_kv_heads * hd], "
                                "n_heads a multiple of n_kv_heads, n >= 1");
  const int hd = static_cast<int>(q.shape(2));
  if (hd > 512) throw std::invalid_argument("attention_prefill: head_dim > 512");
  const shortrt::KernelTable& k = attention_path(path, hd, "attention_prefill");
  const shortrt::KvType type = kv_type_arg(kv_dtype, "attention_prefill");
  const int64_t n_rows = keys.shape(0) * n_kv_heads;
  const StoredRows K(type, keys.data(), n_rows, hd, hd), V(type, values.data(), n_rows, hd, hd);
  shortrt::AttentionArgs args;
  args.qkv = q.data();
  args.qkv_dim = q.shape(1) * hd;
  args.kv_type = type;
  args.keys = K.ptr();
  args.values = V.ptr();
  args.kv_row_stride = keys.shape(1);
  args.kv_head_stride = hd;
  args.key_scales = K.scales.data();
  args.value_scales = V.scales.data();
  args.scale_row_stride = n_kv_heads;
  args.scale_head_stride = 1;
  args.n = static_cast<int>(q.shape(0));
  args.pos = static_cast<int>(keys.shape(0) - q.shape(0));
  args.n_heads = static_cast<int>(q.shape(1));
  args.n_kv_heads = n_kv_heads;
  args.head_dim = hd;
  py::array_t<float> out({q.shape(0), q.shape(1), q.shape(2)});
  args.out = out.mutable_data();
  shortrt::ThreadPool pool(threads);
  shortrt::AttentionScratch scratch(static_cast<int>(keys.shape(0)), args.n_heads, n_kv_heads, hd);
  for (int i = 0; i < std::max(1, repeat); ++i) {
    py::gil_scoped_release release;
    if (matmuls) shortrt::attention_matmul_blocks(args, scratch, pool, k);
    else shortrt::attention_matmul(args, scratch, pool, k);
  }
  return out;
}

}  // namespace

void register_engine(py::module_& m) {
  py::class_<Engine>(m, "Engine", "The C++ inference engine over one checkpoint directory.")
      .def(py::init(&load), py::arg("path"), py::arg("dtype") = "fp32", py::arg("threads") = 0,
           py::arg("max_seq") = 0, py::arg("max_batch") = 1, py::arg("skip_layers") = std::vector<int>{},
           py::arg("prefill_chunk") = 0, py::arg("step_tokens") = 0, py::arg("kv_dtype") = "fp32",
           py::arg("lm_head_dtype") = "auto")
      .def("submit", &submit, py::arg("prompt"), py::arg("max_new_tokens") = 64, py::arg("temperature") = 0.0,
           py::arg("top_k") = 0, py::arg("top_p") = 1.0, py::arg("seed") = 0, py::arg("stop") = py::none(),
           "Queue a request; returns its id. Thread-safe.")
      .def("step", &step,
           "One forward pass over every running request (GIL released): [(request, token, finish)], token -1 "
           "when the step ended the request without a new token, finish None, 'stop', 'length' or 'cancelled'.")
      .def("cancel_request", py::overload_cast<uint64_t>(&Engine::cancel), py::arg("request"),
           py::call_guard<py::gil_scoped_release>(),
           "Cancel a request (thread-safe; its KV region is freed at once, or by the step in flight).")
      .def("stats", &stats)
      .def_property_readonly("has_work", &Engine::has_work)
      .def_property_readonly("prefill_chunk", &Engine::prefill_chunk)
      .def_property_readonly("step_tokens", &Engine::step_tokens)
      .def("generate", &generate, py::arg("prompts"), py::arg("max_new_tokens") = 64,
           py::arg("temperature") = 0.0, py::arg("top_k") = 0, py::arg("top_p") = 1.0, py::arg("seed") = 0,
           py::arg("stop") = py::none(), py::arg("callback") = py::none(),
           "New token ids for each prompt. callback(seq, token) -> bool|None runs per token on the calling "
           "thread; False stops that sequence, an exception ends the call. stop=None means the config's "
           "eos_token_id(s). Temperatures below 1e-4 are greedy. Calls from several threads run one at a "
           "time; a call from inside this engine's own callback raises RuntimeError. Ctrl-C interrupts it "
           "(KeyboardInterrupt) within a few milliseconds.")
      .def("logits", &logits, py::arg("tokens"), py::arg("chunk") = 0,
           "Logits of every position: float32 [len(tokens), vocab]. chunk = tokens per forward pass "
           "(0 = prefill chunk, 1 = token by token through the KV cache).")
      .def("cancel", py::overload_cast<>(&Engine::cancel),
           "Makes the calls running or waiting on this engine (any thread) return after their current token "
           "with the tokens so far. Later calls are not affected.")
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
      .def_property_readonly("dtype", &Engine::dtype)
      .def_property_readonly("kv_dtype", &Engine::kv_dtype)
      .def_property_readonly("lm_head_dtype", &Engine::lm_head_dtype);
  py::module_::import("atexit").attr("register")(py::cpp_function(&stop_generation_at_exit));
  m.def("attend_head", &attend_head, py::arg("q"), py::arg("keys"), py::arg("values"), py::arg("scale"),
        py::arg("path"), py::arg("kv_dtype") = "fp32",
        "Test hook: softmax(scale * keys @ q_g) @ values for each head g of q ([hd] or [group, hd]) on the "
        "'ref', 'avx2' or 'avx512' decode attention kernel, keys and values stored in kv_dtype first.");
  m.def("attention_decode", &attention_decode, py::arg("q"), py::arg("keys"), py::arg("values"),
        py::arg("n_kv_heads"), py::arg("path"), py::arg("threads") = 2, py::arg("kv_dtype") = "fp32",
        "Test hook: the engine's decode attention of one token over keys/values [n, n_kv_heads * hd].");
  m.def("attention_prefill", &attention_prefill, py::arg("q"), py::arg("keys"), py::arg("values"),
        py::arg("n_kv_heads"), py::arg("path"), py::arg("threads") = 2, py::arg("kv_dtype") = "fp32",
        py::arg("matmuls") = false, py::arg("repeat") = 1,
        "Test hook: the engine's prefill attention of the last n positions over keys/values [n_keys, n_kv_heads * hd] "
        "(matmuls=True: the matmul path a sliding window runs; repeat: run it that many times, for benchmarks).");
  m.def("kv_round_trip", &kv_round_trip, py::arg("x"), py::arg("kv_dtype"),
        "Test hook: rows x [n, head_dim] stored in kv_dtype and read back as float (what attention sees).");
  m.def("kernel_f16_to_f32", [](py::array_t<uint16_t, py::array::c_style | py::array::forcecast> bits,
                                 const std::string& path) {
          const shortrt::KernelTable& k = attention_path(path, 8, "kernel_f16_to_f32");
          py::array_t<float> out(bits.size());
          k.f16_to_f32_row(bits.data(), bits.size(), out.mutable_data());
          return out;
        }, py::arg("bits"), py::arg("path"),
        "Test hook: f16 bit patterns to float on a kernel path's f16_to_f32_row (prefill's KV conversion).");
  m.def("kv_row_bytes", [](const std::string& kv_dtype, int head_dim) {
          return shortrt::kv_row_bytes(kv_type_arg(kv_dtype, "kv_row_bytes"), head_dim);
        }, py::arg("kv_dtype"), py::arg("head_dim"),
        "Bytes of one KV-cache row (one kv head's key, or value, at one position) in kv_dtype: head_dim "
        "elements, plus an fp32 scale for int8.");
}
