// pixfound._C: the compiled core. Thin bindings; argument checks live beside each op.
#include <pybind11/pybind11.h>

#include "image_attention.hpp"
#include "mask_iou.hpp"
#include "peaks.hpp"
#include "rle.hpp"

namespace py = pybind11;

PYBIND11_MODULE(_C, m) {
  m.doc() = "pixfound compiled core: bit-packed mask IoU, RLE encoding, peak finding and the capture's host path";

  m.def(
      "pack_masks",
      [](const py::array& masks, py::ssize_t num_threads) {
        auto packed = pixfound::pack_masks(masks, num_threads);
        return py::make_tuple(packed.words, packed.areas, packed.height, packed.width);
      },
      py::arg("masks"), py::arg("num_threads") = 1,
      "Pack bool/uint8 masks [N,H,W] into (words uint64 [N,ceil(H*W/64)], areas int64 [N], H, W); "
      "on at most num_threads threads.");
  m.def("packed_iou", &pixfound::packed_iou, py::arg("a_words"), py::arg("a_areas"), py::arg("b_words"),
        py::arg("b_areas"), py::arg("empty") = 1.0, py::arg("num_threads") = 1,
        "IoU float32 [N,M] between two packed mask sets, on at most num_threads threads.");
  m.def("rle_encode", &pixfound::rle_encode, py::arg("masks"),
        "COCO compressed RLE counts (bytes, as pycocotools' encode) of C-contiguous bool/uint8 masks [N,H,W].");
  m.def("topk_peaks", &pixfound::topk_peaks, py::arg("maps"), py::arg("k") = 1, py::arg("num_threads") = 1,
        "Top-k (x, y) per map of float maps [G,H,W] -> int64 [G,k,2]; ties to the lowest flat index; "
        "on at most num_threads threads.");
  m.def("upsample_topk", &pixfound::upsample_topk, py::arg("maps"), py::arg("full_h"), py::arg("full_w"),
        py::arg("top"), py::arg("left"), py::arg("out_h"), py::arg("out_w"), py::arg("k") = 1,
        "Top-k (x, y) of float32 maps [G,h,w] bicubically upsampled to full_h x full_w (align_corners=False), "
        "within the window [top, top+out_h) x [left, left+out_w) -> int64 [G,k,2]; ties to the lowest flat index.");
  m.def("local_peaks", &pixfound::local_peaks, py::arg("map"), py::arg("min_distance"), py::arg("threshold"),
        py::arg("border_width"), py::arg("num_peaks"),
        "Local maxima (x, y) of a float map [H,W], strongest first, as skimage.feature.peak_local_max.");
  m.def("image_attention", &pixfound::image_attention, py::arg("q"), py::arg("k"), py::arg("image_start"),
        py::arg("image_len"), py::arg("key_start"), py::arg("key_end"), py::arg("scale"), py::arg("num_image_keys"),
        py::arg("gap_start") = py::none(), py::arg("gap_end") = py::none(), py::arg("out") = py::none(),
        py::arg("num_threads") = 0,
        "Head-mean softmax of float32 query rows [B,Hq,R,D] over keys [B,Hkv,L,D], image keys only -> [B,R,N]; "
        "optional int64 gap_start/gap_end [B] (both or neither) exclude keys [gap_start, gap_end) of each sample; "
        "with out (float32 [B,R,N], C-contiguous) the result is added into it and out is returned; "
        "on at most num_threads threads (0 or 1: the calling thread only).");
  m.def("image_attention_layers", &pixfound::image_attention_layers, py::arg("queries"), py::arg("keys"),
        py::arg("scales"), py::arg("image_start"), py::arg("image_len"), py::arg("key_start"), py::arg("key_end"),
        py::arg("num_image_keys"), py::arg("gap_start") = py::none(), py::arg("gap_end") = py::none(),
        py::arg("out") = py::none(), py::arg("num_threads") = 0,
        "image_attention for several layers in one call (lists of q, k and scale per layer), summed over the "
        "layers in order; the probe's per-step path on the CPU.");
  // The core links no OpenMP runtime: its threads are std::threads, at most the count Python passes
  // in (torch.get_num_threads()), so a wheel never brings a second runtime beside torch's.
  m.attr("openmp") = false;
}
