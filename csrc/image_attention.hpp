#pragma once

#include <pybind11/numpy.h>

#include <cstdint>

namespace pixfound {

namespace py = pybind11;

py::array_t<float> image_attention(const py::array& q, const py::array& k, const py::array& image_start,
                                   const py::array& image_len, const py::array& key_start, const py::array& key_end,
                                   double scale, py::ssize_t num_image_keys, const py::object& gap_start,
                                   const py::object& gap_end, const py::object& out);

}  // namespace pixfound
