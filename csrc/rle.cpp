// COCO run-length encoding of masks, the format pycocotools writes and reads.
// A mask is scanned column by column (column-major, as COCO stores it); the counts alternate
// between runs of 0 and runs of 1, starting with 0 (a first count of 0 when the first pixel is 1).
// The compressed string stores each count, minus the count two places before it from the fourth
// count on, in 5-bit groups, least significant first: bit 0x20 of a group says another group
// follows, bit 0x10 of the last group is the sign, and each group is written as the character
// 48 + group.
#include "rle.hpp"

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "common.hpp"

namespace pixfound {

namespace {

// The mask as 0/1 bytes in column-major order, transposed tile by tile (both sides stay in cache).
void column_major_bits(const std::uint8_t* mask, py::ssize_t height, py::ssize_t width, std::uint8_t* out) {
  constexpr py::ssize_t kTile = 32;
  for (py::ssize_t y0 = 0; y0 < height; y0 += kTile) {
    const py::ssize_t y1 = std::min(height, y0 + kTile);
    for (py::ssize_t x0 = 0; x0 < width; x0 += kTile) {
      const py::ssize_t x1 = std::min(width, x0 + kTile);
      for (py::ssize_t x = x0; x < x1; ++x) {
        for (py::ssize_t y = y0; y < y1; ++y) out[x * height + y] = mask[y * width + x] != 0;
      }
    }
  }
}

// Index of the first byte in [begin, end) that differs from value (0 or 1), or end; eight bytes at a time.
py::ssize_t next_change(const std::uint8_t* bits, py::ssize_t begin, py::ssize_t end, std::uint8_t value) {
  const std::uint64_t same = value ? 0x0101010101010101ULL : 0;
  py::ssize_t i = begin;
  for (; i + 8 <= end; i += 8) {
    std::uint64_t word;
    std::memcpy(&word, bits + i, sizeof(word));
    if (word != same) {
      // Little-endian: the lowest differing byte is the first one in memory.
      if constexpr (__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__) return i + __builtin_ctzll(word ^ same) / 8;
      break;
    }
  }
  for (; i < end; ++i) {
    if (bits[i] != value) return i;
  }
  return end;
}

std::vector<std::int64_t> column_major_runs(const std::uint8_t* bits, py::ssize_t total) {
  std::vector<std::int64_t> counts;
  std::uint8_t value = 0;
  py::ssize_t position = 0;
  while (true) {
    const py::ssize_t change = next_change(bits, position, total, value);
    counts.push_back(change - position);
    if (change == total) break;
    position = change;
    value ^= 1;
  }
  return counts;
}

std::string compress_counts(const std::vector<std::int64_t>& counts) {
  std::string text;
  text.reserve(counts.size() * 2);
  for (size_t i = 0; i < counts.size(); ++i) {
    std::int64_t value = counts[i] - (i > 2 ? counts[i - 2] : 0);
    bool more = true;
    while (more) {
      const std::int64_t group = value & 0x1f;
      value = (value - group) / 32;  // an arithmetic shift by 5, also for negative values
      more = (group & 0x10) ? value != -1 : value != 0;
      text.push_back(static_cast<char>(48 + (group | (more ? 0x20 : 0))));
    }
  }
  return text;
}

}  // namespace

py::list rle_encode(const py::array& masks) {
  require_ndim(masks, "masks", 3, "[N, H, W]");
  require_mask_dtype(masks, "masks");
  require_c_contiguous(masks, "masks");
  const py::ssize_t count = masks.shape(0), height = masks.shape(1), width = masks.shape(2);
  const auto* data = static_cast<const std::uint8_t*>(masks.data());
  std::vector<std::string> texts(static_cast<size_t>(count));
  {
    py::gil_scoped_release release;
    std::vector<std::uint8_t> bits(static_cast<size_t>(height * width));
    for (py::ssize_t n = 0; n < count; ++n) {
      column_major_bits(data + n * height * width, height, width, bits.data());
      texts[n] = compress_counts(column_major_runs(bits.data(), height * width));
    }
  }
  py::list out;
  for (const auto& text : texts) out.append(py::bytes(text));
  return out;
}

}  // namespace pixfound
