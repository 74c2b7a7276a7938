// Bit-packed mask IoU: each mask becomes ceil(H*W / 64) 64-bit words, so an intersection is
// an AND plus a popcount per word, 64 pixels at a time. Oracle selection packs every
// candidate once and compares it against the ground truth without touching bytes again.
#include "mask_iou.hpp"

#include "common.hpp"
#include "parallel.hpp"

#include <algorithm>
#include <cstring>

namespace pixfound {

static inline std::uint64_t popcount64(std::uint64_t x) { return static_cast<std::uint64_t>(__builtin_popcountll(x)); }

// Eight mask bytes → eight bits (byte j → bit j), SWAR: packing reads every byte once and is
// what bounds mask_iou on fresh masks, so it must run near memory speed.
static inline std::uint64_t pack8(const std::uint8_t* bytes) {
  std::uint64_t x;
  std::memcpy(&x, bytes, 8);
  const std::uint64_t low7 = 0x7F7F7F7F7F7F7F7FULL;
  std::uint64_t nonzero = (((x & low7) + low7) | x) & 0x8080808080808080ULL;  // high bit of each nonzero byte
  nonzero >>= 7;                                                                // 0x01 per nonzero byte
  return (nonzero * 0x0102040810204080ULL) >> 56;
}

static inline std::uint64_t pack_word(const std::uint8_t* m, py::ssize_t len) {
  std::uint64_t word = 0;
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
  if (len == 64) {
    for (int c = 0; c < 8; ++c) word |= pack8(m + 8 * c) << (8 * c);
    return word;
  }
#endif
  for (py::ssize_t b = 0; b < len; ++b) word |= static_cast<std::uint64_t>(m[b] != 0) << b;
  return word;
}

PackedMasks pack_masks(const py::array& masks, py::ssize_t num_threads) {
  require_ndim(masks, "masks", 3, "[N, H, W]");
  require_mask_dtype(masks, "masks");
  require_c_contiguous(masks, "masks");
  require_non_empty(masks, "masks");

  const py::ssize_t n = masks.shape(0), h = masks.shape(1), w = masks.shape(2);
  const py::ssize_t pixels = h * w;
  const py::ssize_t words = (pixels + 63) / 64;
  py::array_t<std::uint64_t> packed({n, words});
  py::array_t<std::int64_t> areas(n);
  const auto* src = static_cast<const std::uint8_t*>(masks.data());
  auto* dst = packed.mutable_data();
  auto* area = areas.mutable_data();
  {
    py::gil_scoped_release release;
    // A thread per MiB of mask bytes at most.
    const int threads = plan_threads(num_threads, n, n * pixels, std::int64_t(1) << 20);
    parallel_for(n, threads, [&](std::int64_t lo, std::int64_t hi) {
      for (std::int64_t i = lo; i < hi; ++i) {
        const std::uint8_t* m = src + i * pixels;
        std::uint64_t* out = dst + i * words;
        std::int64_t count = 0;
        for (py::ssize_t wi = 0; wi < words; ++wi) {
          const py::ssize_t base = wi * 64;
          const std::uint64_t word = pack_word(m + base, std::min<py::ssize_t>(64, pixels - base));
          out[wi] = word;
          count += static_cast<std::int64_t>(popcount64(word));
        }
        area[i] = count;
      }
    });
  }
  return PackedMasks{packed, areas, h, w};
}

py::array_t<float> packed_iou(const py::array_t<std::uint64_t>& a_words, const py::array_t<std::int64_t>& a_areas,
                              const py::array_t<std::uint64_t>& b_words, const py::array_t<std::int64_t>& b_areas,
                              double empty, py::ssize_t num_threads) {
  require_ndim(a_words, "a_words", 2, "[N, words]");
  require_ndim(b_words, "b_words", 2, "[M, words]");
  require_ndim(a_areas, "a_areas", 1, "[N]");
  require_ndim(b_areas, "b_areas", 1, "[M]");
  require_c_contiguous(a_words, "a_words");
  require_c_contiguous(b_words, "b_words");
  require_c_contiguous(a_areas, "a_areas");
  require_c_contiguous(b_areas, "b_areas");
  if (a_words.shape(1) != b_words.shape(1)) {
    fail("a and b must have the same mask size: a_words has shape " + shape_str(a_words) + ", b_words has shape " +
         shape_str(b_words));
  }
  if (a_areas.shape(0) != a_words.shape(0) || b_areas.shape(0) != b_words.shape(0)) {
    fail("areas must have one entry per packed mask: a " + shape_str(a_words) + " vs " + shape_str(a_areas) +
         ", b " + shape_str(b_words) + " vs " + shape_str(b_areas));
  }
  const py::ssize_t n = a_words.shape(0), m = b_words.shape(0), words = a_words.shape(1);
  py::array_t<float> out({n, m});
  const auto* aw = a_words.data();
  const auto* bw = b_words.data();
  const auto* aa = a_areas.data();
  const auto* ba = b_areas.data();
  auto* o = out.mutable_data();
  const float empty_value = static_cast<float>(empty);
  {
    py::gil_scoped_release release;
    const py::ssize_t pairs = n * m;
    // A thread per 2^17 word pairs (8 Mi pixel pairs) at most.
    const int threads = plan_threads(num_threads, pairs, pairs * words, std::int64_t(1) << 17);
    parallel_for(pairs, threads, [&](std::int64_t lo, std::int64_t hi) {
      for (std::int64_t p = lo; p < hi; ++p) {
        const py::ssize_t i = p / m, j = p % m;
        const std::uint64_t* x = aw + i * words;
        const std::uint64_t* y = bw + j * words;
        std::uint64_t inter = 0;
        for (py::ssize_t k = 0; k < words; ++k) inter += popcount64(x[k] & y[k]);
        const std::int64_t uni = aa[i] + ba[j] - static_cast<std::int64_t>(inter);
        o[p] = uni == 0 ? empty_value : static_cast<float>(static_cast<double>(inter) / static_cast<double>(uni));
      }
    });
  }
  return out;
}

}  // namespace pixfound
