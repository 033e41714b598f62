// Test hooks for the kernels and the thread pool (numpy in, numpy out). Every
// hook takes the kernel path ("ref" | "avx2" | "avx512" | "avx512bf16" | "amx" | "auto")
// explicitly, so a test can hold the fast path to its reference twin on the same
// input; two more names reach the twins that model instructions and are never
// dispatched: "bf16dp-twin" (vdpbf16ps / vcvtneps2bf16 in scalar C++) and
// "amx-emulated" (the amx algorithm on emulated tiles; needs the avx512 path).
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#include "error.h"
#include "kernels.h"
#include "kernels_q4.h"
#include "threadpool.h"

namespace py = pybind11;
using shortrt::BlockQ8;
using shortrt::KernelTable;
using shortrt::kQ8Block;

void register_kernel_bench(py::module_& m);  // bind_kernel_bench.cpp

namespace {

using F32Array = py::array_t<float, py::array::c_style | py::array::forcecast>;
using U16Array = py::array_t<uint16_t, py::array::c_style | py::array::forcecast>;
using I8Array = py::array_t<int8_t, py::array::c_style | py::array::forcecast>;
using U8Array = py::array_t<uint8_t, py::array::c_style | py::array::forcecast>;

// shortrt::Error -> ValueError naming the problem, whatever translator is registered.
template <class F>
auto value_errors(F&& f) -> decltype(f()) {
  try {
    return f();
  } catch (const shortrt::Error& e) {
    throw py::value_error(e.what());
  }
}

const KernelTable& path_table(const std::string& path) {
  if (path == "bf16dp-twin") return shortrt::detail::bf16dp_twin_table();
  if (path == "amx-emulated") {
    if (!shortrt::avx512_kernels())
      throw py::value_error("kernel path 'amx-emulated' runs its float part on AVX-512; this CPU lacks the avx512 path");
    return shortrt::detail::amx_emulated_table();
  }
  return value_errors([&]() -> const KernelTable& { return shortrt::kernels_by_name(path.c_str()); });
}

void require(bool ok, const std::string& message) {
  if (!ok) throw py::value_error(message);
}

void require_same_size(const py::array& a, const py::array& b, const char* what) {
  require(a.size() == b.size(), std::string(what) + ": inputs have different sizes (" + std::to_string(a.size()) +
                                    " and " + std::to_string(b.size()) + ")");
}

// Blocks as two numpy arrays, scales [n_blocks] and q [n_blocks, 32].
std::vector<BlockQ8> blocks_from(const F32Array& scales, const I8Array& q) {
  require(q.ndim() == 2 && q.shape(1) == kQ8Block && q.shape(0) == scales.size(),
          "q8 blocks: expected scales [n] and q [n, 32], got " + std::to_string(scales.size()) + " scales and q of " +
              std::to_string(q.size()) + " values");
  std::vector<BlockQ8> blocks(static_cast<size_t>(scales.size()));
  for (size_t b = 0; b < blocks.size(); ++b) {
    blocks[b].scale = scales.data()[b];
    std::memcpy(blocks[b].q, q.data() + b * kQ8Block, kQ8Block);
  }
  return blocks;
}

py::tuple blocks_to_numpy(const std::vector<BlockQ8>& blocks) {
  const auto n = static_cast<py::ssize_t>(blocks.size());
  py::array_t<float> scales(n);
  py::array_t<int8_t> q({n, static_cast<py::ssize_t>(kQ8Block)});
  for (py::ssize_t b = 0; b < n; ++b) {
    scales.mutable_data()[b] = blocks[b].scale;
    std::memcpy(q.mutable_data() + b * kQ8Block, blocks[b].q, kQ8Block);
  }
  return py::make_tuple(scales, q);
}

std::vector<BlockQ8> quantize(const KernelTable& k, const float* x, int64_t n) {
  require(n % kQ8Block == 0, "q8 quantization needs a length that is a multiple of 32, got " + std::to_string(n));
  std::vector<BlockQ8> blocks(static_cast<size_t>(n / kQ8Block));
  k.quantize_row_q8(x, n, blocks.data());
  return blocks;
}

// int4 blocks from d and m (fp16 bits, [n]) and the levels q ([n, 32], 0..15, weight order).
std::vector<shortrt::BlockQ4> q4_blocks_from(const U16Array& d, const U16Array& m, const U8Array& q) {
  const int64_t n = static_cast<int64_t>(d.size());
  require(m.size() == n && q.ndim() == 2 && q.shape(0) == n && q.shape(1) == shortrt::kQ4Block,
          "q4 blocks: expected d [n], m [n] and q [n, 32]");
  std::vector<shortrt::BlockQ4> blocks(static_cast<size_t>(n));
  for (int64_t b = 0; b < n; ++b) {
    blocks[b].d = d.data()[b];
    blocks[b].m = m.data()[b];
    const uint8_t* qb = q.data() + b * shortrt::kQ4Block;
    for (int j = 0; j < shortrt::kQ4Block / 2; ++j) {
      require(qb[j] < 16 && qb[j + 16] < 16, "q4 blocks: levels must be in 0..15");
      blocks[b].qs[j] = static_cast<uint8_t>(qb[j] | qb[j + 16] << 4);
    }
  }
  return blocks;
}

py::tuple q4_blocks_to_numpy(const std::vector<shortrt::BlockQ4>& blocks) {
  const auto n = static_cast<py::ssize_t>(blocks.size());
  py::array_t<uint16_t> d(n), m(n);
  py::array_t<uint8_t> q({n, static_cast<py::ssize_t>(shortrt::kQ4Block)});
  for (py::ssize_t b = 0; b < n; ++b) {
    d.mutable_data()[b] = blocks[b].d;
    m.mutable_data()[b] = blocks[b].m;
    for (int j = 0; j < shortrt::kQ4Block / 2; ++j) {
      q.mutable_data()[b * shortrt::kQ4Block + j] = blocks[b].qs[j] & 0x0f;
      q.mutable_data()[b * shortrt::kQ4Block + j + 16] = blocks[b].qs[j] >> 4;
    }
  }
  return py::make_tuple(d, m, q);
}

shortrt::WeightType weight_type_from(const std::string& name) {
  if (name == "f32") return shortrt::WeightType::F32;
  if (name == "bf16") return shortrt::WeightType::BF16;
  if (name == "q8") return shortrt::WeightType::Q8;
  if (name == "q4") return shortrt::WeightType::Q4;
  throw py::value_error("unknown weight type '" + name + "' (expected 'f32', 'bf16', 'q8' or 'q4')");
}

// y = x @ w.T through shortrt::matmul with w stored as wtype on the given path.
// The output has out_stride >= rows columns (NaN beyond rows), to test ldy.
py::array_t<float> kernel_matmul(const F32Array& w, const F32Array& x, const std::string& wtype,
                                 const std::string& path, int threads, int64_t out_stride) {
  require(w.ndim() == 2, "kernel_matmul: w must be 2-D [rows, cols]");
  require(x.ndim() == 2, "kernel_matmul: x must be 2-D [n_tokens, cols]");
  const int64_t rows = w.shape(0), cols = w.shape(1), n_tokens = x.shape(0);
  require(x.shape(1) == cols, "kernel_matmul: x has " + std::to_string(x.shape(1)) + " columns, w has " +
                                  std::to_string(cols));
  const int64_t ldy = out_stride > 0 ? out_stride : rows;
  require(ldy >= rows, "kernel_matmul: out_stride is smaller than the row count");
  const KernelTable& k = path_table(path);

  shortrt::WeightMatrix W;
  W.type = weight_type_from(wtype);
  W.rows = rows;
  W.cols = cols;
  std::vector<uint16_t> bf16, x_bf16;
  std::vector<BlockQ8> w_q8, x_q8;
  std::vector<shortrt::BlockQ4> w_q4;
  std::vector<shortrt::BlockQ4x16> w_q4x16;
  std::vector<float> x_sum;
  shortrt::Activation act;
  act.f32 = x.data();
  switch (W.type) {
    case shortrt::WeightType::F32: W.f32 = w.data(); break;
    case shortrt::WeightType::BF16:
      bf16.resize(static_cast<size_t>(rows * cols));
      shortrt::pack_bf16(w.data(), rows * cols, bf16.data());
      W.bf16 = bf16.data();
      if (k.gemm_bf16_bf16) {  // this path multiplies bf16 weights by bf16 activations
        x_bf16.resize(static_cast<size_t>(n_tokens * cols));
        shortrt::ThreadPool one(1);
        shortrt::round_activation_bf16(k, x.data(), n_tokens, cols, x_bf16.data(), one);
        act.bf16 = x_bf16.data();
      }
      break;
    case shortrt::WeightType::Q8:
      require(cols % kQ8Block == 0, "kernel_matmul: q8 needs cols to be a multiple of 32, got " + std::to_string(cols));
      w_q8 = quantize(k, w.data(), rows * cols);
      x_q8 = quantize(k, x.data(), n_tokens * cols);
      W.q8 = w_q8.data();
      act.q8 = x_q8.data();
      break;
    case shortrt::WeightType::Q4:
      require(cols % kQ8Block == 0, "kernel_matmul: q4 needs cols to be a multiple of 32, got " + std::to_string(cols));
      w_q4.resize(static_cast<size_t>(rows * cols / shortrt::kQ4Block));
      value_errors([&] { shortrt::quantize_q4(w.data(), rows * cols, w_q4.data()); });
      x_q8 = quantize(k, x.data(), n_tokens * cols);
      x_sum.resize(x_q8.size());
      shortrt::activation_block_sums(x_q8.data(), static_cast<int64_t>(x_q8.size()), x_sum.data());
      w_q4x16.resize(static_cast<size_t>(shortrt::q4_groups(rows) * (cols / shortrt::kQ4Block)));
      shortrt::interleave_q4(w_q4.data(), rows, cols / shortrt::kQ4Block, w_q4x16.data());
      W.q4 = w_q4x16.data();
      act.q8 = x_q8.data();
      act.q8_sum = x_sum.data();
      break;
  }
  py::array_t<float> y({static_cast<py::ssize_t>(n_tokens), static_cast<py::ssize_t>(ldy)});
  std::fill(y.mutable_data(), y.mutable_data() + y.size(), std::numeric_limits<float>::quiet_NaN());
  float* out = y.mutable_data();
  {
    py::gil_scoped_release release;
    shortrt::ThreadPool pool(threads);
    value_errors([&] { shortrt::matmul(k, W, act, n_tokens, out, ldy, pool); });
  }
  return y;
}

py::array_t<float> same_shape_f32(const py::array& like) {
  return py::array_t<float>(std::vector<py::ssize_t>(like.shape(), like.shape() + like.ndim()));
}

}  // namespace

void register_kernels(py::module_& m) {
  m.def("kernel_paths", [] {
    std::vector<std::string> paths{"ref"};
    if (shortrt::avx2_kernels()) paths.emplace_back("avx2");
    if (shortrt::avx512_kernels()) paths.emplace_back("avx512");
    if (shortrt::avx512bf16_kernels()) paths.emplace_back("avx512bf16");
    if (shortrt::amx_kernels()) paths.emplace_back("amx");
    return paths;
  }, "Kernel paths this CPU can run, e.g. ['ref', 'avx2', 'avx512', 'avx512bf16'].");
  m.def("kernel_amx_unavailable", [] { return std::string(shortrt::amx_unavailable_reason()); },
        "Why the amx path cannot run here ('' when it can).");
  m.def("round_bf16", [](const F32Array& x, const std::string& path) {
    const KernelTable& k = path_table(path);
    require(k.round_row_bf16 != nullptr, "round_bf16: kernel path '" + path + "' has no bf16 activation rounding");
    py::array_t<uint16_t> out(std::vector<py::ssize_t>(x.shape(), x.shape() + x.ndim()));
    k.round_row_bf16(x.data(), x.size(), out.mutable_data());
    return out;
  }, py::arg("x"), py::arg("path"), "bf16 bits of x as the path rounds activations (vcvtneps2bf16 on avx512bf16).");
  m.def("kernel_active", [] { return std::string(value_errors([]() -> const KernelTable& { return shortrt::kernels(); }).name); },
        "Name of the active kernel path (selected from SHORTRT_KERNELS on first use).");
  m.def("set_kernels", [](const std::string& name) { value_errors([&] { shortrt::set_kernels(name.c_str()); }); },
        py::arg("name"), "Switch the active kernel path: 'ref', 'avx2', 'avx512', 'avx512bf16', 'amx' or 'auto'.");

  m.def("pack_bf16", [](const F32Array& x) {
    py::array_t<uint16_t> out(std::vector<py::ssize_t>(x.shape(), x.shape() + x.ndim()));
    shortrt::pack_bf16(x.data(), x.size(), out.mutable_data());
    return out;
  }, py::arg("x"), "bf16 bit patterns of x (round to nearest even).");
  m.def("quantize_q8", [](const F32Array& x, const std::string& path) {
    return blocks_to_numpy(quantize(path_table(path), x.data(), x.size()));
  }, py::arg("x"), py::arg("path") = "auto", "Quantize x (size % 32 == 0) -> (scales [n/32], q int8 [n/32, 32]).");
  m.def("dequantize_q8", [](const F32Array& scales, const I8Array& q) {
    const std::vector<BlockQ8> blocks = blocks_from(scales, q);
    py::array_t<float> out(static_cast<py::ssize_t>(blocks.size() * kQ8Block));
    for (size_t b = 0; b < blocks.size(); ++b)
      for (int i = 0; i < kQ8Block; ++i) out.mutable_data()[b * kQ8Block + i] = blocks[b].scale * blocks[b].q[i];
    return out;
  }, py::arg("scales"), py::arg("q"), "scale * q of every block, flattened.");

  m.def("quantize_q4", [](const F32Array& x) {
    std::vector<shortrt::BlockQ4> blocks(static_cast<size_t>(x.size() / shortrt::kQ4Block));
    value_errors([&] { shortrt::quantize_q4(x.data(), x.size(), blocks.data()); });
    return q4_blocks_to_numpy(blocks);
  }, py::arg("x"), "Pack x (size % 32 == 0) as int4 -> (d fp16 bits [n/32], m fp16 bits [n/32], q uint8 [n/32, 32]).");
  m.def("q4_interleaved", [](const F32Array& w) {
    require(w.ndim() == 2 && w.shape(1) % shortrt::kQ4Block == 0, "q4_interleaved: expected w [rows, cols], cols % 32 == 0");
    const int64_t rows = w.shape(0), n_blocks = w.shape(1) / shortrt::kQ4Block;
    std::vector<shortrt::BlockQ4> blocks(static_cast<size_t>(rows * n_blocks));
    value_errors([&] { shortrt::quantize_q4(w.data(), rows * n_blocks * shortrt::kQ4Block, blocks.data()); });
    py::array_t<uint8_t> out(static_cast<py::ssize_t>(shortrt::q4_groups(rows) * n_blocks * sizeof(shortrt::BlockQ4x16)));
    shortrt::interleave_q4(blocks.data(), rows, n_blocks, reinterpret_cast<shortrt::BlockQ4x16*>(out.mutable_data()));
    return out;
  }, py::arg("w"), "Test hook: w [rows, cols] packed to int4 and interleaved as the engine holds it, as raw bytes.");
  m.def("dequantize_q4", [](const U16Array& d, const U16Array& m, const U8Array& q) {
    const std::vector<shortrt::BlockQ4> blocks = q4_blocks_from(d, m, q);
    py::array_t<float> out(static_cast<py::ssize_t>(blocks.size() * shortrt::kQ4Block));
    shortrt::dequantize_q4(blocks.data(), static_cast<int64_t>(blocks.size()), out.mutable_data());
    return out;
  }, py::arg("d"), py::arg("m"), py::arg("q"), "d * q + m of every block (two float roundings), flattened.");
  m.def("f32_to_f16", [](const F32Array& x) {
    py::array_t<uint16_t> out(x.size());
    for (py::ssize_t i = 0; i < x.size(); ++i) out.mutable_data()[i] = shortrt::f32_to_f16(x.data()[i]);
    return out;
  }, py::arg("x"), "fp16 bit patterns of x (round to nearest even), flattened.");
  m.def("f16_to_f32", [](const U16Array& h) {
    py::array_t<float> out(h.size());
    for (py::ssize_t i = 0; i < h.size(); ++i) out.mutable_data()[i] = shortrt::f16_to_f32(h.data()[i]);
    return out;
  }, py::arg("h"), "floats of fp16 bit patterns, flattened.");

  m.def("kernel_dot_f32", [](const F32Array& a, const F32Array& b, const std::string& path) {
    require_same_size(a, b, "kernel_dot_f32");
    return path_table(path).dot_f32(a.data(), b.data(), a.size());
  }, py::arg("a"), py::arg("b"), py::arg("path"));
  m.def("kernel_dot_bf16_f32", [](const U16Array& w, const F32Array& x, const std::string& path) {
    require_same_size(w, x, "kernel_dot_bf16_f32");
    return path_table(path).dot_bf16_f32(w.data(), x.data(), x.size());
  }, py::arg("w_bits"), py::arg("x"), py::arg("path"));
  m.def("kernel_dot_q8_q8", [](const F32Array& ws, const I8Array& wq, const F32Array& xs, const I8Array& xq,
                               const std::string& path) {
    const std::vector<BlockQ8> w = blocks_from(ws, wq), x = blocks_from(xs, xq);
    require(w.size() == x.size(), "kernel_dot_q8_q8: w and x have different block counts");
    return path_table(path).dot_q8_q8(w.data(), x.data(), static_cast<int64_t>(w.size()));
  }, py::arg("w_scales"), py::arg("w_q"), py::arg("x_scales"), py::arg("x_q"), py::arg("path"));
  m.def("kernel_axpy", [](float a, const F32Array& x, const F32Array& y, const std::string& path) {
    require_same_size(x, y, "kernel_axpy");
    py::array_t<float> out = same_shape_f32(y);
    std::memcpy(out.mutable_data(), y.data(), sizeof(float) * y.size());
    path_table(path).axpy_f32(a, x.data(), out.mutable_data(), x.size());
    return out;
  }, py::arg("a"), py::arg("x"), py::arg("y"), py::arg("path"), "y + a*x (y is not modified).");
  m.def("kernel_rmsnorm", [](const F32Array& x, const F32Array& weight, float eps, const std::string& path) {
    require_same_size(x, weight, "kernel_rmsnorm");
    require(x.size() > 0, "kernel_rmsnorm: empty input");
    py::array_t<float> out = same_shape_f32(x);
    path_table(path).rmsnorm_f32(x.data(), weight.data(), eps, out.mutable_data(), x.size());
    return out;
  }, py::arg("x"), py::arg("weight"), py::arg("eps"), py::arg("path"));
  m.def("kernel_swiglu", [](const F32Array& gate, const F32Array& up, const std::string& path) {
    require_same_size(gate, up, "kernel_swiglu");
    py::array_t<float> out = same_shape_f32(gate);
    path_table(path).swiglu_f32(gate.data(), up.data(), out.mutable_data(), gate.size());
    return out;
  }, py::arg("gate"), py::arg("up"), py::arg("path"));
  m.def("kernel_softmax", [](const F32Array& x, const std::string& path) {
    py::array_t<float> out = same_shape_f32(x);
    std::memcpy(out.mutable_data(), x.data(), sizeof(float) * x.size());
    path_table(path).softmax_f32(out.mutable_data(), x.size());
    return out;
  }, py::arg("x"), py::arg("path"));
  m.def("kernel_sum", [](const F32Array& x, const std::string& path) { return path_table(path).sum_f32(x.data(), x.size()); },
        py::arg("x"), py::arg("path"));

  m.def("kernel_matmul", &kernel_matmul, py::arg("w"), py::arg("x"), py::arg("wtype") = "f32",
        py::arg("path") = "auto", py::arg("threads") = 1, py::arg("out_stride") = 0,
        "x [n, cols] @ w [rows, cols].T with w stored as 'f32', 'bf16', 'q8' or 'q4' (x quantized to q8 for q8 and q4). "
        "Returns [n, out_stride or rows]; columns past rows stay NaN.");

  m.def("threadpool_visits", [](int64_t n, int64_t grain, int threads, int repeats) {
    // How often each item was visited over `repeats` parallel_for calls, and the largest chunk seen.
    std::vector<std::atomic<int>> visits(static_cast<size_t>(n < 0 ? 0 : n));
    std::atomic<int64_t> largest{0};
    {
      py::gil_scoped_release release;
      shortrt::ThreadPool pool(threads);
      for (int i = 0; i < repeats; ++i)
        pool.parallel_for(n, grain, [&](int64_t begin, int64_t end) {
          for (int64_t j = begin; j < end; ++j) visits[j].fetch_add(1, std::memory_order_relaxed);
          int64_t seen = largest.load();
          while (end - begin > seen && !largest.compare_exchange_weak(seen, end - begin)) {
          }
        });
    }
    py::array_t<int32_t> out(static_cast<py::ssize_t>(visits.size()));
    for (size_t j = 0; j < visits.size(); ++j) out.mutable_data()[j] = visits[j].load();
    return py::make_tuple(out, largest.load());
  }, py::arg("n"), py::arg("grain"), py::arg("threads"), py::arg("repeats") = 1);
  m.def("threadpool_throw_at", [](int64_t n, int threads, int64_t bad_item) {
    // A chunk throws shortrt::Error at bad_item; the pool must rethrow it on the caller and stay usable.
    py::gil_scoped_release release;
    shortrt::ThreadPool pool(threads);
    std::atomic<int64_t> total{0};
    try {
      pool.parallel_for(n, 1, [&](int64_t begin, int64_t end) {
        for (int64_t j = begin; j < end; ++j)
          if (j == bad_item) throw shortrt::Error("item " + std::to_string(j) + " failed");
      });
    } catch (const shortrt::Error& e) {
      pool.parallel_for(n, 1, [&](int64_t begin, int64_t end) { total += end - begin; });
      throw py::value_error(std::string(e.what()) + "; pool then covered " + std::to_string(total.load()) + " items");
    }
  }, py::arg("n"), py::arg("threads"), py::arg("bad_item"));

  register_kernel_bench(m);
}
