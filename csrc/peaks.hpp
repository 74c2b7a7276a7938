#pragma once

#include <pybind11/numpy.h>

#include <cstdint>

namespace pixfound {

namespace py = pybind11;

py::array_t<std::int64_t> topk_peaks(const py::array& maps, py::ssize_t k);

py::array_t<std::int64_t> local_peaks(const py::array& map, py::ssize_t min_distance, double threshold,
                                      py::ssize_t border_width, py::ssize_t num_peaks);

}  // namespace pixfound
