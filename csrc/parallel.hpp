// Threads for the compiled core without an OpenMP runtime of its own: a repaired wheel would vendor
// its own libgomp beside torch's, a second thread pool in the process whose idle threads spin on the
// same cores. Each parallel op splits its items over at most the thread count Python passes in
// (torch.get_num_threads()), on std::threads started for the call and joined before it returns:
// nothing of pixfound runs or spins between calls. Items are independent and each is computed the
// same way on any thread, so results do not depend on the count.
#pragma once

#include <algorithm>
#include <cstdint>
#include <system_error>
#include <thread>
#include <vector>

namespace pixfound {

// How many threads a call uses: at most `requested` (below 1 counts as 1) and `items`, and one per
// `grain` units of `work`, so that small calls stay on the calling thread (starting a thread costs
// tens of microseconds).
inline int plan_threads(std::int64_t requested, std::int64_t items, std::int64_t work, std::int64_t grain) {
  const std::int64_t by_work = std::max<std::int64_t>(1, work / std::max<std::int64_t>(grain, 1));
  return static_cast<int>(std::max<std::int64_t>(1, std::min({requested, items, by_work, std::int64_t(256)})));
}

// body(begin, end) over contiguous chunks of [0, n): the calling thread runs the first chunk, one
// started thread each of the others. Where a thread cannot be started, its chunk runs here instead.
// body must not throw.
template <typename Body>
void parallel_for(std::int64_t n, int threads, const Body& body) {
  if (n <= 0) return;
  const std::int64_t parts = std::min<std::int64_t>(std::max(threads, 1), n);
  if (parts == 1) {
    body(std::int64_t(0), n);
    return;
  }
  std::vector<std::thread> workers;
  workers.reserve(static_cast<size_t>(parts - 1));
  for (std::int64_t t = 1; t < parts; ++t) {
    const std::int64_t begin = n * t / parts, end = n * (t + 1) / parts;
    try {
      workers.emplace_back([&body, begin, end] { body(begin, end); });
    } catch (const std::system_error&) {
      body(begin, end);
    }
  }
  body(std::int64_t(0), n / parts);
  for (auto& worker : workers) worker.join();
}

}  // namespace pixfound
