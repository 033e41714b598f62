// Benchmark hooks for benchmarks/kernels.py: the timed loops run in C++ with
// the GIL released, so Python overhead never enters a measurement. Each returns
// {"wall": [...], "cpu": [...]}: wall-clock and process CPU seconds of every
// timed iteration. CPU / wall / threads shows how much of the machine the run
// got, which matters on a shared machine.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <chrono>
#include <ctime>
#include <cstdlib>
#include <cstring>
#include <string>
#include <utility>
#include <vector>

#include "error.h"
#include "kernels.h"
#include "kernels_q4.h"
#include "page_buffer.h"
#include "threadpool.h"

namespace py = pybind11;
using shortrt::BlockQ8;
using shortrt::KernelTable;
using shortrt::kQ8Block;

namespace {

using Clock = std::chrono::steady_clock;

double seconds_since(Clock::time_point start) {
  return std::chrono::duration<double>(Clock::now() - start).count();
}

double process_cpu_seconds() {
  timespec ts;
  clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
  return static_cast<double>(ts.tv_sec) + 1e-9 * static_cast<double>(ts.tv_nsec);
}

struct Timings {
  std::vector<double> wall, cpu;
  py::dict to_dict() const {
    py::dict d;
    d["wall"] = wall;
    d["cpu"] = cpu;
    return d;
  }
};

// Uniform values in [-1, 1) from xorshift64: fast enough to fill hundreds of MB.
void fill_random(float* x, size_t n, uint64_t seed) {
  uint64_t s = seed * 0x9E3779B97F4A7C15ull + 1;
  for (size_t i = 0; i < n; ++i) {
    s ^= s << 13;
    s ^= s >> 7;
    s ^= s << 17;
    x[i] = static_cast<float>(static_cast<int64_t>(s >> 40) - (int64_t{1} << 23)) / static_cast<float>(1 << 23);
  }
}

const KernelTable& table(const std::string& path) {
  try {
    return shortrt::kernels_by_name(path.c_str());
  } catch (const shortrt::Error& e) {
    throw py::value_error(e.what());
  }
}

// One weight matrix with its own storage, so a sequence of them streams from
// memory the way a model's layers do (no matrix is still in cache when reused).
struct OwnedWeight {
  shortrt::PageBuffer storage;
  shortrt::WeightMatrix view;
};

OwnedWeight make_weight(int64_t rows, int64_t cols, shortrt::WeightType type, uint64_t seed, bool huge_pages) {
  const size_t n = static_cast<size_t>(rows * cols);
  std::vector<float> values(n);
  fill_random(values.data(), n, seed);
  shortrt::WeightMatrix view;
  view.type = type;
  view.rows = rows;
  view.cols = cols;
  OwnedWeight w{shortrt::PageBuffer(view.bytes(), huge_pages), view};
  switch (type) {
    case shortrt::WeightType::F32:
      std::memcpy(w.storage.as<float>(), values.data(), n * sizeof(float));
      w.view.f32 = w.storage.as<float>();
      break;
    case shortrt::WeightType::BF16:
      shortrt::pack_bf16(values.data(), static_cast<int64_t>(n), w.storage.as<uint16_t>());
      w.view.bf16 = w.storage.as<uint16_t>();
      break;
    case shortrt::WeightType::Q8:
      shortrt::reference_kernels().quantize_row_q8(values.data(), static_cast<int64_t>(n), w.storage.as<BlockQ8>());
      w.view.q8 = w.storage.as<BlockQ8>();
      break;
    case shortrt::WeightType::Q4:
      shortrt::quantize_q4(values.data(), static_cast<int64_t>(n), w.storage.as<shortrt::BlockQ4>());
      shortrt::interleave_q4(w.storage.as<shortrt::BlockQ4>(), rows, cols / shortrt::kQ4Block,
                             w.storage.as<shortrt::BlockQ4x16>());  // in place, as the loader does
      w.view.q4 = w.storage.as<shortrt::BlockQ4x16>();
      break;
  }
  return w;
}

shortrt::WeightType weight_type_from(const std::string& name) {
  if (name == "f32") return shortrt::WeightType::F32;
  if (name == "bf16") return shortrt::WeightType::BF16;
  if (name == "q8") return shortrt::WeightType::Q8;
  if (name == "q4") return shortrt::WeightType::Q4;
  throw py::value_error("unknown weight type '" + name + "' (expected 'f32', 'bf16', 'q8' or 'q4')");
}

// Seconds per pass of summing a buffer of `mbytes` MB with the path's sum_f32,
// split over the pool in 256 KB chunks (4 KB or transparent 2 MB pages).
Timings bench_read_bandwidth(double mbytes, const std::string& path, int threads, int iters, bool huge_pages) {
  const KernelTable& k = table(path);
  const size_t n = static_cast<size_t>(mbytes * 1e6 / sizeof(float));
  if (n == 0 || iters <= 0) throw py::value_error("bench_read_bandwidth: need mbytes > 0 and iters > 0");
  py::gil_scoped_release release;
  shortrt::PageBuffer storage(n * sizeof(float), huge_pages);
  float* buffer = storage.as<float>();
  fill_random(buffer, n, 7);
  constexpr int64_t kChunk = 65536;  // floats
  const int64_t n_chunks = static_cast<int64_t>((n + kChunk - 1) / kChunk);
  std::vector<float> sink(static_cast<size_t>(n_chunks));
  shortrt::ThreadPool pool(threads);
  Timings times;
  for (int it = -1; it < iters; ++it) {  // iteration -1 warms up
    const auto start = Clock::now();
    const double cpu_start = process_cpu_seconds();
    pool.parallel_for(n_chunks, 1, [&](int64_t begin, int64_t end) {
      for (int64_t c = begin; c < end; ++c) {
        const int64_t first = c * kChunk, count = std::min<int64_t>(kChunk, static_cast<int64_t>(n) - first);
        sink[c] = k.sum_f32(buffer + first, count);
      }
    });
    if (it >= 0) {
      times.wall.push_back(seconds_since(start));
      times.cpu.push_back(process_cpu_seconds() - cpu_start);
    }
  }
  return times;
}

// Seconds per iteration of running matmul on every shape once, in order, with
// n_tokens activations (q8: including the activation quantization); weights in
// 4 KB pages or, with huge_pages, in transparent 2 MB pages.
Timings bench_matmuls(const std::vector<std::pair<int64_t, int64_t>>& shapes, const std::string& wtype,
                                  const std::string& path, int threads, int64_t n_tokens, int iters, bool huge_pages) {
  const KernelTable& k = table(path);
  const shortrt::WeightType type = weight_type_from(wtype);
  if (shapes.empty() || n_tokens <= 0 || iters <= 0)
    throw py::value_error("bench_matmuls: need at least one shape, n_tokens > 0 and iters > 0");
  int64_t max_rows = 0, max_cols = 0;
  for (const auto& [rows, cols] : shapes) {
    if (rows <= 0 || cols <= 0 || (type != shortrt::WeightType::F32 && type != shortrt::WeightType::BF16 && cols % kQ8Block != 0))
      throw py::value_error("bench_matmuls: bad shape [" + std::to_string(rows) + ", " + std::to_string(cols) + "]");
    max_rows = std::max(max_rows, rows);
    max_cols = std::max(max_cols, cols);
  }
  py::gil_scoped_release release;
  std::vector<OwnedWeight> weights;
  weights.reserve(shapes.size());
  for (size_t i = 0; i < shapes.size(); ++i)
    weights.push_back(make_weight(shapes[i].first, shapes[i].second, type, 1000 + i, huge_pages));
  std::vector<float> x(static_cast<size_t>(n_tokens * max_cols)), y(static_cast<size_t>(n_tokens * max_rows));
  std::vector<BlockQ8> x_q8(static_cast<size_t>(n_tokens * max_cols / kQ8Block + 1));
  std::vector<float> x_sum(x_q8.size());
  std::vector<uint16_t> x_bf16(static_cast<size_t>(n_tokens * max_cols));
  fill_random(x.data(), x.size(), 3);
  shortrt::ThreadPool pool(threads);
  shortrt::Activation act{x.data(), nullptr};
  Timings times;
  for (int it = -1; it < iters; ++it) {
    const auto start = Clock::now();
    const double cpu_start = process_cpu_seconds();
    for (const OwnedWeight& w : weights) {
      if (type == shortrt::WeightType::Q8 || type == shortrt::WeightType::Q4) {
        // quantize_activation_q8 uses the active path; do the same on the benchmarked one.
        const int64_t nb = w.view.cols / kQ8Block;
        pool.parallel_for(n_tokens, 8, [&](int64_t begin, int64_t end) {
          k.quantize_row_q8(x.data() + begin * w.view.cols, (end - begin) * w.view.cols, x_q8.data() + begin * nb);
        });
        act.q8 = x_q8.data();
        if (type == shortrt::WeightType::Q4) {
          shortrt::activation_block_sums(x_q8.data(), n_tokens * nb, x_sum.data());
          act.q8_sum = x_sum.data();
        }
      }
      if (type == shortrt::WeightType::BF16 && k.gemm_bf16_bf16) {  // the engine rounds once per input, timed too
        shortrt::round_activation_bf16(k, x.data(), n_tokens, w.view.cols, x_bf16.data(), pool);
        act.bf16 = x_bf16.data();
      }
      shortrt::matmul(k, w.view, act, n_tokens, y.data(), w.view.rows, pool);
    }
    if (it >= 0) {
      times.wall.push_back(seconds_since(start));
      times.cpu.push_back(process_cpu_seconds() - cpu_start);
    }
  }
  return times;
}

// Seconds of `calls` back-to-back parallel_for calls of n_items trivial items
// (grain 1) per iteration: the pool's dispatch and join cost.
Timings bench_parallel_for(int threads, int64_t n_items, int calls, int iters) {
  if (n_items <= 0 || calls <= 0 || iters <= 0) throw py::value_error("bench_parallel_for: need positive sizes");
  py::gil_scoped_release release;
  shortrt::ThreadPool pool(threads);
  std::vector<int64_t> sink(static_cast<size_t>(n_items));
  Timings times;
  for (int it = -1; it < iters; ++it) {
    const auto start = Clock::now();
    const double cpu_start = process_cpu_seconds();
    for (int c = 0; c < calls; ++c)
      pool.parallel_for(n_items, 1, [&](int64_t begin, int64_t end) {
        for (int64_t i = begin; i < end; ++i) sink[i] += i;
      });
    if (it >= 0) {
      times.wall.push_back(seconds_since(start));
      times.cpu.push_back(process_cpu_seconds() - cpu_start);
    }
  }
  return times;
}

}  // namespace

void register_kernel_bench(py::module_& m) {
  m.def("bench_read_bandwidth", [](double mbytes, const std::string& path, int threads, int iters, bool huge_pages) {
    return bench_read_bandwidth(mbytes, path, threads, iters, huge_pages).to_dict();
  }, py::arg("mbytes"), py::arg("path"), py::arg("threads"), py::arg("iters"), py::arg("huge_pages") = false, "Seconds per pass of summing an mbytes buffer (read bandwidth).");
  m.def("bench_matmuls", [](const std::vector<std::pair<int64_t, int64_t>>& shapes, const std::string& wtype,
                            const std::string& path, int threads, int64_t n_tokens, int iters, bool huge_pages) {
    return bench_matmuls(shapes, wtype, path, threads, n_tokens, iters, huge_pages).to_dict();
  }, py::arg("shapes"), py::arg("wtype"), py::arg("path"), py::arg("threads"),
        py::arg("n_tokens"), py::arg("iters"), py::arg("huge_pages") = false,
        "Seconds per pass of matmul over every [rows, cols] shape once (each with its own random weights).");
  m.def("bench_parallel_for", [](int threads, int64_t n_items, int calls, int iters) {
    return bench_parallel_for(threads, n_items, calls, iters).to_dict();
  }, py::arg("threads"), py::arg("n_items"), py::arg("calls"), py::arg("iters"),
        "Seconds per `calls` parallel_for calls of n_items trivial items (dispatch + join cost).");
}
