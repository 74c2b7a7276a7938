#pragma once

#include <pybind11/numpy.h>

#include <cstdint>

namespace pixfound {

namespace py = pybind11;

// num_threads: at most this many threads (Python passes torch.get_num_threads()).
py::array_t<std::int64_t> topk_peaks(const py::array& maps, py::ssize_t k, py::ssize_t num_threads);

// Top-k peaks (x, y) of float32 maps [G, h, w] upsampled bicubically (align_corners=False, A = -0.75,
// clamped borders) to a full_h x full_w grid, read in the window [top, top + out_h) x [left, left + out_w)
// and never stored at that size beyond one map at a time; ties to the lowest flat index of the window.
py::array_t<std::int64_t> upsample_topk(const py::array& maps, py::ssize_t full_h, py::ssize_t full_w, py::ssize_t top,
                                        py::ssize_t left, py::ssize_t out_h, py::ssize_t out_w, py::ssize_t k);

py::array_t<std::int64_t> local_peaks(const py::array& map, py::ssize_t min_distance, double threshold,
                                      py::ssize_t border_width, py::ssize_t num_peaks);

}  // namespace pixfound
