// Shared argument checks for the pybind11 entry points: every bad input becomes a Python
// ValueError that names the argument and its shape, never a crash.
#pragma once

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cstdint>
#include <string>

namespace pixfound {

namespace py = pybind11;

// Built with std::to_string, not std::ostringstream: on the GPU machine's image every message that
// went through a stream segfaulted (presumably another libstdc++ loaded first), so bad input crashed.
inline std::string shape_str(const py::array& a) {
  std::string s = "(";
  for (py::ssize_t i = 0; i < a.ndim(); ++i) s += (i ? ", " : "") + std::to_string(a.shape(i));
  return s + (a.ndim() == 1 ? ",)" : ")");
}

// NumPy's name of a dtype ("float64", "int32", "bool") from its kind and size: an error message
// is built without calling back into Python.
inline std::string dtype_name(const py::dtype& dt) {
  const char kind = dt.kind();
  const auto bits = std::to_string(8 * dt.itemsize());
  switch (kind) {
    case 'b': return "bool";
    case 'f': return "float" + bits;
    case 'i': return "int" + bits;
    case 'u': return "uint" + bits;
    case 'c': return "complex" + bits;
    case 'O': return "object";
    default: return std::string("kind '") + kind + "' of " + std::to_string(dt.itemsize()) + " bytes";
  }
}

[[noreturn]] inline void fail(const std::string& msg) { throw py::value_error(msg); }

inline void require_ndim(const py::array& a, const char* name, py::ssize_t ndim, const char* layout) {
  if (a.ndim() != ndim) {
    fail(std::string(name) + " must be a " + std::to_string(ndim) + "-d array " + layout + ", got shape " +
         shape_str(a));
  }
}

inline void require_c_contiguous(const py::array& a, const char* name) {
  if (!(a.flags() & py::array::c_style)) {
    fail(std::string(name) + " must be C-contiguous (shape " + shape_str(a) +
         "); pass np.ascontiguousarray(...) or tensor.contiguous()");
  }
}

inline void require_non_empty(const py::array& a, const char* name) {
  for (py::ssize_t i = 0; i < a.ndim(); ++i) {
    if (a.shape(i) == 0) fail(std::string(name) + " must not be empty, got shape " + shape_str(a));
  }
}

// Masks: bool or uint8, nonzero means "inside".
inline void require_mask_dtype(const py::array& a, const char* name) {
  const auto dt = a.dtype();
  const char kind = dt.kind();
  if (dt.itemsize() != 1 || (kind != 'b' && kind != 'u')) {
    fail(std::string(name) + " must be bool or uint8, got dtype " + dtype_name(dt) + " with shape " +
         shape_str(a));
  }
}

}  // namespace pixfound
