#pragma once

#include <pybind11/numpy.h>

#include <cstdint>

namespace pixfound {

namespace py = pybind11;

py::array_t<float> image_attention(const py::array& q, const py::array& k, const py::array& image_start,
                                   const py::array& image_len, const py::array& key_start, const py::array& key_end,
                                   double scale, py::ssize_t num_image_keys, const py::object& gap_start,
                                   const py::object& gap_end, const py::object& out, py::ssize_t num_threads);

// The same for several layers at once (one query and key array per layer), summed into one result.
py::array_t<float> image_attention_layers(const py::sequence& queries, const py::sequence& keys,
                                          const py::sequence& scales, const py::array& image_start,
                                          const py::array& image_len, const py::array& key_start,
                                          const py::array& key_end, py::ssize_t num_image_keys,
                                          const py::object& gap_start, const py::object& gap_end,
                                          const py::object& out, py::ssize_t num_threads);

}  // namespace pixfound
