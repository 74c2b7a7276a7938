// Peak finding on attention maps: top-k per map (ties to the lowest flat index, as
// torch.argmax), and skimage-style local maxima for multi-point prompts.
#include "peaks.hpp"

#include <algorithm>
#include <cmath>
#include <numeric>
#include <vector>

#include "common.hpp"
#include "parallel.hpp"

namespace pixfound {

namespace {

// Strict weak order "a ranks before b": larger value first, then lower flat index.
template <typename T>
struct RanksBefore {
  const T* values;
  bool operator()(std::int64_t a, std::int64_t b) const {
    return values[a] > values[b] || (values[a] == values[b] && a < b);
  }
};

template <typename T>
bool has_nan(const T* data, py::ssize_t count) {
  for (py::ssize_t i = 0; i < count; ++i)
    if (std::isnan(data[i])) return true;
  return false;
}

template <typename T>
void topk_one(const T* values, py::ssize_t count, py::ssize_t k, std::int64_t* out_index) {
  RanksBefore<T> before{values};
  if (k == 1) {  // the common case: one pass, no allocation
    std::int64_t best = 0;
    for (py::ssize_t i = 1; i < count; ++i)
      if (values[i] > values[best]) best = i;
    out_index[0] = best;
    return;
  }
  // Keep the running top-k in a small heap whose front is the weakest of the kept entries.
  std::vector<std::int64_t> heap;
  heap.reserve(static_cast<size_t>(k));
  for (py::ssize_t i = 0; i < count; ++i) {
    if (static_cast<py::ssize_t>(heap.size()) < k) {
      heap.push_back(i);
      std::push_heap(heap.begin(), heap.end(), before);
    } else if (before(i, heap.front())) {
      std::pop_heap(heap.begin(), heap.end(), before);
      heap.back() = i;
      std::push_heap(heap.begin(), heap.end(), before);
    }
  }
  std::sort(heap.begin(), heap.end(), before);
  std::copy(heap.begin(), heap.end(), out_index);
}

template <typename T>
py::array_t<std::int64_t> topk_typed(const py::array& maps, py::ssize_t k, py::ssize_t num_threads) {
  const py::ssize_t g = maps.shape(0), h = maps.shape(1), w = maps.shape(2);
  const py::ssize_t count = h * w;
  const T* data = static_cast<const T*>(maps.data());
  py::array_t<std::int64_t> out({g, k, py::ssize_t(2)});
  auto* o = out.mutable_data();
  bool nan_found = false;
  {
    py::gil_scoped_release release;
    std::vector<std::int64_t> index(static_cast<size_t>(g * k));
    std::vector<unsigned char> nan_in(static_cast<size_t>(g), 0);  // per map: no shared flag between threads
    // A thread per 2^18 map values at most.
    const int threads = plan_threads(num_threads, g, g * count, std::int64_t(1) << 18);
    parallel_for(g, threads, [&](std::int64_t lo, std::int64_t hi) {
      for (std::int64_t i = lo; i < hi; ++i) {
        const T* m = data + i * count;
        if (has_nan(m, count)) {
          nan_in[i] = 1;
          continue;
        }
        topk_one(m, count, k, index.data() + i * k);
      }
    });
    nan_found = std::find(nan_in.begin(), nan_in.end(), 1) != nan_in.end();
    if (!nan_found) {
      for (py::ssize_t i = 0; i < g * k; ++i) {
        o[2 * i] = index[i] % w;      // x
        o[2 * i + 1] = index[i] / w;  // y
      }
    }
  }
  if (nan_found) fail("maps contains NaN (shape " + shape_str(maps) + "); peaks of a NaN map are undefined");
  return out;
}

// One axis of the bicubic resampling: per output index, its 4 source taps (clamped to the border) and
// their weights, as interpolate(mode="bicubic", align_corners=False) computes them in float32: the
// source coordinate scale * (i + 0.5) - 0.5 is not clamped; its integer part is capped at in - 1
// and the fraction clamped to [0, 1]; Keys' cubic convolution with A = -0.75 at the distances
// t + 1, t, 1 - t and 2 - t.
struct CubicAxis {
  std::vector<py::ssize_t> taps;  // [out, 4]
  std::vector<float> weights;     // [out, 4]
};

CubicAxis cubic_axis(py::ssize_t in, py::ssize_t full, py::ssize_t offset, py::ssize_t out) {
  CubicAxis axis{std::vector<py::ssize_t>(static_cast<size_t>(out * 4)), std::vector<float>(static_cast<size_t>(out * 4))};
  const float scale = static_cast<float>(in) / static_cast<float>(full);
  for (py::ssize_t i = 0; i < out; ++i) {
    const float source = scale * (static_cast<float>(i + offset) + 0.5f) - 0.5f;
    const py::ssize_t base = std::min(static_cast<py::ssize_t>(std::floor(source)), in - 1);
    const float t = std::min(std::max(source - static_cast<float>(base), 0.0f), 1.0f);
    const float s = 1.0f - t, far_t = t + 1.0f, far_s = s + 1.0f;
    float* w = axis.weights.data() + i * 4;
    w[0] = ((-0.75f * far_t + 3.75f) * far_t - 6.0f) * far_t + 3.0f;
    w[1] = ((1.25f * t - 2.25f) * t) * t + 1.0f;
    w[2] = ((1.25f * s - 2.25f) * s) * s + 1.0f;
    w[3] = ((-0.75f * far_s + 3.75f) * far_s - 6.0f) * far_s + 3.0f;
    for (py::ssize_t j = 0; j < 4; ++j) axis.taps[i * 4 + j] = std::clamp<py::ssize_t>(base + j - 1, 0, in - 1);
  }
  return axis;
}

// Separable square maximum filter with 'nearest' borders (scipy.ndimage.maximum_filter(mode="nearest")).
template <typename T>
std::vector<T> maximum_filter(const T* img, py::ssize_t h, py::ssize_t w, py::ssize_t radius) {
  std::vector<T> rows(static_cast<size_t>(h * w)), out(static_cast<size_t>(h * w));
  for (py::ssize_t y = 0; y < h; ++y) {
    for (py::ssize_t x = 0; x < w; ++x) {
      T best = img[y * w + x];
      const py::ssize_t lo = std::max<py::ssize_t>(0, x - radius), hi = std::min<py::ssize_t>(w - 1, x + radius);
      for (py::ssize_t xx = lo; xx <= hi; ++xx) best = std::max(best, img[y * w + xx]);
      rows[y * w + x] = best;
    }
  }
  for (py::ssize_t y = 0; y < h; ++y) {
    const py::ssize_t lo = std::max<py::ssize_t>(0, y - radius), hi = std::min<py::ssize_t>(h - 1, y + radius);
    for (py::ssize_t x = 0; x < w; ++x) {
      T best = rows[y * w + x];
      for (py::ssize_t yy = lo; yy <= hi; ++yy) best = std::max(best, rows[yy * w + x]);
      out[y * w + x] = best;
    }
  }
  return out;
}

template <typename T>
py::array_t<std::int64_t> local_peaks_typed(const py::array& map, py::ssize_t min_distance, double threshold,
                                            py::ssize_t border_width, py::ssize_t num_peaks) {
  const py::ssize_t h = map.shape(0), w = map.shape(1);
  const T* img = static_cast<const T*>(map.data());
  if (has_nan(img, h * w)) fail("map contains NaN (shape " + shape_str(map) + ")");
  std::vector<std::int64_t> kept;
  {
    py::gil_scoped_release release;
    const std::vector<T> filtered = maximum_filter(img, h, w, min_distance);
    std::vector<std::int64_t> candidates;
    for (py::ssize_t y = border_width; y < h - border_width; ++y) {
      for (py::ssize_t x = border_width; x < w - border_width; ++x) {
        const py::ssize_t i = y * w + x;
        if (img[i] == filtered[i] && static_cast<double>(img[i]) > threshold) candidates.push_back(i);
      }
    }
    std::stable_sort(candidates.begin(), candidates.end(),
                     [img](std::int64_t a, std::int64_t b) { return img[a] > img[b]; });
    // Greedy spacing in rank order: a candidate closer than min_distance (Chebyshev) to a kept
    // peak is dropped. The occupancy grid makes each check O(min_distance^2), not O(kept).
    std::vector<std::uint8_t> occupied(static_cast<size_t>(h * w), 0);
    const py::ssize_t reach = min_distance - 1;
    for (std::int64_t i : candidates) {
      if (num_peaks >= 0 && static_cast<py::ssize_t>(kept.size()) >= num_peaks) break;
      const py::ssize_t y = i / w, x = i % w;
      bool too_close = false;
      for (py::ssize_t yy = std::max<py::ssize_t>(0, y - reach); yy <= std::min(h - 1, y + reach) && !too_close; ++yy)
        for (py::ssize_t xx = std::max<py::ssize_t>(0, x - reach); xx <= std::min(w - 1, x + reach); ++xx)
          if (occupied[yy * w + xx]) {
            too_close = true;
            break;
          }
      if (too_close) continue;
      occupied[i] = 1;
      kept.push_back(i);
    }
  }
  py::array_t<std::int64_t> out({static_cast<py::ssize_t>(kept.size()), py::ssize_t(2)});
  auto* o = out.mutable_data();
  for (size_t p = 0; p < kept.size(); ++p) {
    o[2 * p] = kept[p] % w;
    o[2 * p + 1] = kept[p] / w;
  }
  return out;
}

void require_float_map(const py::array& a, const char* name) {
  const auto dt = a.dtype();
  if (dt.kind() != 'f' || (dt.itemsize() != 4 && dt.itemsize() != 8)) {
    fail(std::string(name) + " must be float32 or float64, got dtype " + dtype_name(dt) + " with shape " +
         shape_str(a));
  }
}

}  // namespace

py::array_t<std::int64_t> topk_peaks(const py::array& maps, py::ssize_t k, py::ssize_t num_threads) {
  require_ndim(maps, "maps", 3, "[G, H, W]");
  require_float_map(maps, "maps");
  require_c_contiguous(maps, "maps");
  require_non_empty(maps, "maps");
  const py::ssize_t count = maps.shape(1) * maps.shape(2);
  if (k < 1 || k > count) {
    fail("k must be between 1 and H*W = " + std::to_string(count) + " for maps of shape " + shape_str(maps) +
         ", got " + std::to_string(k));
  }
  return maps.dtype().itemsize() == 4 ? topk_typed<float>(maps, k, num_threads)
                                      : topk_typed<double>(maps, k, num_threads);
}

py::array_t<std::int64_t> upsample_topk(const py::array& maps, py::ssize_t full_h, py::ssize_t full_w, py::ssize_t top,
                                        py::ssize_t left, py::ssize_t out_h, py::ssize_t out_w, py::ssize_t k) {
  require_ndim(maps, "maps", 3, "[G, h, w]");
  if (maps.dtype().kind() != 'f' || maps.dtype().itemsize() != 4) {
    fail("maps must be float32, got dtype " + dtype_name(maps.dtype()) + " with shape " + shape_str(maps));
  }
  require_c_contiguous(maps, "maps");
  require_non_empty(maps, "maps");
  if (full_h < 1 || full_w < 1 || out_h < 1 || out_w < 1 || top < 0 || left < 0 || top + out_h > full_h ||
      left + out_w > full_w) {
    fail("the window [" + std::to_string(top) + ", " + std::to_string(top + out_h) + ") x [" + std::to_string(left) +
         ", " + std::to_string(left + out_w) + ") must lie inside the " + std::to_string(full_h) + " x " +
         std::to_string(full_w) + " upsampled grid");
  }
  const py::ssize_t count = out_h * out_w;
  if (k < 1 || k > count) {
    fail("k must be between 1 and H*W = " + std::to_string(count) + ", got " + std::to_string(k));
  }
  const py::ssize_t g = maps.shape(0), in_h = maps.shape(1), in_w = maps.shape(2);
  const float* data = static_cast<const float*>(maps.data());
  py::array_t<std::int64_t> out({g, k, py::ssize_t(2)});
  auto* o = out.mutable_data();
  bool nan_found = false;
  {
    py::gil_scoped_release release;
    const CubicAxis ys = cubic_axis(in_h, full_h, top, out_h), xs = cubic_axis(in_w, full_w, left, out_w);
    std::vector<float> along_x(static_cast<size_t>(in_h * out_w)), values(static_cast<size_t>(count));
    std::vector<std::int64_t> index(static_cast<size_t>(k));
    for (py::ssize_t m = 0; m < g && !nan_found; ++m) {
      const float* map = data + m * in_h * in_w;
      if (has_nan(map, in_h * in_w)) {
        nan_found = true;
        break;
      }
      // Each source row interpolated along x once, then the rows combined along y (torch's order).
      for (py::ssize_t r = 0; r < in_h; ++r) {
        const float* row = map + r * in_w;
        float* dst = along_x.data() + r * out_w;
        for (py::ssize_t x = 0; x < out_w; ++x) {
          const py::ssize_t* tap = xs.taps.data() + x * 4;
          const float* w = xs.weights.data() + x * 4;
          float v = row[tap[0]] * w[0];
          v += row[tap[1]] * w[1];
          v += row[tap[2]] * w[2];
          v += row[tap[3]] * w[3];
          dst[x] = v;
        }
      }
      for (py::ssize_t y = 0; y < out_h; ++y) {
        const py::ssize_t* tap = ys.taps.data() + y * 4;
        const float* w = ys.weights.data() + y * 4;
        const float *r0 = along_x.data() + tap[0] * out_w, *r1 = along_x.data() + tap[1] * out_w,
                    *r2 = along_x.data() + tap[2] * out_w, *r3 = along_x.data() + tap[3] * out_w;
        float* dst = values.data() + y * out_w;
        for (py::ssize_t x = 0; x < out_w; ++x) {
          float v = r0[x] * w[0];
          v += r1[x] * w[1];
          v += r2[x] * w[2];
          v += r3[x] * w[3];
          dst[x] = v;
        }
      }
      topk_one(values.data(), count, k, index.data());
      for (py::ssize_t i = 0; i < k; ++i) {
        o[(m * k + i) * 2] = index[i] % out_w;      // x
        o[(m * k + i) * 2 + 1] = index[i] / out_w;  // y
      }
    }
  }
  if (nan_found) fail("maps contains NaN (shape " + shape_str(maps) + "); peaks of a NaN map are undefined");
  return out;
}

py::array_t<std::int64_t> local_peaks(const py::array& map, py::ssize_t min_distance, double threshold,
                                      py::ssize_t border_width, py::ssize_t num_peaks) {
  require_ndim(map, "map", 2, "[H, W]");
  require_float_map(map, "map");
  require_c_contiguous(map, "map");
  require_non_empty(map, "map");
  if (min_distance < 1) fail("min_distance must be >= 1, got " + std::to_string(min_distance));
  if (border_width < 0) fail("border width must be >= 0, got " + std::to_string(border_width));
  return map.dtype().itemsize() == 4 ? local_peaks_typed<float>(map, min_distance, threshold, border_width, num_peaks)
                                     : local_peaks_typed<double>(map, min_distance, threshold, border_width, num_peaks);
}

}  // namespace pixfound
