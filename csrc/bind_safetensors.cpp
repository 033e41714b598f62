#include <pybind11/pybind11.h>
namespace py = pybind11;
void register_safetensors(py::module_& m) { (void)m; }  // placeholder until the safetensors bindings land
