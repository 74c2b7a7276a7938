#pragma once

#include <pybind11/numpy.h>

#include <cstdint>

namespace pixfound {

namespace py = pybind11;

struct PackedMasks {
  py::array_t<std::uint64_t> words;  // [N, ceil(H*W/64)], bit b of word k is pixel 64*k + b (row-major)
  py::array_t<std::int64_t> areas;   // [N] pixel count of each mask
  py::ssize_t height;
  py::ssize_t width;
};

// num_threads: at most this many threads (Python passes torch.get_num_threads()).
PackedMasks pack_masks(const py::array& masks, py::ssize_t num_threads);

py::array_t<float> packed_iou(const py::array_t<std::uint64_t>& a_words, const py::array_t<std::int64_t>& a_areas,
                              const py::array_t<std::uint64_t>& b_words, const py::array_t<std::int64_t>& b_areas,
                              double empty, py::ssize_t num_threads);

}  // namespace pixfound
