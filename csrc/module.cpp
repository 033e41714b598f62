// The Python extension shortrt._C: one binding file per class, registered here.
#include <pybind11/pybind11.h>

namespace py = pybind11;

void register_safetensors(py::module_& m);  // bind_safetensors.cpp
void register_kernels(py::module_& m);      // bind_kernels.cpp (test hooks for kernels)
void register_engine(py::module_& m);       // bind_engine.cpp
void register_checkpoint(py::module_& m);   // bind_checkpoint.cpp

PYBIND11_MODULE(_C, m) {
  m.doc() = "shortrt C++ runtime";
  register_safetensors(m);
  register_kernels(m);
  register_engine(m);
  register_checkpoint(m);
}
