#pragma once

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

namespace pixfound {

namespace py = pybind11;

// COCO compressed RLE strings (the "counts" of pycocotools' encode) of bool/uint8 masks [N, H, W],
// read in C order: column-major runs are taken straight from the row-major masks, no transposed copy.
py::list rle_encode(const py::array& masks);

}  // namespace pixfound
