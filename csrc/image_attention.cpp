// Host path of the fused attention capture: for each query row, the softmax over its valid keys
// (full-row denominator), restricted to the image keys and averaged over the query heads. An optional
// per-sample gap [gap_start, gap_end) is taken out of the valid keys (padding between a shared prefix
// and each sample's own prompt).
// Same math as the Triton kernel and the torch reference in pixfound/_kernels/image_attention.py;
// on the CPU it replaces a dozen small torch ops per layer with one call.
#include "image_attention.hpp"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "common.hpp"
#include "parallel.hpp"

namespace pixfound {

namespace {

void require_dtype(const py::array& a, const char* name, char kind, py::ssize_t itemsize, const char* expected) {
  if (a.dtype().kind() != kind || a.dtype().itemsize() != itemsize) {
    fail(std::string(name) + " must be " + expected + ", got dtype " + dtype_name(a.dtype()) +
         " with shape " + shape_str(a));
  }
}

void require_shape(const py::array& a, const char* name, std::initializer_list<py::ssize_t> shape) {
  bool ok = a.ndim() == static_cast<py::ssize_t>(shape.size());
  py::ssize_t i = 0;
  for (py::ssize_t s : shape) ok = ok && a.shape(i++) == s;
  if (!ok) fail(std::string(name) + " has shape " + shape_str(a) + ", which does not match q and k");
}

// GCC on x86-64 also builds AVX2+FMA clones of the two inner loops, picked when the CPU loads the
// module: they then run 8 lanes wide (the default clones are SSE2).
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define PIXFOUND_WIDE_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define PIXFOUND_WIDE_CLONES
#endif

// exp(x) for x <= 0 (a score minus the row's maximum): Cephes' expf polynomial, written without
// branches so that the compiler vectorises it (std::exp is a scalar call). Within 2 ulp of std::exp
// on [-87, 0]; below, it returns exp(-87) ~ 1.6e-38, nothing next to the row maximum's exp(0) = 1.
inline float exp_nonpositive(float x) {
  const float clamped = std::max(x, -87.0f);
  // n = round(x / ln 2) by the 1.5 * 2^23 shift (no call to floor; exact for |x / ln 2| < 2^22).
  const float n = (clamped * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  float r = clamped - n * 0.693359375f;  // ln 2 in two parts: exact high bits, then the rest
  r = r - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * (r * r) + r + 1.0f;
  const std::int32_t bits = (static_cast<std::int32_t>(n) + 127) << 23;  // 2^n, n in [-126, 0]
  float two_n;
  std::memcpy(&two_n, &bits, sizeof(two_n));
  return p * two_n;
}

// scores[i] = exp(scores[i] - best) for i < count; returns their sum. Eight float partial sums (one
// per vector lane, each over at most count / 8 terms) added up in double at the end.
PIXFOUND_WIDE_CLONES
double exponentiate(float* scores, py::ssize_t count, float best) {
  constexpr py::ssize_t kLanes = 8;
  float lanes[kLanes] = {};
  py::ssize_t i = 0;
  for (; i + kLanes <= count; i += kLanes) {
    for (py::ssize_t l = 0; l < kLanes; ++l) {
      const float e = exp_nonpositive(scores[i + l] - best);
      scores[i + l] = e;
      lanes[l] += e;
    }
  }
  double total = 0.0;
  for (; i < count; ++i) {
    const float e = exp_nonpositive(scores[i] - best);
    scores[i] = e;
    total += e;
  }
  for (float lane : lanes) total += lane;
  return total;
}

// Scores of several query rows against keys [lo, reach): scores[p * stride + (j - lo)] = scale * (q_p .
// key j) for every pair p (a query row and head) with j < pair_end[p]. The key loop is outermost, so
// each key is read once for all pairs (a window of decode steps shares its keys).
PIXFOUND_WIDE_CLONES
void pair_scores(const float* const* queries, const py::ssize_t* pair_end, py::ssize_t pairs, const float* kbase,
                 py::ssize_t key_stride, py::ssize_t lo, py::ssize_t reach, py::ssize_t dim, float scale,
                 float* scores, py::ssize_t stride) {
  for (py::ssize_t j = lo; j < reach; ++j) {
    const float* kv = kbase + j * key_stride;
    for (py::ssize_t p = 0; p < pairs; ++p) {
      if (j >= pair_end[p]) continue;
      const float* qv = queries[p];
      float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
      for (py::ssize_t d = 0; d < dim; ++d) dot += qv[d] * kv[d];
      scores[p * stride + (j - lo)] = dot * scale;
    }
  }
}

// max(best, scores[0 .. count)), eight lanes wide.
PIXFOUND_WIDE_CLONES
float block_max(const float* scores, py::ssize_t count, float best) {
  constexpr py::ssize_t kLanes = 8;
  float lanes[kLanes];
  for (float& lane : lanes) lane = best;
  py::ssize_t i = 0;
  for (; i + kLanes <= count; i += kLanes) {
    for (py::ssize_t l = 0; l < kLanes; ++l) lanes[l] = std::max(lanes[l], scores[i + l]);
  }
  for (; i < count; ++i) best = std::max(best, scores[i]);
  for (float lane : lanes) best = std::max(best, lane);
  return best;
}

}  // namespace

namespace {

// Per-sample index arrays shared by every layer of a call (gap_lo/gap_hi null: no gap).
struct RowSpans {
  const std::int64_t* image_start;
  const std::int64_t* image_len;
  const std::int64_t* key_start;
  const std::int64_t* key_end;
  const std::int64_t* gap_lo;
  const std::int64_t* gap_hi;
};

// One layer's query rows [B, Hq, R, D] and keys [B, Hkv, L, D], already checked. Strides are in
// floats: the last dimension is contiguous, the others may be strided (a key cache's views of a
// buffer with spare room).
struct LayerInputs {
  const float* q;
  const float* k;
  py::ssize_t heads_kv;
  py::ssize_t keys;
  float scale;
  py::ssize_t q_stride[3];  // batch, head, row
  py::ssize_t k_stride[3];  // batch, head, key
};

// Strides of the first three dimensions in elements; the last dimension must be contiguous.
void element_strides(const py::array& a, const char* name, py::ssize_t* out) {
  const py::ssize_t item = a.itemsize();
  if (a.shape(3) > 1 && a.strides(3) != item) {
    fail(std::string(name) + " must be contiguous in its last dimension, got strides " + std::to_string(a.strides(0)) +
         ", " + std::to_string(a.strides(1)) + ", " + std::to_string(a.strides(2)) + ", " +
         std::to_string(a.strides(3)) + " bytes");
  }
  for (int d = 0; d < 3; ++d) {
    if (a.strides(d) < 0 || a.strides(d) % item != 0) {
      fail(std::string(name) + " has a negative or misaligned stride in dimension " + std::to_string(d));
    }
    out[d] = a.strides(d) / item;
  }
}

LayerInputs check_layer(const py::array& q, const py::array& k, double scale, py::ssize_t batch, py::ssize_t heads_q,
                        py::ssize_t rows, py::ssize_t dim, const std::string& where) {
  require_ndim(q, ("q" + where).c_str(), 4, "[B, Hq, R, D]");
  require_ndim(k, ("k" + where).c_str(), 4, "[B, Hkv, L, D]");
  require_dtype(q, ("q" + where).c_str(), 'f', 4, "float32");
  require_dtype(k, ("k" + where).c_str(), 'f', 4, "float32");
  const py::ssize_t heads_kv = k.shape(1);
  if (q.shape(0) != batch || q.shape(1) != heads_q || q.shape(2) != rows || q.shape(3) != dim ||
      k.shape(0) != batch || k.shape(3) != dim || heads_kv == 0 || heads_q % heads_kv != 0) {
    fail("q" + where + " " + shape_str(q) + " and k" + where + " " + shape_str(k) +
         " must share B and D (and every layer the same q shape), with Hq a multiple of Hkv");
  }
  LayerInputs layer{static_cast<const float*>(q.data()), static_cast<const float*>(k.data()), heads_kv, k.shape(2),
                    static_cast<float>(scale), {0, 0, 0}, {0, 0, 0}};
  element_strides(q, ("q" + where).c_str(), layer.q_stride);
  element_strides(k, ("k" + where).c_str(), layer.k_stride);
  return layer;
}

// Checks the index arrays and the optional gap; the arrays must outlive the returned spans.
RowSpans check_spans(const py::array& image_start, const py::array& image_len, const py::array& key_start,
                     const py::array& key_end, const py::object& gap_start, const py::object& gap_end,
                     py::ssize_t batch, py::ssize_t rows, py::ssize_t num_image_keys, py::array& gap_start_a,
                     py::array& gap_end_a) {
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
  RowSpans spans{static_cast<const std::int64_t*>(image_start.data()),
                 static_cast<const std::int64_t*>(image_len.data()),
                 static_cast<const std::int64_t*>(key_start.data()),
                 static_cast<const std::int64_t*>(key_end.data()), nullptr, nullptr};
  if (!gap_start.is_none()) {
    gap_start_a = py::array::ensure(gap_start);
    gap_end_a = py::array::ensure(gap_end);
    if (!gap_start_a || !gap_end_a) fail("gap_start and gap_end must be int64 arrays of shape [B] or None");
    require_dtype(gap_start_a, "gap_start", 'i', 8, "int64");
    require_dtype(gap_end_a, "gap_end", 'i', 8, "int64");
    require_c_contiguous(gap_start_a, "gap_start");
    require_c_contiguous(gap_end_a, "gap_end");
    require_shape(gap_start_a, "gap_start", {batch});
    require_shape(gap_end_a, "gap_end", {batch});
    spans.gap_lo = static_cast<const std::int64_t*>(gap_start_a.data());
    spans.gap_hi = static_cast<const std::int64_t*>(gap_end_a.data());
  }
  return spans;
}

// `out` itself when given (the result is added into it), else a new zero array.
py::array_t<float> output_array(const py::object& out_arg, py::ssize_t batch, py::ssize_t rows,
                                py::ssize_t num_image_keys) {
  if (out_arg.is_none()) {
    py::array_t<float> out({batch, rows, num_image_keys});
    std::fill(out.mutable_data(), out.mutable_data() + batch * rows * num_image_keys, 0.0f);
    return out;
  }
  // No conversion: a converted copy would silently drop the sum.
  if (!py::isinstance<py::array>(out_arg)) fail("out must be a float32 numpy array of shape [B, R, N] or None");
  const auto given = py::reinterpret_borrow<py::array>(out_arg);
  require_dtype(given, "out", 'f', 4, "float32");
  require_c_contiguous(given, "out");
  require_shape(given, "out", {batch, rows, num_image_keys});
  if (!given.writeable()) fail("out must be writeable");
  return py::reinterpret_borrow<py::array_t<float>>(out_arg);
}

// Adds, for every layer in order, the head mean of each row's image probabilities into op [B, R, N].
// Per sample, layer and kv head, every row and query head of the group is scored in one pass over
// the keys (pair_scores): a window of decode steps (one row each) reads each key once. Every entry
// receives its additions in the order layer, then head, whatever the number of rows, so one call
// per layer or per step gives the same bits as one call for all.
void accumulate(const std::vector<LayerInputs>& layers, py::ssize_t batch, py::ssize_t heads_q, py::ssize_t rows,
                py::ssize_t dim, py::ssize_t num_image_keys, const RowSpans& spans, float* op,
                py::ssize_t num_threads) {
  py::ssize_t max_keys = 0, max_group = 1, work = 0;
  for (const auto& layer : layers) {
    max_keys = std::max(max_keys, layer.keys);
    max_group = std::max(max_group, heads_q / layer.heads_kv);
    work += batch * rows * heads_q * layer.keys * dim;
  }
  const py::ssize_t max_pairs = rows * max_group;
  const float inv_heads = 1.0f / static_cast<float>(heads_q);
  // Threads only pay off on large calls (2^24 multiply-adds and more): per decode step the work is
  // small. At most num_threads (the caller passes torch's thread count), over the samples.
  const int threads = work >= (py::ssize_t(1) << 24) ? plan_threads(num_threads, batch, work, 1) : 1;
  py::gil_scoped_release release;
  parallel_for(batch, threads, [&](std::int64_t first, std::int64_t last) {
    std::vector<float> scores(static_cast<size_t>(max_pairs * std::max<py::ssize_t>(max_keys, 1)));
    std::vector<const float*> queries(static_cast<size_t>(max_pairs));
    std::vector<py::ssize_t> pair_end(static_cast<size_t>(max_pairs));
    // Per row: its valid keys [lo, gap_lo) and [gap_hi, hi).
    std::vector<py::ssize_t> row_hi(static_cast<size_t>(rows)), row_gap_lo(static_cast<size_t>(rows)),
        row_gap_hi(static_cast<size_t>(rows));
    for (std::int64_t b = first; b < last; ++b) {
      const py::ssize_t n_img = std::clamp<py::ssize_t>(spans.image_len[b], 0, num_image_keys);
      if (n_img == 0) continue;
      for (const auto& layer : layers) {
        const py::ssize_t keys = layer.keys, group = heads_q / layer.heads_kv;
        // Indices are clamped into [0, L], as in the Triton kernel: bad values cannot read outside k.
        const py::ssize_t lo = std::clamp<py::ssize_t>(spans.key_start[b], 0, keys);
        py::ssize_t reach = lo;
        for (py::ssize_t r = 0; r < rows; ++r) {
          const py::ssize_t hi = std::clamp<py::ssize_t>(spans.key_end[b * rows + r], lo, keys);
          // The gap clamped into the row; an empty gap (end <= start) or none leaves gap_lo = gap_hi = hi.
          py::ssize_t gap_lo = hi, gap_hi = hi;
          if (spans.gap_lo != nullptr && spans.gap_hi[b] > spans.gap_lo[b]) {
            gap_lo = std::clamp<py::ssize_t>(spans.gap_lo[b], lo, hi);
            gap_hi = std::clamp<py::ssize_t>(spans.gap_hi[b], gap_lo, hi);
          }
          row_hi[r] = hi;
          row_gap_lo[r] = gap_lo;
          row_gap_hi[r] = gap_hi;
          reach = std::max(reach, hi);
        }
        const py::ssize_t stride = std::max<py::ssize_t>(reach - lo, 1);
        for (py::ssize_t kvh = 0; kvh < layer.heads_kv; ++kvh) {
          const py::ssize_t pairs = rows * group;
          for (py::ssize_t r = 0; r < rows; ++r) {
            for (py::ssize_t g = 0; g < group; ++g) {
              const py::ssize_t h = kvh * group + g;
              queries[r * group + g] = layer.q + b * layer.q_stride[0] + h * layer.q_stride[1] + r * layer.q_stride[2];
              pair_end[r * group + g] = row_hi[r];
            }
          }
          // Scores are indexed j - lo; the gap's slots are computed but never used.
          pair_scores(queries.data(), pair_end.data(), pairs, layer.k + b * layer.k_stride[0] + kvh * layer.k_stride[1],
                      layer.k_stride[2], lo, reach, dim, layer.scale, scores.data(), stride);
          for (py::ssize_t r = 0; r < rows; ++r) {
            const py::ssize_t hi = row_hi[r], gap_lo = row_gap_lo[r], gap_hi = row_gap_hi[r];
            if ((gap_lo - lo) + (hi - gap_hi) <= 0) continue;
            const py::ssize_t pieces[2][2] = {{lo, gap_lo}, {gap_hi, hi}};
            float* row_out = op + (b * rows + r) * num_image_keys;
            for (py::ssize_t g = 0; g < group; ++g) {
              float* row_scores = scores.data() + (r * group + g) * stride;
              float best = -std::numeric_limits<float>::infinity();
              for (const auto& piece : pieces) {
                best = block_max(row_scores + (piece[0] - lo), piece[1] - piece[0], best);
              }
              // Exponentials kept in row_scores for the image keys below; summed in double.
              double total = 0.0;
              for (const auto& piece : pieces) {
                total += exponentiate(row_scores + (piece[0] - lo), piece[1] - piece[0], best);
              }
              const float weight = static_cast<float>(1.0 / total) * inv_heads;
              for (py::ssize_t i = 0; i < n_img; ++i) {
                const py::ssize_t j = spans.image_start[b] + i;
                if (j >= lo && j < hi && (j < gap_lo || j >= gap_hi)) row_out[i] += row_scores[j - lo] * weight;
              }
            }
          }
        }
      }
    }
  });
}

// Both entry points after their q/k checks: the index checks, the output array, the sum.
py::array_t<float> run_layers(const std::vector<LayerInputs>& layers, py::ssize_t batch, py::ssize_t heads_q,
                              py::ssize_t rows, py::ssize_t dim, const py::array& image_start,
                              const py::array& image_len, const py::array& key_start, const py::array& key_end,
                              py::ssize_t num_image_keys, const py::object& gap_start, const py::object& gap_end,
                              const py::object& out_arg, py::ssize_t num_threads) {
  py::array gap_start_a, gap_end_a;
  const RowSpans spans = check_spans(image_start, image_len, key_start, key_end, gap_start, gap_end, batch, rows,
                                     num_image_keys, gap_start_a, gap_end_a);
  py::array_t<float> out = output_array(out_arg, batch, rows, num_image_keys);
  accumulate(layers, batch, heads_q, rows, dim, num_image_keys, spans, out.mutable_data(), num_threads);
  return out;
}

}  // namespace

py::array_t<float> image_attention(const py::array& q, const py::array& k, const py::array& image_start,
                                   const py::array& image_len, const py::array& key_start, const py::array& key_end,
                                   double scale, py::ssize_t num_image_keys, const py::object& gap_start,
                                   const py::object& gap_end, const py::object& out_arg, py::ssize_t num_threads) {
  require_ndim(q, "q", 4, "[B, Hq, R, D]");
  const py::ssize_t batch = q.shape(0), heads_q = q.shape(1), rows = q.shape(2), dim = q.shape(3);
  const std::vector<LayerInputs> layers{check_layer(q, k, scale, batch, heads_q, rows, dim, "")};
  return run_layers(layers, batch, heads_q, rows, dim, image_start, image_len, key_start, key_end, num_image_keys,
                    gap_start, gap_end, out_arg, num_threads);
}

py::array_t<float> image_attention_layers(const py::sequence& queries, const py::sequence& keys,
                                          const py::sequence& scales, const py::array& image_start,
                                          const py::array& image_len, const py::array& key_start,
                                          const py::array& key_end, py::ssize_t num_image_keys,
                                          const py::object& gap_start, const py::object& gap_end,
                                          const py::object& out_arg, py::ssize_t num_threads) {
  const auto count = static_cast<py::ssize_t>(queries.size());
  if (count == 0 || static_cast<py::ssize_t>(keys.size()) != count ||
      static_cast<py::ssize_t>(scales.size()) != count) {
    fail("queries, keys and scales must be non-empty and of one length, got " + std::to_string(queries.size()) +
         ", " + std::to_string(keys.size()) + " and " + std::to_string(scales.size()));
  }
  // Keep the arrays alive while their pointers are used.
  std::vector<py::array> q_arrays, k_arrays;
  for (py::ssize_t i = 0; i < count; ++i) {
    if (!py::isinstance<py::array>(queries[i]) || !py::isinstance<py::array>(keys[i])) {
      fail("queries[" + std::to_string(i) + "] and keys[" + std::to_string(i) + "] must be numpy arrays");
    }
    q_arrays.push_back(py::reinterpret_borrow<py::array>(queries[i]));
    k_arrays.push_back(py::reinterpret_borrow<py::array>(keys[i]));
  }
  require_ndim(q_arrays[0], "queries[0]", 4, "[B, Hq, R, D]");
  const py::ssize_t batch = q_arrays[0].shape(0), heads_q = q_arrays[0].shape(1), rows = q_arrays[0].shape(2),
                    dim = q_arrays[0].shape(3);
  std::vector<LayerInputs> layers;
  for (py::ssize_t i = 0; i < count; ++i) {
    layers.push_back(check_layer(q_arrays[i], k_arrays[i], scales[i].cast<double>(), batch, heads_q, rows, dim,
                                 "[" + std::to_string(i) + "]"));
  }
  return run_layers(layers, batch, heads_q, rows, dim, image_start, image_len, key_start, key_end, num_image_keys,
                    gap_start, gap_end, out_arg, num_threads);
}

}  // namespace pixfound
