// Structure edits for dynamic sparse training (prune / regrow / rebuild). See sparsecore/dst/.
//
// Every selection here is a deterministic function of its inputs and a 64-bit seed, independent of the thread
// count, so that a plain reference implementation (a dense mask and a sort) can reproduce it exactly:
//
//   tie key of a position   tie(pos) = fmix64(pos + smix),  smix = fmix64(seed ^ GOLDEN)
//                           pos = row * n_cols + col (block coordinates for BSR). A bijection of pos for each
//                           seed, so keys never tie: scores that tie are ordered by a seeded random key.
//   prune (k smallest)      order entries by (score, tie) ascending, take the first k.
//   grow (k largest)        order candidates by score descending, then tie ascending, take the first k.
//   random stream           draw t = 0, 1, ...: z = splitmix64(smix + (t + 1) * GOLDEN),
//                           row = ((z >> 32) * n_rows) >> 32, col = ((z mod 2**32) * n_cols) >> 32.
//   random absent           the first k distinct, unoccupied positions of the stream (sequential rejection
//                           sampling: exactly uniform over k-subsets of the empty positions). Computed in
//                           parallel over rows from a prefix of the stream. When the empty positions are few
//                           (the stream would need more than N/4 draws) it switches to "the k empty positions
//                           with the smallest tie keys", also exactly uniform, in O(N) = O(nnz) time.
//
// Memory is O(nnz + k) (no dense (out, in) array), one allocation per array (never per nonzero), and the GIL is
// released for all O(nnz) work.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <memory>
#include <numeric>
#include <type_traits>
#include <vector>

#include "common.h"

namespace sc {
namespace {

constexpr uint64_t GOLDEN = 0x9E3779B97F4A7C15ULL;
constexpr int HBITS = 16;  // histogram radix of the selection (top bits of a 64-bit key)
constexpr int64_t HSIZE = int64_t(1) << HBITS;
constexpr int64_t GROUP_COLS = 2048;  // transpose: columns per sweep

inline uint64_t fmix64(uint64_t x) {
  x ^= x >> 33;
  x *= 0xff51afd7ed558ccdULL;
  x ^= x >> 33;
  x *= 0xc4ceb9fe1a85ec53ULL;
  x ^= x >> 33;
  return x;
}
inline uint64_t seed_mix(uint64_t seed) { return fmix64(seed ^ GOLDEN); }
inline uint64_t splitmix(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
  return z ^ (z >> 31);
}
// Draw t of the random stream: row from the high 32 bits of z, column from the low 32 (multiply-shift: the bias is
// below n / 2**32). No division, so the sampler can recompute draws instead of storing them.
inline void stream_rc(uint64_t smix, uint64_t t, uint64_t n_rows, uint64_t n_cols, uint32_t& r, uint32_t& c) {
  const uint64_t z = splitmix(smix + (t + 1) * GOLDEN);
  r = uint32_t(((z >> 32) * n_rows) >> 32);
  c = uint32_t(((z & 0xffffffffULL) * n_cols) >> 32);
}
// Order-preserving map of a double onto uint64 (NaN maps to the top: it sorts above +inf).
inline uint64_t okey(double s) {
  if (std::isnan(s)) return ~uint64_t(0);
  uint64_t b;
  std::memcpy(&b, &s, 8);
  return (b >> 63) ? ~b : (b | (uint64_t(1) << 63));
}

// Order keys of scores, smaller = smaller score. float keeps its own 32-bit order (finer histogram bins).
inline uint64_t skey(double s) { return okey(s); }
inline uint64_t skey(float s) {
  if (std::isnan(s)) return ~uint64_t(0);
  uint32_t b;
  std::memcpy(&b, &s, 4);
  const uint32_t k = (b >> 31) ? ~b : (b | 0x80000000u);
  return uint64_t(k) << 32;
}

// Threads for a job of `work` elementary steps: one per PAR_GRAIN of work at most, so that small edits never pay
// for waking (or, on a busy machine, waiting for) other threads.
constexpr int64_t PAR_GRAIN = 1 << 15;
inline int nthreads_for(int t, int64_t work) {
  const int64_t most = std::max<int64_t>(1, work / PAR_GRAIN);
  return int(std::min<int64_t>(clamp_threads(t), most));
}
const uint8_t* opt_mask(const py::object& o, int64_t n, Arr<uint8_t>& hold) {
  if (o.is_none()) return nullptr;
  hold = o.cast<Arr<uint8_t>>();
  require(numel(hold) == n, "mask must have one entry per stored entry (" + std::to_string(n) + "), got " +
                                std::to_string(numel(hold)));
  return cptr(hold);
}

void check_structure(const Arr<int32_t>& rowptr, const Arr<int32_t>& col) {
  require(numel(rowptr) >= 1, "rowptr must have at least one element");
  require(cptr(rowptr)[numel(rowptr) - 1] == numel(col), "rowptr[-1] must equal len(col)");
  require(cptr(rowptr)[0] == 0, "rowptr[0] must be 0");
}

struct Item {  // a candidate of a selection: primary key (smaller is better), position, tie key
  uint64_t key;
  uint64_t tie;
  int64_t idx;
  bool operator<(const Item& o) const { return key < o.key || (key == o.key && tie < o.tie); }
};

// ------------------------------------------------------------------------------------------------ prune
// keep[i] = 0 for the k entries with the smallest (score, tie), 1 otherwise. Two parallel passes: a histogram
// of the score keys' top bits finds the boundary bin; only that bin is ordered exactly (with the tie keys).
template <class T>
Arr<uint8_t> prune_keep(const Arr<T>& scores, const Arr<int32_t>& rowptr, const Arr<int32_t>& col, int64_t n_cols,
                        int64_t k, uint64_t seed, int threads) {
  check_structure(rowptr, col);
  const int64_t n = numel(col), n_rows = numel(rowptr) - 1;
  require(numel(scores) == n, "scores must have one entry per stored entry");
  require(k >= 0 && k <= n, "k = " + std::to_string(k) + " must be in [0, nnz = " + std::to_string(n) + "]");
  Arr<uint8_t> keep(n);
  uint8_t* kp = mptr(keep);
  const T* s = cptr(scores);
  const int32_t* rp = cptr(rowptr);
  const int32_t* co = cptr(col);
  const int nt = nthreads_for(threads, n);
  const uint64_t smix = seed_mix(seed);
  {
    py::gil_scoped_release nogil;
    if (k == 0 || k == n) {
      std::fill(kp, kp + n, uint8_t(k == 0));
    } else {
      std::vector<int64_t> hist(HSIZE * nt, 0);
#pragma omp parallel num_threads(nt)
      {
        int64_t* h = hist.data() + HSIZE * thread_id();
#pragma omp for schedule(static)
        for (int64_t i = 0; i < n; ++i) h[skey(s[i]) >> (64 - HBITS)]++;
      }
      for (int t = 1; t < nt; ++t)
        for (int64_t b = 0; b < HSIZE; ++b) hist[b] += hist[HSIZE * t + b];
      int64_t below = 0, bstar = 0;
      while (below + hist[bstar] < k) below += hist[bstar++];
      const uint64_t bs = uint64_t(bstar);
      std::vector<std::vector<Item>> border(nt);
#pragma omp parallel num_threads(nt)
      {
        std::vector<Item>& mine = border[thread_id()];
#pragma omp for schedule(dynamic, 64)
        for (int64_t r = 0; r < n_rows; ++r) {
          for (int32_t i = rp[r]; i < rp[r + 1]; ++i) {
            const uint64_t key = skey(s[i]);
            const uint64_t b = key >> (64 - HBITS);
            kp[i] = b > bs;
            if (b == bs) mine.push_back({key, fmix64(uint64_t(r * n_cols + co[i]) + smix), i});
          }
        }
      }
      std::vector<Item> all;
      for (auto& v : border) all.insert(all.end(), v.begin(), v.end());
      const int64_t rest = k - below;  // 1 <= rest <= all.size()
      std::nth_element(all.begin(), all.begin() + (rest - 1), all.end());
      for (int64_t j = 0; j < int64_t(all.size()); ++j) kp[all[j].idx] = j >= rest;
    }
  }
  return keep;
}

// ------------------------------------------------------------------------------------------------ random absent
// Occupancy of a row: the stored columns whose mask is nonzero (all of them without a mask), sorted.
struct Occ {
  const int32_t* rp;
  const int32_t* co;
  const uint8_t* mask;
  // Walks a row's occupied columns in increasing order.
  struct Cursor {
    const Occ* o;
    int32_t p, e;
    void skip_to(int32_t j) {  // advance past entries that are < j or unmasked
      while (p < e && (o->co[p] < j || (o->mask && !o->mask[p]))) ++p;
    }
    bool has(int32_t j) {
      skip_to(j);
      return p < e && o->co[p] == j;
    }
  };
  Cursor row(int64_t r) const { return Cursor{this, rp[r], rp[r + 1]}; }
};

// The rejection sampler over the random stream, parallel by row. Draws are bucketed by row in draw order (a stable
// counting sort); a per-thread bitmap of the row's occupied and already drawn columns marks each draw that the
// sequential sampler would accept; t* is the draw at which the k-th acceptance happens. A draw is chosen when it
// was accepted at or before t*.
struct StreamDraw {
  static constexpr uint64_t ACCEPT = uint64_t(1) << 31, TMASK = ACCEPT - 1;
  int64_t n_rows, n_cols, words;
  std::vector<int64_t> cnt;      // bucket of row r: items[cnt[r] : cnt[r+1]]
  std::unique_ptr<uint64_t[]> items;  // (col << 32) | accepted << 31 | t, t increasing inside a bucket
  int64_t tstar = -1;

  // Expected number of draws for k acceptances among A empty of N positions (with 5% margin), or +inf.
  static double draws_needed(uint64_t N, int64_t A, int64_t k) {
    if (k >= A) return std::numeric_limits<double>::infinity();
    return 1.05 * double(N) * -std::log1p(-double(k) / double(A)) + 64.0;
  }
  // The stream sampler is used when it needs at most N/4 draws; otherwise the O(N) enumeration is cheaper.
  static bool feasible(uint64_t N, int64_t A, int64_t k) {
    const double m = draws_needed(N, A, k);
    return k == 0 || (m <= double(N) / 4 && m < 2e9);
  }

  // Runs the sampler (GIL released by the caller). Returns false if it failed (cannot happen when feasible).
  bool run(const Occ& O, int64_t n_rows_, int64_t n_cols_, int64_t A, int64_t k, uint64_t smix, int nt) {
    n_rows = n_rows_;
    n_cols = n_cols_;
    words = (n_cols + 63) / 64;
    cnt.assign(n_rows + 1, 0);
    const uint64_t N = uint64_t(n_rows) * uint64_t(n_cols);
    int64_t m = int64_t(draws_needed(N, A, k));
    (void)N;
    std::vector<uint8_t> flag;
    std::vector<int64_t> tc;  // per-thread row counts, then per-thread next slots
    const uint8_t* mask = O.mask;
    const size_t stride = size_t(n_rows) + 1;
    for (;;) {
      // Two passes over the draws, each thread on a contiguous range of t: count per row, then scatter into
      // row buckets (stable: t increases inside a bucket). Draws are recomputed, not stored.
      tc.assign(size_t(nt) * stride, 0);
#pragma omp parallel num_threads(nt)
      {
        const int id = thread_id();
        const int64_t t0 = m * id / nt, t1 = m * (id + 1) / nt;
        int64_t* __restrict c = tc.data() + size_t(id) * stride;
        uint32_t r, col;
        for (int64_t t = t0; t < t1; ++t) {
          stream_rc(smix, uint64_t(t), n_rows, n_cols, r, col);
          c[r]++;
        }
      }
      int64_t o = 0;
      for (int64_t r = 0; r < n_rows; ++r) {
        cnt[r] = o;
        for (int t = 0; t < nt; ++t) {
          const int64_t c = tc[size_t(t) * stride + r];
          tc[size_t(t) * stride + r] = o;
          o += c;
        }
      }
      cnt[n_rows] = o;
      items.reset(new uint64_t[std::max<int64_t>(m, 1)]);
#pragma omp parallel num_threads(nt)
      {
        const int id = thread_id();
        const int64_t t0 = m * id / nt, t1 = m * (id + 1) / nt;
        int64_t* __restrict next = tc.data() + size_t(id) * stride;
        uint64_t* __restrict it = items.get();
        uint32_t r, col;
        for (int64_t t = t0; t < t1; ++t) {
          stream_rc(smix, uint64_t(t), n_rows, n_cols, r, col);
          it[next[r]++] = (uint64_t(col) << 32) | uint64_t(t);
        }
      }
      flag.assign(m, 0);
#pragma omp parallel num_threads(nt)
      {
        std::vector<uint64_t> bm(words, 0);
#pragma omp for schedule(dynamic, 64)
        for (int64_t r = 0; r < n_rows; ++r) {
          uint64_t* b = items.get() + cnt[r];
          uint64_t* e = items.get() + cnt[r + 1];
          if (b == e) continue;
          if (mask) {  // branch-free: a masked-out entry ORs a zero bit
            for (int32_t i = O.rp[r]; i < O.rp[r + 1]; ++i)
              bm[O.co[i] >> 6] |= uint64_t(mask[i] != 0) << (O.co[i] & 63);
          } else {
            for (int32_t i = O.rp[r]; i < O.rp[r + 1]; ++i) bm[O.co[i] >> 6] |= uint64_t(1) << (O.co[i] & 63);
          }
          for (uint64_t* p = b; p < e; ++p) {
            const uint32_t c = uint32_t(*p >> 32);
            const uint64_t bit = uint64_t(1) << (c & 63);
            if (!(bm[c >> 6] & bit)) {
              bm[c >> 6] |= bit;
              flag[*p & TMASK] = 1;
              *p |= ACCEPT;  // remembered in the item too, so the output passes read sequentially
            }
          }
          if (words <= 2 * ((O.rp[r + 1] - O.rp[r]) + (e - b))) {
            std::fill(bm.begin(), bm.end(), 0);
          } else {
            for (int32_t i = O.rp[r]; i < O.rp[r + 1]; ++i) bm[O.co[i] >> 6] = 0;
            for (const uint64_t* p = b; p < e; ++p) bm[(*p >> 32) >> 6] = 0;
          }
        }
      }
      int64_t got = 0;
      tstar = -1;
      for (int64_t t = 0; t < m; ++t) {
        got += flag[t];
        if (got == k) {
          tstar = t;
          break;
        }
      }
      if (tstar >= 0 || k == 0) return true;
      if (2 * m >= int64_t(TMASK)) return false;  // the prefix was too short (rare): extend the stream, redo
      m *= 2;
    }
  }

  // Bitwise, not &&: the accepted flag is random, a short-circuit branch would mispredict.
  bool chosen(uint64_t item) const { return bool(item & ACCEPT) & (int64_t(item & TMASK) <= tstar); }
  int64_t count_row(int64_t r) const {
    int64_t c = 0;
    for (int64_t q = cnt[r]; q < cnt[r + 1]; ++q) c += chosen(items[q]);
    return c;
  }
  // Writes the `count` (= count_row(r)) chosen columns of row r, sorted, to out; bm: a zeroed bitmap of `words`.
  void row_cols(int64_t r, int64_t count, int32_t* out, std::vector<uint64_t>& bm) const {
    if (words <= 4 * count) {  // sort through the bitmap: set (branch-free), then read the bits back in order
      for (int64_t q = cnt[r]; q < cnt[r + 1]; ++q) {
        const uint32_t c = uint32_t(items[q] >> 32);
        bm[c >> 6] |= uint64_t(chosen(items[q])) << (c & 63);
      }
      int64_t o = 0;
      for (int64_t w = 0; w < words; ++w) {
        uint64_t x = bm[w];
        while (x) {
          out[o++] = int32_t(w * 64 + __builtin_ctzll(x));
          x &= x - 1;
        }
        bm[w] = 0;
      }
    } else {
      int64_t o = 0;
      for (int64_t q = cnt[r]; q < cnt[r + 1]; ++q)
        if (chosen(items[q])) out[o++] = int32_t(items[q] >> 32);
      std::sort(out, out + o);
    }
  }
  // After a successful run(): off (n_rows + 1) = CSR offsets of the drawn positions, cols (k) = their columns,
  // sorted within each row, and rows (k, may be null) = their rows.
  void collect(int64_t n_rows, int nt, int64_t* off, int32_t* cols, int32_t* rows) const {
    off[0] = 0;
#pragma omp parallel for num_threads(nt) schedule(static)
    for (int64_t r = 0; r < n_rows; ++r) off[r + 1] = count_row(r);
    for (int64_t r = 0; r < n_rows; ++r) off[r + 1] += off[r];
#pragma omp parallel num_threads(nt)
    {
      std::vector<uint64_t> bm(words, 0);
#pragma omp for schedule(dynamic, 64)
      for (int64_t r = 0; r < n_rows; ++r) {
        if (off[r + 1] == off[r]) continue;
        if (rows) std::fill(rows + off[r], rows + off[r + 1], int32_t(r));
        row_cols(r, off[r + 1] - off[r], cols + off[r], bm);
      }
    }
  }
};

// The k empty positions with the smallest tie keys (uniform too), for when empty positions are few. O(N).
std::vector<int64_t> enumerate_absent(const Occ& O, int64_t n_rows, int64_t n_cols, int64_t k, uint64_t smix,
                                      int nt) {
  std::vector<int64_t> outpos;
  if (k == 0) return outpos;
  std::vector<int64_t> hist(HSIZE * nt, 0);
#pragma omp parallel num_threads(nt)
  {
    int64_t* h = hist.data() + HSIZE * thread_id();
#pragma omp for schedule(dynamic, 64)
    for (int64_t r = 0; r < n_rows; ++r) {
      Occ::Cursor cur = O.row(r);
      for (int64_t j = 0; j < n_cols; ++j)
        if (!cur.has(int32_t(j))) h[fmix64(uint64_t(r * n_cols + j) + smix) >> (64 - HBITS)]++;
    }
  }
  for (int t = 1; t < nt; ++t)
    for (int64_t b = 0; b < HSIZE; ++b) hist[b] += hist[HSIZE * t + b];
  int64_t below = 0;
  uint64_t bstar = 0;
  while (below + hist[bstar] < k) below += hist[bstar++];
  std::vector<std::vector<int64_t>> sel(nt);
  std::vector<std::vector<Item>> border(nt);
#pragma omp parallel num_threads(nt)
  {
    const int id = thread_id();
#pragma omp for schedule(dynamic, 64)
    for (int64_t r = 0; r < n_rows; ++r) {
      Occ::Cursor cur = O.row(r);
      for (int64_t j = 0; j < n_cols; ++j) {
        if (cur.has(int32_t(j))) continue;
        const int64_t p = r * n_cols + j;
        const uint64_t key = fmix64(uint64_t(p) + smix);
        const uint64_t b = key >> (64 - HBITS);
        if (b < bstar) sel[id].push_back(p);
        else if (b == bstar) border[id].push_back({key, 0, p});
      }
    }
  }
  for (auto& v : sel) outpos.insert(outpos.end(), v.begin(), v.end());
  std::vector<Item> all;
  for (auto& v : border) all.insert(all.end(), v.begin(), v.end());
  const int64_t rest = k - below;
  std::nth_element(all.begin(), all.begin() + (rest - 1), all.end());
  for (int64_t j = 0; j < rest; ++j) outpos.push_back(all[j].idx);
  std::sort(outpos.begin(), outpos.end());
  return outpos;
}

// Number of empty positions given an occupancy; checks k.
int64_t empty_positions(const Occ& O, int64_t nnz, uint64_t N, int64_t k) {
  int64_t occ = nnz;
  if (O.mask) {
    occ = 0;
    for (int64_t i = 0; i < nnz; ++i) occ += O.mask[i] != 0;
  }
  const int64_t A = int64_t(N) - occ;
  require(k >= 0 && k <= A, "cannot place " + std::to_string(k) + " new entries: only " + std::to_string(A) +
                                " positions are empty");
  return A;
}

py::tuple random_absent(const Arr<int32_t>& rowptr, const Arr<int32_t>& col, const py::object& mask_obj,
                        int64_t n_cols, int64_t k, uint64_t seed, int threads) {
  check_structure(rowptr, col);
  const int64_t nnz = numel(col), n_rows = numel(rowptr) - 1;
  require(n_cols >= 0, "n_cols must be non-negative");
  Arr<uint8_t> hold;
  const Occ O{cptr(rowptr), cptr(col), opt_mask(mask_obj, nnz, hold)};
  const uint64_t N = uint64_t(n_rows) * uint64_t(n_cols);
  const int64_t A = empty_positions(O, nnz, N, k);
  const int nt = nthreads_for(threads, nnz + 2 * k);
  const uint64_t smix = seed_mix(seed);
  Arr<int32_t> rows(k), cols(k);
  int32_t* ro = mptr(rows);
  int32_t* cl = mptr(cols);
  bool ok = true;
  {
    py::gil_scoped_release nogil;
    if (k == 0) {
    } else if (StreamDraw::feasible(N, A, k)) {
      StreamDraw D;
      ok = D.run(O, n_rows, n_cols, A, k, smix, nt);
      if (ok) {
        std::vector<int64_t> off(n_rows + 1);
        D.collect(n_rows, nt, off.data(), cl, ro);
      }
    } else {
      const std::vector<int64_t> pos = enumerate_absent(O, n_rows, n_cols, k, smix, nt);
      for (int64_t j = 0; j < k; ++j) {
        ro[j] = int32_t(pos[j] / n_cols);
        cl[j] = int32_t(pos[j] % n_cols);
      }
    }
  }
  require(ok, "random_absent: could not draw the new positions");
  return py::make_tuple(rows, cols);
}

// The raw random stream (for references and tests): positions row * n_cols + col of draws start .. start+count-1.
Arr<int64_t> random_stream(uint64_t seed, int64_t start, int64_t count, int64_t n_rows, int64_t n_cols) {
  require(count >= 0 && start >= 0 && n_rows > 0 && n_cols > 0, "need count >= 0, start >= 0, n_rows, n_cols > 0");
  Arr<int64_t> out(count);
  int64_t* o = mptr(out);
  const uint64_t smix = seed_mix(seed);
  uint32_t r, c;
  for (int64_t t = 0; t < count; ++t) {
    stream_rc(smix, uint64_t(start + t), uint64_t(n_rows), uint64_t(n_cols), r, c);
    o[t] = int64_t(r) * n_cols + c;
  }
  return out;
}

// The tie keys of positions (for references and tests).
Arr<uint64_t> tie_keys(const Arr<int64_t>& pos, uint64_t seed) {
  Arr<uint64_t> out(numel(pos));
  const uint64_t smix = seed_mix(seed);
  for (int64_t i = 0; i < numel(pos); ++i) mptr(out)[i] = fmix64(uint64_t(cptr(pos)[i]) + smix);
  return out;
}

// ------------------------------------------------------------------------------------------------ streaming top-k
// The k best empty positions by score (descending, ties by the tie key), fed one chunk of rows at a time, so
// the dense score matrix is never whole. Each thread keeps a buffer of candidates at or above its running
// threshold and shrinks it to its best k when it doubles (amortised O(1) per score). Scores that are NaN or
// -inf are never candidates (use -inf to forbid a position).
class TopKAbsent {
  struct Cand {  // 16 bytes: the order key of the score (smaller = better) and the position; ties by tie key
    uint64_t key;
    int64_t pos;
  };
  struct Better {
    uint64_t smix;
    bool operator()(const Cand& a, const Cand& b) const {
      if (a.key != b.key) return a.key < b.key;
      return fmix64(uint64_t(a.pos) + smix) < fmix64(uint64_t(b.pos) + smix);
    }
  };

 public:
  TopKAbsent(int64_t k, int64_t n_rows, int64_t n_cols, uint64_t seed)
      : k_(k), n_rows_(n_rows), n_cols_(n_cols), smix_(seed_mix(seed)) {
    require(k >= 0 && n_rows >= 0 && n_cols >= 0, "k, n_rows, n_cols must be non-negative");
    cap_ = k_ + std::max<int64_t>(k_ / 2, 1024);  // a full buffer is cut back to its best k
  }

  template <class T>
  void push(const Arr<T>& scores, int64_t row0, const Arr<int32_t>& rowptr, const Arr<int32_t>& col,
            const py::object& mask_obj, int threads) {
    check_structure(rowptr, col);
    require(numel(rowptr) - 1 == n_rows_, "rowptr does not match the number of rows");
    require(scores.ndim() == 2 && scores.shape(1) == n_cols_, "scores must be (rows, n_cols)");
    const int64_t R = scores.shape(0);
    require(row0 >= 0 && row0 + R <= n_rows_, "rows of the chunk out of range");
    Arr<uint8_t> hold;
    const uint8_t* mask = opt_mask(mask_obj, numel(col), hold);
    const Occ O{cptr(rowptr), cptr(col), mask};
    const T* s = cptr(scores);
    const int nt = nthreads_for(threads, R * n_cols_);
    if (k_ == 0) return;
    if (int(bufs_.size()) < nt) {
      bufs_.resize(nt);
      thr_.resize(nt, -std::numeric_limits<double>::max());
    }
    py::gil_scoped_release nogil;
#pragma omp parallel num_threads(nt)
    {
      const int id = thread_id();
      std::vector<Cand>& buf = bufs_[id];
      double thr = thr_[id];
#pragma omp for schedule(dynamic, 16)
      for (int64_t rr = 0; rr < R; ++rr) {
        const int64_t r = row0 + rr;
        const T* sr = s + rr * n_cols_;
        Occ::Cursor cur = O.row(r);
        int64_t j = 0;
        while (j < n_cols_) {
          cur.skip_to(int32_t(j));
          const int64_t stop = cur.p < cur.e ? cur.o->co[cur.p] : n_cols_;  // next occupied column
          for (; j < stop; ++j) {
            const double v = double(sr[j]);
            if (!(v >= thr)) continue;  // also drops NaN; -inf never passes the finite threshold
            if (buf.capacity() == 0) buf.reserve(cap_);
            buf.push_back({~okey(v), r * n_cols_ + j});
            if (int64_t(buf.size()) >= cap_) thr = shrink(buf);
          }
          if (stop < n_cols_) ++j;  // skip the occupied column
        }
      }
      thr_[id] = thr;
    }
  }

  // (rows int32, cols int32): the chosen positions in row-major order (fewer than k if fewer candidates).
  py::tuple result() {
    std::vector<int64_t> pos;
    {
      py::gil_scoped_release nogil;
      std::vector<Cand> all;
      for (auto& v : bufs_) {
        if (int64_t(v.size()) > k_) shrink(v);
        all.insert(all.end(), v.begin(), v.end());
        std::vector<Cand>().swap(v);  // free as we go: peak memory stays near (threads + 1) * k candidates
      }
      bufs_.clear();
      thr_.clear();
      if (int64_t(all.size()) > k_) {
        std::nth_element(all.begin(), all.begin() + k_, all.end(), Better{smix_});
        all.resize(k_);
      }
      pos.resize(all.size());
      for (size_t i = 0; i < all.size(); ++i) pos[i] = all[i].pos;
      std::sort(pos.begin(), pos.end());
    }
    const int64_t n = int64_t(pos.size());
    Arr<int32_t> rows(n), cols(n);
    for (int64_t i = 0; i < n; ++i) {
      mptr(rows)[i] = int32_t(pos[i] / n_cols_);
      mptr(cols)[i] = int32_t(pos[i] % n_cols_);
    }
    return py::make_tuple(rows, cols);
  }

 private:
  double shrink(std::vector<Cand>& buf) const {  // keep the best k; returns the new threshold (the k-th score)
    std::nth_element(buf.begin(), buf.begin() + (k_ - 1), buf.end(), Better{smix_});
    buf.resize(k_);
    uint64_t worst = 0;
    for (const Cand& c : buf) worst = std::max(worst, c.key);
    const uint64_t b = ~worst;  // back from the order key to the double
    uint64_t raw = (b >> 63) ? (b & ~(uint64_t(1) << 63)) : ~b;
    double v;
    std::memcpy(&v, &raw, 8);
    return v;
  }

  int64_t k_, n_rows_, n_cols_, cap_;
  uint64_t smix_;
  std::vector<std::vector<Cand>> bufs_;
  std::vector<double> thr_;
};

// ------------------------------------------------------------------------------------------------ merge
// The merged rows: kept entries (keep[i] != 0; all without a mask) plus the new columns nc[nptr[r]:nptr[r+1]]
// of each row (sorted, distinct). Writes rowptr2 (n_rows + 1) and returns (col2, gather, newpos) arrays through
// the out-parameters; gather[j] = old position or -1, newpos[q] = where new entry q landed. GIL released inside.
struct Merged {
  std::vector<int64_t> len;
  int64_t bad_row = -1;
};

template <class Alloc>
void merge_impl(const int32_t* rp, const int32_t* co, const uint8_t* keep, int64_t n_rows, int64_t n_cols,
                const int64_t* nptr, const int32_t* nc, int nt, Merged& M, Alloc alloc) {
  M.len.assign(n_rows + 1, 0);
  int64_t max_row = 0;
  for (int64_t r = 0; r < n_rows; ++r) max_row = std::max<int64_t>(max_row, rp[r + 1] - rp[r]);
  (void)n_cols;
#pragma omp parallel for num_threads(nt) schedule(static)
  for (int64_t r = 0; r < n_rows; ++r) {
    int64_t c = 0;
    if (keep) {
      for (int32_t i = rp[r]; i < rp[r + 1]; ++i) c += keep[i] != 0;
    } else {
      c = rp[r + 1] - rp[r];
    }
    M.len[r + 1] = c + nptr[r + 1] - nptr[r];
  }
  for (int64_t r = 0; r < n_rows; ++r) M.len[r + 1] += M.len[r];
  int32_t *co2, *g;
  int64_t* np_;
  if (!alloc(M.len[n_rows], &co2, &g, &np_)) return;
  const int64_t* len = M.len.data();
  int64_t bad_row = -1;
#pragma omp parallel num_threads(nt)
  {
    // Local restrict copies: without them the compiler reloads every pointer after each store.
    int32_t* __restrict oc = co2;
    int32_t* __restrict og = g;
    int64_t* __restrict on = np_;
    const int32_t* __restrict ic = co;
    const uint8_t* __restrict kp = keep;
    const int32_t* __restrict nn = nc;
    std::vector<int32_t> kcv(max_row), kiv(max_row);  // the row's kept columns and their old positions
    int32_t* __restrict kc = kcv.data();
    int32_t* __restrict ki = kiv.data();
    int64_t bad = -1;
#pragma omp for schedule(dynamic, 64)
    for (int64_t r = 0; r < n_rows; ++r) {
      int64_t n = 0;
      const int32_t i0 = rp[r], i1 = rp[r + 1];
      if (kp) {
        for (int32_t i = i0; i < i1; ++i) {  // branch-free compaction
          kc[n] = ic[i];
          ki[n] = i;
          n += kp[i] != 0;
        }
      } else {
        for (int32_t i = i0; i < i1; ++i, ++n) {
          kc[n] = ic[i];
          ki[n] = i;
        }
      }
      int64_t a = 0, q = nptr[r], o = len[r];
      const int64_t qe = nptr[r + 1];
      while (a < n && q < qe) {
        const int32_t ca = kc[a], cq = nn[q];
        if (ca < cq) {
          oc[o] = ca;
          og[o++] = ki[a++];
        } else {
          if (ca == cq) bad = r;
          on[q] = o;
          oc[o] = cq;
          og[o++] = -1;
          ++q;
        }
      }
      for (; a < n; ++a) {
        oc[o] = kc[a];
        og[o++] = ki[a];
      }
      for (; q < qe; ++q) {
        on[q] = o;
        oc[o] = nn[q];
        og[o++] = -1;
      }
    }
    if (bad >= 0) {
#pragma omp critical
      bad_row = bad;
    }
  }
  M.bad_row = bad_row;
}

// merge_impl with numpy outputs: allocation needs the GIL, so it is taken back around it.
py::tuple merge_to_arrays(const int32_t* rp, const int32_t* co, const uint8_t* keep, int64_t n_rows, int64_t n_cols,
                          const int64_t* nptr, const int32_t* nc, int64_t kn, int nt) {
  Merged M;
  Arr<int32_t> col2, gather;
  Arr<int64_t> newpos;
  bool too_big = false;
  {
    py::gil_scoped_release nogil;
    merge_impl(rp, co, keep, n_rows, n_cols, nptr, nc, nt, M, [&](int64_t nnz2, int32_t** c2, int32_t** g, int64_t** np_) {
      if (nnz2 > std::numeric_limits<int32_t>::max()) {
        too_big = true;
        return false;
      }
      py::gil_scoped_acquire gil;
      col2 = Arr<int32_t>(nnz2);
      gather = Arr<int32_t>(nnz2);
      newpos = Arr<int64_t>(kn);
      *c2 = mptr(col2);
      *g = mptr(gather);
      *np_ = mptr(newpos);
      return true;
    });
  }
  require(!too_big, "nnz does not fit int32 indices");
  require(M.bad_row < 0, "a new entry lands on a kept entry (row " + std::to_string(M.bad_row) + ")");
  Arr<int32_t> rowptr2(n_rows + 1);
  for (int64_t r = 0; r <= n_rows; ++r) mptr(rowptr2)[r] = int32_t(M.len[r]);
  return py::make_tuple(rowptr2, col2, gather, newpos);
}

// New CSR from the kept entries (keep[i] != 0; all without a mask) and new entries (rows, cols) given in row-major
// order. Returns (rowptr, col, gather, newpos): gather[j] (int32) = the old position of entry j, or -1 for a new
// one, so one gather permutes values and optimizer states; newpos (int64, (k,)) = where the new entries landed,
// in their given order. A new entry on a kept position is an error.
py::tuple merge(const Arr<int32_t>& rowptr, const Arr<int32_t>& col, const py::object& keep_obj,
                const Arr<int32_t>& new_rows, const Arr<int32_t>& new_cols, int64_t n_cols, int threads) {
  check_structure(rowptr, col);
  const int64_t nnz = numel(col), n_rows = numel(rowptr) - 1, kn = numel(new_rows);
  require(numel(new_cols) == kn, "new_rows and new_cols must have the same length");
  Arr<uint8_t> hold;
  const uint8_t* keep = opt_mask(keep_obj, nnz, hold);
  const int32_t* nr = cptr(new_rows);
  const int32_t* nc = cptr(new_cols);
  std::vector<int64_t> nptr(n_rows + 1, 0);
  for (int64_t j = 0; j < kn; ++j) {
    if (nr[j] < 0 || nr[j] >= n_rows || nc[j] < 0 || nc[j] >= n_cols)
      throw std::invalid_argument("new entry " + std::to_string(j) + " out of range");
    if (j > 0 && !(nr[j] > nr[j - 1] || (nr[j] == nr[j - 1] && nc[j] > nc[j - 1])))
      throw std::invalid_argument("new entries must be distinct and in row-major order");
    nptr[nr[j] + 1]++;
  }
  for (int64_t r = 0; r < n_rows; ++r) nptr[r + 1] += nptr[r];
  return merge_to_arrays(cptr(rowptr), cptr(col), keep, n_rows, n_cols, nptr.data(), nc, kn,
                         nthreads_for(threads, nnz + kn));
}

// SET's regrowth in one call: merge(keep, random_absent(occupied, k)) without the round trip through Python.
// Returns None when the empty positions are few (random_absent then enumerates them; call it and merge instead).
py::object regrow_random(const Arr<int32_t>& rowptr, const Arr<int32_t>& col, const py::object& keep_obj,
                         const py::object& occupied_obj, int64_t n_cols, int64_t k, uint64_t seed, int threads) {
  check_structure(rowptr, col);
  const int64_t nnz = numel(col), n_rows = numel(rowptr) - 1;
  require(n_cols >= 0, "n_cols must be non-negative");
  Arr<uint8_t> hold_k, hold_o;
  const uint8_t* keep = opt_mask(keep_obj, nnz, hold_k);
  const Occ O{cptr(rowptr), cptr(col), opt_mask(occupied_obj, nnz, hold_o)};
  const uint64_t N = uint64_t(n_rows) * uint64_t(n_cols);
  const int64_t A = empty_positions(O, nnz, N, k);
  if (!StreamDraw::feasible(N, A, k)) return py::none();
  const int nt = nthreads_for(threads, nnz + 2 * k);
  StreamDraw D;
  std::vector<int64_t> off(n_rows + 1, 0);
  std::vector<int32_t> nc(k);
  bool ok;
  {
    py::gil_scoped_release nogil;
    ok = D.run(O, n_rows, n_cols, A, k, seed_mix(seed), nt);
    if (ok && k > 0) D.collect(n_rows, nt, off.data(), nc.data(), nullptr);
  }
  require(ok, "random regrowth: could not draw the new positions");
  return merge_to_arrays(cptr(rowptr), cptr(col), keep, n_rows, n_cols, off.data(), nc.data(), k, nt);
}

// Column-ordered (transpose) index: the same (colptr, row, perm) as transpose_index in pattern.cpp, by a stable
// counting sort run in parallel over row ranges (each thread places its rows after those of earlier threads in
// every column). (row, pos) pairs are written interleaved, one write stream per column instead of two, then split.
// With int16_t indices (a compact pattern) perm holds each entry's offset inside its row (see pattern.cpp).
template <class I>
static py::tuple transpose_parallel_as(const Arr<int32_t>& rowptr, const Arr<int32_t>& col, int64_t n_cols,
                                       int threads) {
  constexpr bool offsets = sizeof(I) == 2;
  check_structure(rowptr, col);
  const int64_t nnz = numel(col), n_rows = numel(rowptr) - 1;
  require(n_cols >= 0, "n_cols must be non-negative");
  require(!offsets || (n_rows <= COMPACT_MAX_DIM && n_cols <= COMPACT_MAX_DIM),
          "a compact (int16) transpose index needs both dimensions at most 32768");
  const int32_t* rp = cptr(rowptr);
  const int32_t* co = cptr(col);
  Arr<int32_t> colptr(n_cols + 1);
  Arr<I> row(nnz), perm(nnz);
  int32_t* cp = mptr(colptr);
  I* ro = mptr(row);
  I* pe = mptr(perm);
  const int nt = nthreads_for(threads, nnz);
  bool bad = false;
  {
    py::gil_scoped_release nogil;
    std::vector<int64_t> rs(nt + 1, n_rows);  // row ranges with about nnz / nt entries each
    rs[0] = 0;
    for (int t = 1; t < nt; ++t) rs[t] = std::upper_bound(rp, rp + n_rows + 1, int32_t(nnz * t / nt)) - rp - 1;
    for (int t = 1; t <= nt; ++t) rs[t] = std::max(rs[t], rs[t - 1]);
    const size_t stride = size_t(n_cols) + 1;
    std::vector<int64_t> cc(size_t(nt) * stride, 0);  // per-thread column counts, then per-thread next slots
#pragma omp parallel num_threads(nt) reduction(|| : bad)
    {
      const int id = thread_id();
      int64_t* c = cc.data() + size_t(id) * stride;
      for (int64_t p = rp[rs[id]]; p < rp[rs[id + 1]]; ++p) {
        const bool ok = co[p] >= 0 && co[p] < n_cols;
        bad = bad || !ok;
        c[ok ? co[p] : n_cols]++;
      }
    }
    if (!bad) {
      int64_t o = 0;
      for (int64_t j = 0; j < n_cols; ++j) {
        cp[j] = int32_t(o);
        for (int t = 0; t < nt; ++t) {
          const int64_t c = cc[size_t(t) * stride + j];
          cc[size_t(t) * stride + j] = o;
          o += c;
        }
      }
      cp[n_cols] = int32_t(o);
      // Columns in groups of at most GROUP_COLS, one sweep of the rows per group: the 2 * GROUP_COLS output
      // cache lines being filled stay in L2 (a single sweep over 4096 columns thrashes it). Inside a row, the
      // group is a contiguous range of the sorted columns, found by binary search.
      const int64_t n_groups = std::max<int64_t>(1, (n_cols + GROUP_COLS - 1) / GROUP_COLS);
#pragma omp parallel num_threads(nt)
      {
        const int id = thread_id();
        int64_t* next = cc.data() + size_t(id) * stride;
        for (int64_t gi = 0; gi < n_groups; ++gi) {
          const int32_t lo = int32_t(gi * n_cols / n_groups), hi = int32_t((gi + 1) * n_cols / n_groups);
          for (int64_t r = rs[id]; r < rs[id + 1]; ++r) {
            const int32_t* b = co + rp[r];
            const int32_t* e = co + rp[r + 1];
            if (n_groups > 1) b = std::lower_bound(b, e, lo);
            for (const int32_t* p = b; p < e && *p < hi; ++p) {
              const int64_t t = next[*p]++;
              ro[t] = I(r);
              pe[t] = I(offsets ? p - co - rp[r] : p - co);
            }
          }
        }
      }
    }
  }
  require(!bad, "column index out of range");
  return py::make_tuple(colptr, row, perm);
}

py::tuple transpose_parallel(const Arr<int32_t>& rowptr, const Arr<int32_t>& col, int64_t n_cols, int threads,
                             bool compact) {
  return compact ? transpose_parallel_as<int16_t>(rowptr, col, n_cols, threads)
                 : transpose_parallel_as<int32_t>(rowptr, col, n_cols, threads);
}

// out[j] = src[gather[j]] (rows of `width` elements), zero where gather[j] < 0; then, when given, the new entries'
// values: out[newpos[q]] = newvals[q]. With newpos, the new entries (gather < 0) must be exactly those positions:
// the main loop then reads src[0] for them (no branch) and the fix-up writes them.
template <class T>
void gather_rows(const Arr<T>& src, const Arr<int32_t>& gather, Arr<T>& out, const py::object& newpos_obj,
                 const py::object& newvals_obj, int threads) {
  const int64_t n = numel(gather);
  require(n > 0 ? numel(out) % n == 0 : numel(out) == 0, "out must have one row per gather entry");
  const int64_t width = n > 0 ? numel(out) / n : 1;
  require(width > 0 && numel(src) % width == 0, "src and out must have the same row width");
  const int64_t n_src = numel(src) / width;
  Arr<int64_t> newpos;
  Arr<T> newvals;
  int64_t kn = 0;
  const T* nv = nullptr;
  if (!newpos_obj.is_none()) {
    newpos = newpos_obj.cast<Arr<int64_t>>();
    kn = numel(newpos);
    for (int64_t q = 0; q < kn; ++q)
      if (cptr(newpos)[q] < 0 || cptr(newpos)[q] >= n) throw std::invalid_argument("newpos out of range");
    if (!newvals_obj.is_none()) {
      newvals = newvals_obj.cast<Arr<T>>();
      require(numel(newvals) == kn * width, "newvals must hold one row per new position");
      nv = cptr(newvals);
    }
  }
  const int32_t* g = cptr(gather);
  const T* s = cptr(src);
  T* o = mptr(out);
  const int nt = nthreads_for(threads, numel(out));
  int32_t gmax = -1;
  int64_t n_new = 0;
  {
    py::gil_scoped_release nogil;
#pragma omp parallel for num_threads(nt) schedule(static) reduction(max : gmax) reduction(+ : n_new)
    for (int64_t j = 0; j < n; ++j) {
      gmax = std::max(gmax, g[j]);
      n_new += g[j] < 0;
    }
  }
  require(gmax < n_src, "gather index out of range");
  require(newpos_obj.is_none() || n_new == kn, "newpos must list exactly the entries with gather < 0");
  {
    py::gil_scoped_release nogil;
    if (width == 1) {
      if (kn == n_new && !newpos_obj.is_none()) {
        // New entries read s[0] and are fixed up below. The clamp is bit arithmetic: std::max compiles to a branch
        // here, which the random new entries mispredict (7x slower).
#pragma omp parallel for num_threads(nt) schedule(static)
        for (int64_t j = 0; j < n; ++j) o[j] = s[g[j] & ~(g[j] >> 31)];
      } else {
        using U = typename std::conditional<sizeof(T) == 4, uint32_t, uint64_t>::type;
#pragma omp parallel for num_threads(nt) schedule(static)
        for (int64_t j = 0; j < n; ++j) {  // branch-free: read s[0], then mask the bits to 0
          const int32_t i = g[j];
          U bits;
          std::memcpy(&bits, s + (i & ~(i >> 31)), sizeof(T));
          bits &= U(0) - U(i >= 0);
          std::memcpy(o + j, &bits, sizeof(T));
        }
      }
    } else {
#pragma omp parallel for num_threads(nt) schedule(static)
      for (int64_t j = 0; j < n; ++j) {
        if (g[j] >= 0) std::memcpy(o + j * width, s + int64_t(g[j]) * width, sizeof(T) * width);
        else std::fill(o + j * width, o + (j + 1) * width, T(0));
      }
    }
    const int64_t* np_ = kn ? cptr(newpos) : nullptr;
    if (width == 1) {
      if (nv) {
        for (int64_t q = 0; q < kn; ++q) o[np_[q]] = nv[q];
      } else {
        for (int64_t q = 0; q < kn; ++q) o[np_[q]] = T(0);
      }
    } else {
      for (int64_t q = 0; q < kn; ++q) {
        if (nv) std::memcpy(o + np_[q] * width, nv + q * width, sizeof(T) * width);
        else std::fill(o + np_[q] * width, o + (np_[q] + 1) * width, T(0));
      }
    }
  }
}

}  // namespace

void bind_dst(py::module_& m) {
  m.def("dst_prune_keep", &prune_keep<float>, py::arg("scores").noconvert(), py::arg("rowptr").noconvert(),
        py::arg("col").noconvert(), py::arg("n_cols"), py::arg("k"), py::arg("seed"), py::arg("threads") = 1,
        "uint8 keep mask: 0 for the k entries with the smallest (score, tie key), 1 for the others");
  m.def("dst_prune_keep", &prune_keep<double>, py::arg("scores").noconvert(), py::arg("rowptr").noconvert(),
        py::arg("col").noconvert(), py::arg("n_cols"), py::arg("k"), py::arg("seed"), py::arg("threads") = 1);
  m.def("dst_random_absent", &random_absent, py::arg("rowptr").noconvert(), py::arg("col").noconvert(),
        py::arg("mask"), py::arg("n_cols"), py::arg("k"), py::arg("seed"), py::arg("threads") = 1,
        "k distinct uniformly random positions not occupied by the (masked) CSR: (rows, cols) int32, row-major");
  m.def("dst_random_stream", &random_stream, py::arg("seed"), py::arg("start"), py::arg("count"), py::arg("n_rows"),
        py::arg("n_cols"));
  m.def("dst_tie_keys", &tie_keys, py::arg("pos").noconvert(), py::arg("seed"));
  m.def("dst_merge", &merge, py::arg("rowptr").noconvert(), py::arg("col").noconvert(), py::arg("keep"),
        py::arg("new_rows").noconvert(), py::arg("new_cols").noconvert(), py::arg("n_cols"), py::arg("threads") = 1,
        "(rowptr, col, gather int32 with -1 for new entries, newpos int64) of the kept plus new entries");
  m.def("dst_regrow_random", &regrow_random, py::arg("rowptr").noconvert(), py::arg("col").noconvert(),
        py::arg("keep"), py::arg("occupied"), py::arg("n_cols"), py::arg("k"), py::arg("seed"), py::arg("threads") = 1,
        "merge(keep, random_absent(occupied, k, seed)) in one call, or None when random_absent would enumerate");
  m.def("dst_transpose", &transpose_parallel, py::arg("rowptr").noconvert(), py::arg("col").noconvert(),
        py::arg("n_cols"), py::arg("threads") = 1, py::arg("compact") = false);
  m.def("dst_gather", &gather_rows<float>, py::arg("src").noconvert(), py::arg("gather").noconvert(),
        py::arg("out").noconvert(), py::arg("newpos") = py::none(), py::arg("newvals") = py::none(),
        py::arg("threads") = 1, "out[j] = src[gather[j]], 0 where gather[j] < 0; then out[newpos] = newvals");
  m.def("dst_gather", &gather_rows<double>, py::arg("src").noconvert(), py::arg("gather").noconvert(),
        py::arg("out").noconvert(), py::arg("newpos") = py::none(), py::arg("newvals") = py::none(),
        py::arg("threads") = 1);
  py::class_<TopKAbsent>(m, "DstTopK")
      .def(py::init<int64_t, int64_t, int64_t, uint64_t>(), py::arg("k"), py::arg("n_rows"), py::arg("n_cols"),
           py::arg("seed"))
      .def("push", &TopKAbsent::push<float>, py::arg("scores").noconvert(), py::arg("row0"),
           py::arg("rowptr").noconvert(), py::arg("col").noconvert(), py::arg("mask"), py::arg("threads") = 1)
      .def("push", &TopKAbsent::push<double>, py::arg("scores").noconvert(), py::arg("row0"),
           py::arg("rowptr").noconvert(), py::arg("col").noconvert(), py::arg("mask"), py::arg("threads") = 1)
      .def("result", &TopKAbsent::result);
}

}  // namespace sc
