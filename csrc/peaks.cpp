// Peak finding on attention maps: top-k per map (ties to the lowest flat index, as
// torch.argmax), and skimage-style local maxima for multi-point prompts.
#include "peaks.hpp"

#include <algorithm>
#include <cmath>
#include <numeric>
#include <vector>

#include "common.hpp"

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
py::array_t<std::int64_t> topk_typed(const py::array& maps, py::ssize_t k) {
  const py::ssize_t g = maps.shape(0), h = maps.shape(1), w = maps.shape(2);
  const py::ssize_t count = h * w;
  const T* data = static_cast<const T*>(maps.data());
  py::array_t<std::int64_t> out({g, k, py::ssize_t(2)});
  auto* o = out.mutable_data();
  bool nan_found = false;
  {
    py::gil_scoped_release release;
    std::vector<std::int64_t> index(static_cast<size_t>(g * k));
#pragma omp parallel for schedule(static) reduction(|| : nan_found)
    for (py::ssize_t i = 0; i < g; ++i) {
      const T* m = data + i * count;
      if (has_nan(m, count)) {
        nan_found = true;
        continue;
      }
      topk_one(m, count, k, index.data() + i * k);
    }
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

py::array_t<std::int64_t> topk_peaks(const py::array& maps, py::ssize_t k) {
  require_ndim(maps, "maps", 3, "[G, H, W]");
  require_float_map(maps, "maps");
  require_c_contiguous(maps, "maps");
  require_non_empty(maps, "maps");
  const py::ssize_t count = maps.shape(1) * maps.shape(2);
  if (k < 1 || k > count) {
    fail("k must be between 1 and H*W = " + std::to_string(count) + " for maps of shape " + shape_str(maps) +
         ", got " + std::to_string(k));
  }
  return maps.dtype().itemsize() == 4 ? topk_typed<float>(maps, k) : topk_typed<double>(maps, k);
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
