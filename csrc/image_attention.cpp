// Host path of the fused attention capture: for each query row, the softmax over its valid keys
// (full-row denominator), restricted to the image keys and averaged over the query heads. An optional
// per-sample gap [gap_start, gap_end) is taken out of the valid keys (padding between a shared prefix
// and each sample's own prompt).
// Same math as the Triton kernel and the torch reference in pixfound/_kernels/image_attention.py;
// on the CPU it replaces a dozen small torch ops per layer with one call.
#include "image_attention.hpp"

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "common.hpp"

namespace pixfound {

namespace {

void require_dtype(const py::array& a, const char* name, char kind, py::ssize_t itemsize, const char* expected) {
  if (a.dtype().kind() != kind || a.dtype().itemsize() != itemsize) {
    fail(std::string(name) + " must be " + expected + ", got dtype " + std::string(py::str(a.dtype())) +
         " with shape " + shape_str(a));
  }
}

void require_shape(const py::array& a, const char* name, std::initializer_list<py::ssize_t> shape) {
  bool ok = a.ndim() == static_cast<py::ssize_t>(shape.size());
  py::ssize_t i = 0;
  for (py::ssize_t s : shape) ok = ok && a.shape(i++) == s;
  if (!ok) fail(std::string(name) + " has shape " + shape_str(a) + ", which does not match q and k");
}

// Scaled dot products of one query row with keys [begin, end) into scores[0 .. end - begin); returns
// max(best, their max). GCC on x86-64 also builds an AVX2+FMA clone, picked when the CPU loads the
// module: the dot products then run 8 lanes wide (the default clone is SSE2).
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
__attribute__((target_clones("arch=x86-64-v3", "default")))
#endif
float scaled_dots(const float* qv, const float* kbase, py::ssize_t begin, py::ssize_t end, py::ssize_t dim,
                  float scale, float* scores, float best) {
  for (py::ssize_t j = begin; j < end; ++j) {
    const float* kv = kbase + j * dim;
    float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
    for (py::ssize_t d = 0; d < dim; ++d) dot += qv[d] * kv[d];
    dot *= scale;
    scores[j - begin] = dot;
    best = std::max(best, dot);
  }
  return best;
}

}  // namespace

py::array_t<float> image_attention(const py::array& q, const py::array& k, const py::array& image_start,
                                   const py::array& image_len, const py::array& key_start, const py::array& key_end,
                                   double scale, py::ssize_t num_image_keys, const py::object& gap_start,
                                   const py::object& gap_end, const py::object& out_arg) {
  require_ndim(q, "q", 4, "[B, Hq, R, D]");
  require_ndim(k, "k", 4, "[B, Hkv, L, D]");
  require_dtype(q, "q", 'f', 4, "float32");
  require_dtype(k, "k", 'f', 4, "float32");
  require_c_contiguous(q, "q");
  require_c_contiguous(k, "k");
  const py::ssize_t batch = q.shape(0), heads_q = q.shape(1), rows = q.shape(2), dim = q.shape(3);
  const py::ssize_t heads_kv = k.shape(1), keys = k.shape(2);
  if (k.shape(0) != batch || k.shape(3) != dim || heads_kv == 0 || heads_q % heads_kv != 0) {
    fail("q " + shape_str(q) + " and k " + shape_str(k) + " must share B and D, with Hq a multiple of Hkv");
  }
  const char* names[] = {"image_start", "image_len", "key_start", "key_end"};
  const py::array* indices[] = {&image_start, &image_len, &key_start, &key_end};
  for (int i = 0; i < 4; ++i) {
    require_dtype(*indices[i], names[i], 'i', 8, "int64");
    require_c_contiguous(*indices[i], names[i]);
  }
  require_shape(image_start, "image_start", {batch});
  require_shape(image_len, "image_len", {batch});
  require_shape(key_start, "key_start", {batch});
  require_shape(key_end, "key_end", {batch, rows});
  if (num_image_keys < 0) fail("num_image_keys must be >= 0");
  if (gap_start.is_none() != gap_end.is_none()) {
    fail(std::string("gap_start and gap_end must be given together (or both None for no gap): got ") +
         (gap_start.is_none() ? "gap_end but gap_start" : "gap_start but gap_end") + " is None");
  }
  const bool has_gap = !gap_start.is_none();
  py::array gap_start_a, gap_end_a;
  if (has_gap) {
    gap_start_a = py::array::ensure(gap_start);
    gap_end_a = py::array::ensure(gap_end);
    if (!gap_start_a || !gap_end_a) fail("gap_start and gap_end must be int64 arrays of shape [B] or None");
    require_dtype(gap_start_a, "gap_start", 'i', 8, "int64");
    require_dtype(gap_end_a, "gap_end", 'i', 8, "int64");
    require_c_contiguous(gap_start_a, "gap_start");
    require_c_contiguous(gap_end_a, "gap_end");
    require_shape(gap_start_a, "gap_start", {batch});
    require_shape(gap_end_a, "gap_end", {batch});
  }

  const float* qp = static_cast<const float*>(q.data());
  const float* kp = static_cast<const float*>(k.data());
  const auto* img_start = static_cast<const std::int64_t*>(image_start.data());
  const auto* img_len = static_cast<const std::int64_t*>(image_len.data());
  const auto* first = static_cast<const std::int64_t*>(key_start.data());
  const auto* end = static_cast<const std::int64_t*>(key_end.data());
  const auto* gap_lo_p = has_gap ? static_cast<const std::int64_t*>(gap_start_a.data()) : nullptr;
  const auto* gap_hi_p = has_gap ? static_cast<const std::int64_t*>(gap_end_a.data()) : nullptr;
  // With `out` the result is added into it (the probe sums the layers of a step in place); else zeros.
  py::array_t<float> out;
  if (out_arg.is_none()) {
    out = py::array_t<float>({batch, rows, num_image_keys});
    std::fill(out.mutable_data(), out.mutable_data() + batch * rows * num_image_keys, 0.0f);
  } else {
    // No conversion: a converted copy would silently drop the sum.
    if (!py::isinstance<py::array>(out_arg)) fail("out must be a float32 numpy array of shape [B, R, N] or None");
    const auto given = py::reinterpret_borrow<py::array>(out_arg);
    require_dtype(given, "out", 'f', 4, "float32");
    require_c_contiguous(given, "out");
    require_shape(given, "out", {batch, rows, num_image_keys});
    if (!given.writeable()) fail("out must be writeable");
    out = py::reinterpret_borrow<py::array_t<float>>(out_arg);
  }
  float* op = out.mutable_data();
  const py::ssize_t group = heads_kv ? heads_q / heads_kv : 1;
  const float inv_heads = 1.0f / static_cast<float>(heads_q);
  const float fscale = static_cast<float>(scale);
  // Threads only pay off on large calls: per decode step and layer the work is small, and waking a
  // second OpenMP runtime beside torch's costs more than it saves.
  const bool parallel = batch * rows * heads_q * keys * dim >= (py::ssize_t(1) << 24);
  {
    py::gil_scoped_release release;
#pragma omp parallel for schedule(static) if (parallel)
    for (py::ssize_t br = 0; br < batch * rows; ++br) {
      const py::ssize_t b = br / rows, r = br % rows;
      // Indices are clamped into [0, L], as in the Triton kernel: bad values cannot read outside k.
      const py::ssize_t lo = std::clamp<py::ssize_t>(first[b], 0, keys);
      const py::ssize_t hi = std::clamp<py::ssize_t>(end[b * rows + r], lo, keys);
      const py::ssize_t n_img = std::clamp<py::ssize_t>(img_len[b], 0, num_image_keys);
      // The valid keys are [lo, gap_lo) and [gap_hi, hi): the gap clamped into the row; an empty
      // gap (end <= start) or none leaves gap_lo = gap_hi = hi.
      py::ssize_t gap_lo = hi, gap_hi = hi;
      if (has_gap && gap_hi_p[b] > gap_lo_p[b]) {
        gap_lo = std::clamp<py::ssize_t>(gap_lo_p[b], lo, hi);
        gap_hi = std::clamp<py::ssize_t>(gap_hi_p[b], gap_lo, hi);
      }
      float* row_out = op + br * num_image_keys;
      if ((gap_lo - lo) + (hi - gap_hi) <= 0 || n_img == 0) continue;
      const py::ssize_t pieces[2][2] = {{lo, gap_lo}, {gap_hi, hi}};
      // Scores are indexed j - lo; the gap's slots stay unused.
      std::vector<float> scores(static_cast<size_t>(hi - lo));
      for (py::ssize_t h = 0; h < heads_q; ++h) {
        const float* qv = qp + ((b * heads_q + h) * rows + r) * dim;
        const float* kbase = kp + (b * heads_kv + h / group) * keys * dim;
        float best = -std::numeric_limits<float>::infinity();
        for (const auto& piece : pieces) {
          best = scaled_dots(qv, kbase, piece[0], piece[1], dim, fscale, scores.data() + (piece[0] - lo), best);
        }
        double total = 0.0;  // float exponentials, summed in double: exact enough, and vectorisable
        for (const auto& piece : pieces) {
          for (py::ssize_t j = piece[0]; j < piece[1]; ++j) {
            const float e = std::exp(scores[j - lo] - best);
            scores[j - lo] = e;  // kept for the image keys below
            total += e;
          }
        }
        const float weight = static_cast<float>(1.0 / total) * inv_heads;
        for (py::ssize_t i = 0; i < n_img; ++i) {
          const py::ssize_t j = img_start[b] + i;
          if (j >= lo && j < hi && (j < gap_lo || j >= gap_hi)) row_out[i] += scores[j - lo] * weight;
        }
      }
    }
  }
  return out;
}

}  // namespace pixfound
