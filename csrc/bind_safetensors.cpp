// Python binding of the safetensors reader and the JSON parser:
// shortrt._C.SafetensorsFile, Checkpoint, parse_safetensors, parse_json and
// FormatError.
//
// Errors: shortrt::Error -> shortrt._C.FormatError (a ValueError);
// shortrt::OsError -> the OSError subclass of its errno (FileNotFoundError
// for a missing file). The translator is registered once here, module-local,
// and applies to every binding of _C, so the engine's errors map the same way.
//
// numpy(name) returns a read-only view of the mapped bytes (no copy). The
// array's base is the owning SafetensorsFile/Checkpoint object, so the mapping
// lives as long as any array does. BF16 has no numpy dtype: it comes back as
// uint16 holding the raw bits (widen with `(a.astype(np.uint32) << 16).view(np.float32)`).
// The F8_* types come back as uint8 bits in the tensor's shape; the packed
// 4- and 6-bit types (F4, F6_*) as a flat uint8 array of their bytes.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <memory>

#include "error.h"
#include "json.h"
#include "safetensors.h"

namespace py = pybind11;
using shortrt::Checkpoint;
using shortrt::SafetensorsFile;
using shortrt::TensorView;

namespace {

const char* numpy_dtype(shortrt::DType dtype) {
  using shortrt::DType;
  switch (dtype) {
    case DType::F64: return "<f8";
    case DType::F32: return "<f4";
    case DType::F16: return "<f2";
    case DType::BF16: return "<u2";  // raw bits; see the file comment
    case DType::I64: return "<i8";
    case DType::I32: return "<i4";
    case DType::I16: return "<i2";
    case DType::I8: return "i1";
    case DType::U8: return "u1";
    case DType::BOOL: return "?";
    case DType::U16: return "<u2";
    case DType::U32: return "<u4";
    case DType::U64: return "<u8";
    case DType::C64: return "<c8";
    case DType::F8_E5M2: case DType::F8_E4M3: case DType::F8_E8M0: case DType::F8_E4M3FNUZ:
    case DType::F8_E5M2FNUZ: return "u1";  // raw bits
    case DType::F4: case DType::F6_E2M3: case DType::F6_E3M2: return "u1";  // packed bytes, see tensor_array
  }
  throw shortrt::Error("no numpy dtype for this tensor");
}

py::tuple info_tuple(const TensorView& t) {
  return py::make_tuple(shortrt::dtype_name(t.dtype), py::tuple(py::cast(t.shape)), t.nbytes);
}

// A zero-copy, read-only array over t.data that keeps `owner` alive.
py::array tensor_array(const TensorView& t, py::handle owner) {
  py::dtype dtype(numpy_dtype(t.dtype));
  if (shortrt::dtype_size(t.dtype) == 0) {  // sub-byte elements: the packed bytes
    py::array array(dtype, {static_cast<py::ssize_t>(t.nbytes)}, {py::ssize_t{1}}, t.data, owner);
    array.attr("flags").attr("writeable") = false;
    return array;
  }
  std::vector<py::ssize_t> shape(t.shape.begin(), t.shape.end());
  std::vector<py::ssize_t> strides(shape.size());
  py::ssize_t stride = static_cast<py::ssize_t>(shortrt::dtype_size(t.dtype));
  for (size_t i = shape.size(); i-- > 0;) {
    strides[i] = stride;
    // Only an empty tensor can get here with dims this large ([0, 2^40, 2^40]).
    if (__builtin_mul_overflow(stride, shape[i], &stride))
      throw shortrt::Error("tensor '" + t.name + "' has shape " + shortrt::shape_string(t.shape) +
                           ", too large for a numpy array");
  }
  py::array array(dtype, shape, strides, t.data, owner);
  // pybind marks arrays with a non-array base writeable; the mapping is PROT_READ.
  array.attr("flags").attr("writeable") = false;
  return array;
}

py::object json_to_python(const shortrt::json::Value& v) {
  using Type = shortrt::json::Value::Type;
  switch (v.type()) {
    case Type::Null: return py::none();
    case Type::Bool: return py::bool_(v.as_bool());
    case Type::Number:
      if (v.is_integer_literal()) return py::int_(v.as_int());
      return py::float_(v.as_number());
    case Type::String: return py::str(v.as_string());
    case Type::Array: {
      py::list out;
      for (const auto& item : v.as_array()) out.append(json_to_python(item));
      return std::move(out);
    }
    case Type::Object: {
      py::dict out;
      for (const auto& [key, item] : v.as_object()) out[py::str(key)] = json_to_python(item);
      return std::move(out);
    }
  }
  return py::none();
}

void translate_errors(std::exception_ptr p, PyObject* format_error) {
  try {
    if (p) std::rethrow_exception(p);
  } catch (const shortrt::OsError& e) {
    // OSError(errno, message) constructs the matching subclass, e.g. FileNotFoundError.
    PyObject* exc = PyObject_CallFunction(PyExc_OSError, "is", e.errno_value, e.what());
    if (exc) {
      PyErr_SetObject(reinterpret_cast<PyObject*>(Py_TYPE(exc)), exc);
      Py_DECREF(exc);
    }
  } catch (const shortrt::Error& e) {
    PyErr_SetString(format_error, e.what());
  }
}

}  // namespace

void register_safetensors(py::module_& m) {
  py::exception<shortrt::Error> format_error(m, "FormatError", PyExc_ValueError);
  format_error.doc() = "A file or document is malformed; the message names the file and the problem.";
  // One reference is kept for the life of the process (the translator outlives
  // any module teardown order), so the type object can never dangle.
  static PyObject* format_error_type = format_error.inc_ref().ptr();
  py::register_local_exception_translator([](std::exception_ptr p) { translate_errors(p, format_error_type); });

  m.def("parse_json", [](const std::string& text) { return json_to_python(shortrt::json::parse(text)); },
        py::arg("text"),
        "Parse text with shortrt's strict JSON parser (integers stay int, other numbers float).");

  m.def("parse_safetensors",
        [](py::bytes data, const std::string& name) {
          std::string bytes = data;  // a copy the views point into, alive for this call
          shortrt::SafetensorsContents contents;
          {
            py::gil_scoped_release release;
            contents = shortrt::parse_safetensors(reinterpret_cast<const uint8_t*>(bytes.data()), bytes.size(), name);
          }
          py::list tensors;
          const size_t data_start = 8 + contents.header_size;
          for (const TensorView& t : contents.tensors)
            tensors.append(py::make_tuple(t.name, shortrt::dtype_name(t.dtype), py::tuple(py::cast(t.shape)),
                                          t.offset - data_start, t.offset - data_start + t.nbytes));
          py::dict out;
          out["header_size"] = contents.header_size;
          out["tensors"] = tensors;
          out["metadata"] = contents.metadata;
          return out;
        },
        py::arg("data"), py::arg("name") = "<bytes>",
        "Parse and validate a whole safetensors file image held in memory, exactly as SafetensorsFile does: "
        "{'header_size': N, 'tensors': [(name, dtype, shape, begin, end), ...] in data order, 'metadata': {...}} "
        "(begin/end relative to the data section), or FormatError naming `name`.");

  py::class_<SafetensorsFile, std::shared_ptr<SafetensorsFile>>(m, "SafetensorsFile",
                                                               "A read-only memory-mapped .safetensors file.")
      .def(py::init<const std::string&>(), py::arg("path"))
      .def_property_readonly("path", &SafetensorsFile::path)
      .def_property_readonly("file_size", &SafetensorsFile::file_size)
      .def_property_readonly("header_size", &SafetensorsFile::header_size)
      .def_property_readonly("metadata", &SafetensorsFile::metadata)
      .def("names", &SafetensorsFile::names, "Tensor names in data-offset order.")
      .def("info", [](const SafetensorsFile& f, const std::string& name) { return info_tuple(f.get(name)); },
           py::arg("name"), "(dtype, shape, nbytes) of a tensor, e.g. ('F32', (4, 8), 128).")
      .def("offset", [](const SafetensorsFile& f, const std::string& name) { return f.get(name).offset; },
           py::arg("name"), "Byte offset of the tensor's data within the file.")
      .def("numpy", [](py::object self, const std::string& name) {
             return tensor_array(self.cast<const SafetensorsFile&>().get(name), self);
           },
           py::arg("name"), "Zero-copy read-only view of a tensor (BF16 as uint16 bits).")
      .def("prefetch", &SafetensorsFile::prefetch)
      .def("__contains__", &SafetensorsFile::has)
      .def("__len__", &SafetensorsFile::size)
      .def("__repr__", [](const SafetensorsFile& f) {
        return "SafetensorsFile('" + f.path() + "', " + std::to_string(f.size()) + " tensors)";
      });

  py::class_<Checkpoint, std::shared_ptr<Checkpoint>>(m, "Checkpoint",
                                                      "All safetensors files of a checkpoint directory.")
      .def(py::init<const std::string&>(), py::arg("dir"))
      .def_property_readonly("dir", &Checkpoint::dir)
      .def_property_readonly("total_bytes", &Checkpoint::total_bytes)
      .def_property_readonly("files", [](const Checkpoint& c) {
        std::vector<std::string> paths;
        for (const auto& f : c.files()) paths.push_back(f->path());
        return paths;
      })
      .def("names", &Checkpoint::names)
      .def("info", [](const Checkpoint& c, const std::string& name) { return info_tuple(c.get(name)); },
           py::arg("name"))
      .def("file_of", &Checkpoint::file_of, py::arg("name"))
      .def("numpy", [](py::object self, const std::string& name) {
             return tensor_array(self.cast<const Checkpoint&>().get(name), self);
           },
           py::arg("name"))
      .def("check_shape",
           [](const Checkpoint& c, const std::string& name, const std::vector<int64_t>& shape) {
             return info_tuple(c.get(name, shape));
           },
           py::arg("name"), py::arg("shape"), "info(name), or FormatError if the shape differs.")
      .def("prefetch", &Checkpoint::prefetch)
      .def("__contains__", &Checkpoint::has)
      .def("__len__", &Checkpoint::size)
      .def("__repr__", [](const Checkpoint& c) {
        return "Checkpoint('" + c.dir() + "', " + std::to_string(c.size()) + " tensors)";
      });
}
