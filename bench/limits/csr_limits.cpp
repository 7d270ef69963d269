// Where the CPU CSR SpMM's time goes, and what the loop orders that issue 16 proposed would gain: a standalone
// probe (one thread, AVX-512, fp32), independent of the package so that each loop is measured bare.
//
//   bash bench/limits/run.sh            (compiles with g++ -O3 -mavx512f and runs; ~20 s)
//
// Every variant computes Yt (rows x T) = W (rows x cols, CSR, int16 columns) * Xt (cols x T) for one batch tile of
// T = 32 fp32 rows stored feature-major (as the package's kernels do after transposing a tile), and is checked
// against the row-wise loop. Times are the best of `reps` runs of the whole tile.
//
//   peak     16 independent chains of 512-bit FMAs: the core's FMA rate (2 per cycle) and so its clock.
//   rowwise  the package's inner loop (kernels_impl.h, spmm_rows): per row, 4 entries per iteration on separate
//            accumulators, each entry a broadcast weight times the two vectors of its column's tile row.
//   panels   Compressed-Sparse-Blocks order: the columns cut into panels whose tile rows fit L1, the entries of
//            each panel stored contiguously (panel-major), the row accumulators reloaded and stored per segment.
//            `reorder` is the cost of gathering the values into that order (needed at every call: the optimizer
//            rewrites them in CSR order every step).
//   grouped  outer-product order inside groups of G rows: the group's entries sorted by column, each tile row
//            loaded once per column and multiplied into the accumulators of the group's rows (G x T floats, in L1).
//            `build` is the counting sort per group (needed at every call for the same reason).
#include <immintrin.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <vector>

typedef float v16 __attribute__((vector_size(64)));
static inline v16 ld(const float* p) { v16 v; std::memcpy(&v, p, 64); return v; }
static inline void st(float* p, v16 v) { std::memcpy(p, &v, 64); }
static inline v16 bc(float s) { return v16{s, s, s, s, s, s, s, s, s, s, s, s, s, s, s, s}; }
constexpr int T = 32;

struct Csr {
  int rows, cols;
  std::vector<int> rp;
  std::vector<int16_t> col;
  std::vector<float> val;
};

static Csr random_csr(int rows, int cols, double density, unsigned seed) {
  Csr a{rows, cols, std::vector<int>(rows + 1), {}, {}};
  std::mt19937 g(seed);
  std::bernoulli_distribution live(density);
  for (int j = 0; j < rows; ++j) {
    for (int c = 0; c < cols; ++c)
      if (live(g)) {
        a.col.push_back(int16_t(c));
        a.val.push_back(1.0f / float(1 + (c * 7 + j) % 13));
      }
    a.rp[j + 1] = int(a.col.size());
  }
  return a;
}

// 64-byte aligned float buffers, as the package's tile buffers are: a tile row of 128 bytes that straddled cache
// lines would cost three lines instead of two.
struct Buf {
  float* p;
  size_t n;
  explicit Buf(size_t n_) : p(static_cast<float*>(std::aligned_alloc(64, (n_ * sizeof(float) + 63) / 64 * 64))), n(n_) {}
  ~Buf() { std::free(p); }
  Buf(const Buf&) = delete;
  Buf& operator=(const Buf&) = delete;
  float* data() { return p; }
  size_t size() const { return n; }
  float& operator[](size_t i) { return p[i]; }
};

template <class F>
static double best_seconds(int reps, F f) {
  double best = 1e30;
  for (int r = 0; r < reps; ++r) {
    const auto t0 = std::chrono::steady_clock::now();
    f();
    best = std::min(best, std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
  }
  return best;
}

// ---------------------------------------------------------------------------------------------------- peak
__attribute__((noinline)) static double fma_per_second() {
  const long n = 100000000;
  __m512 acc[16];
  for (int i = 0; i < 16; ++i) acc[i] = _mm512_set1_ps(1.0f);
  const __m512 y = _mm512_set1_ps(0.999f), z = _mm512_set1_ps(0.001f);
  const auto t0 = std::chrono::steady_clock::now();
  for (long i = 0; i < n; ++i) {
#pragma GCC unroll 16
    for (int j = 0; j < 16; ++j) acc[j] = _mm512_fmadd_ps(acc[j], y, z);
  }
  const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  float keep = 0;
  for (int j = 0; j < 16; ++j) keep += _mm512_reduce_add_ps(acc[j]);
  if (keep == 12345.0f) std::puts("");  // keep the chains alive
  return 16.0 * n / s;
}

// ---------------------------------------------------------------------------------------------------- row-wise
// out[j] (T floats) = init + sum over entries [k, e) of val * Xt[col]: 4 entries per iteration on separate
// accumulators, then the rest on the first (the package's spmm_rows). init: the row's partial sums, or null for 0.
__attribute__((always_inline)) static inline void row_segment(const int16_t* col, const float* val, int k, int e,
                                                              const float* xt, const float* init, float* out) {
  v16 acc[4][2] = {};
  if (init) {
    acc[0][0] = ld(init);
    acc[0][1] = ld(init + 16);
  }
  for (; k + 3 < e; k += 4)
    for (int u = 0; u < 4; ++u) {
      const float* x = xt + int64_t(uint16_t(col[k + u])) * T;
      const v16 w = bc(val[k + u]);
      acc[u][0] += w * ld(x);
      acc[u][1] += w * ld(x + 16);
    }
  for (; k < e; ++k) {
    const float* x = xt + int64_t(uint16_t(col[k])) * T;
    const v16 w = bc(val[k]);
    acc[0][0] += w * ld(x);
    acc[0][1] += w * ld(x + 16);
  }
  st(out, (acc[0][0] + acc[1][0]) + (acc[2][0] + acc[3][0]));
  st(out + 16, (acc[0][1] + acc[1][1]) + (acc[2][1] + acc[3][1]));
}

__attribute__((noinline)) static void rowwise(const Csr& a, const float* xt, float* out) {
  for (int j = 0; j < a.rows; ++j)
    row_segment(a.col.data(), a.val.data(), a.rp[j], a.rp[j + 1], xt, nullptr, out + j * T);
}

// ---------------------------------------------------------------------------------------------------- panels
struct Panels {
  int width, n;
  std::vector<int> seg;  // (n panels) x (rows + 1): start of row j's entries in panel q, panel-major storage
  std::vector<int> src;  // CSR position of each panel-major entry (the values' reorder)
  std::vector<int16_t> col;
  std::vector<float> val;
};

static Panels make_panels(const Csr& a, int width) {
  Panels p{width, (a.cols + width - 1) / width, {}, {}, {}, {}};
  p.seg.resize(size_t(p.n) * (a.rows + 1));
  std::vector<int> cur(a.rp.begin(), a.rp.end() - 1);
  for (int q = 0; q < p.n; ++q) {
    for (int j = 0; j < a.rows; ++j) {
      p.seg[size_t(q) * (a.rows + 1) + j] = int(p.col.size());
      for (; cur[j] < a.rp[j + 1] && a.col[cur[j]] < (q + 1) * width; ++cur[j]) {
        p.src.push_back(cur[j]);
        p.col.push_back(a.col[cur[j]]);
        p.val.push_back(a.val[cur[j]]);
      }
    }
    p.seg[size_t(q) * (a.rows + 1) + a.rows] = int(p.col.size());
  }
  return p;
}

__attribute__((noinline)) static void reorder_values(const Panels& p, const Csr& a, float* dst) {
  const size_t n = p.src.size();
  for (size_t i = 0; i < n; ++i) dst[i] = a.val[p.src[i]];
}

__attribute__((noinline)) static void panels(const Panels& p, int rows, const float* xt, float* out) {
  for (int q = 0; q < p.n; ++q) {
    const int* s = p.seg.data() + size_t(q) * (rows + 1);
    for (int j = 0; j < rows; ++j)  // the row's sums so far come back for each panel after the first
      row_segment(p.col.data(), p.val.data(), s[j], s[j + 1], xt, q ? out + j * T : nullptr, out + j * T);
  }
}

// ---------------------------------------------------------------------------------------------------- grouped
struct Grouped {
  int g;
  std::vector<int> gstart, rstart;  // per group: first entry, first column run
  std::vector<int16_t> rcol;        // per run: its column
  std::vector<uint16_t> rcnt;       // per run: its entries
  std::vector<uint8_t> erow;        // per entry: its row inside the group
  std::vector<float> eval;
};

__attribute__((noinline)) static void build_grouped(const Csr& a, int g, Grouped& out) {
  const int ng = (a.rows + g - 1) / g;
  out = Grouped{g, std::vector<int>(ng + 1), std::vector<int>(ng + 1), {}, {},
                std::vector<uint8_t>(a.col.size()), std::vector<float>(a.col.size())};
  std::vector<int> cnt(a.cols + 1);
  for (int q = 0; q < ng; ++q) {
    const int r0 = q * g, r1 = std::min(a.rows, r0 + g);
    out.gstart[q] = a.rp[r0];
    out.rstart[q] = int(out.rcol.size());
    std::fill(cnt.begin(), cnt.end(), 0);
    for (int k = a.rp[r0]; k < a.rp[r1]; ++k) cnt[a.col[k] + 1]++;
    for (int c = 0; c < a.cols; ++c) {
      if (cnt[c + 1]) {
        out.rcol.push_back(int16_t(c));
        out.rcnt.push_back(uint16_t(cnt[c + 1]));
      }
      cnt[c + 1] += cnt[c];
    }
    for (int j = r0; j < r1; ++j)
      for (int k = a.rp[j]; k < a.rp[j + 1]; ++k) {
        const int pos = a.rp[r0] + cnt[a.col[k]]++;
        out.erow[pos] = uint8_t(j - r0);
        out.eval[pos] = a.val[k];
      }
  }
  out.gstart[ng] = a.rp[a.rows];
  out.rstart[ng] = int(out.rcol.size());
}

__attribute__((noinline)) static void grouped(const Grouped& g, int rows, const float* xt, float* out) {
  alignas(64) static float acc[256 * T];
  const int ng = (rows + g.g - 1) / g.g;
  for (int q = 0; q < ng; ++q) {
    const int nr = std::min(g.g, rows - q * g.g);
    std::memset(acc, 0, sizeof(float) * nr * T);
    int e = g.gstart[q];
    for (int r = g.rstart[q]; r < g.rstart[q + 1]; ++r) {
      const float* x = xt + int64_t(uint16_t(g.rcol[r])) * T;
      const v16 x0 = ld(x), x1 = ld(x + 16);
      for (int i = 0; i < g.rcnt[r]; ++i, ++e) {
        float* y = acc + g.erow[e] * T;
        const v16 w = bc(g.eval[e]);
        st(y, ld(y) + w * x0);
        st(y + 16, ld(y + 16) + w * x1);
      }
    }
    std::memcpy(out + size_t(q) * g.g * T, acc, sizeof(float) * nr * T);
  }
}

// ---------------------------------------------------------------------------------------------------- main
static double max_rel(const float* a, const float* b, size_t n) {
  double m = 0;
  for (size_t i = 0; i < n; ++i) m = std::max(m, std::fabs(double(a[i]) - b[i]) / (1 + std::fabs(double(a[i]))));
  return m;
}

int main() {
  const double fma = fma_per_second();
  const double ghz = fma / 2e9;  // two 512-bit FMA ports
  std::printf("peak: %.2f G 512-bit FMA/s on one core (%.2f GHz at 2 per cycle); fp32 peak %.0f GFLOP/s per core\n",
              fma / 1e9, ghz, fma * 32 / 1e9);
  std::printf("\n%-46s %12s %10s %12s\n", "one batch tile (T = 32 fp32 rows)", "ns / entry", "x rowwise", "per call");

  struct Case { int rows, cols; double d; const char* what; };
  for (const Case& c : {Case{4096, 4096, 0.1, "4096x4096, 10%: tile 512 KiB (L2)"},
                        Case{4096, 256, 0.1, "4096x256, 10%: tile 32 KiB (L1), 25.6 per row"}}) {
    const Csr a = random_csr(c.rows, c.cols, c.d, 1);
    const double nnz = double(a.col.size());
    Buf xt(size_t(c.cols) * T), ref(size_t(c.rows) * T), out(size_t(c.rows) * T);
    for (size_t i = 0; i < xt.size(); ++i) xt[i] = float(i % 13) * 0.1f - 0.5f;
    const double t_row = best_seconds(20, [&] { rowwise(a, xt.data(), ref.data()); });
    const double cycles = t_row * ghz * 1e9 / nnz;
    std::printf("%s\n  %-44s %12.3f %10s %12s  (%.2f cycles, %.0f bytes of tile rows per cycle)\n", c.what,
                "rowwise (the package's loop)", t_row * 1e9 / nnz, "1.00", "", cycles, 2 * 64 / cycles);
    if (c.cols < 1024) continue;
    for (int w : {512, 384, 256}) {
      const Panels p = make_panels(a, w);
      const double t = best_seconds(20, [&] { panels(p, c.rows, xt.data(), out.data()); });
      std::vector<float> tmp(p.src.size());
      const double t_re = best_seconds(5, [&] { reorder_values(p, a, tmp.data()); });
      char name[64];
      std::snprintf(name, sizeof name, "panels of %d columns (%.1f per segment)", w, nnz / c.rows / p.n);
      std::printf("  %-44s %12.3f %10.2f %9.2f ms  (reorder; max rel. diff %.0e)\n", name, t * 1e9 / nnz,
                  t_row / t, t_re * 1e3, max_rel(ref.data(), out.data(), out.size()));
    }
    for (int g : {64, 128, 256}) {
      Grouped gr;
      const double t_b = best_seconds(3, [&] { build_grouped(a, g, gr); });
      const double t = best_seconds(20, [&] { grouped(gr, c.rows, xt.data(), out.data()); });
      char name[64];
      std::snprintf(name, sizeof name, "grouped, G = %d (%.1f entries per column)", g, nnz / gr.rcol.size());
      std::printf("  %-44s %12.3f %10.2f %9.2f ms  (build; max rel. diff %.0e)\n", name, t * 1e9 / nnz, t_row / t,
                  t_b * 1e3, max_rel(ref.data(), out.data(), out.size()));
    }
  }
  return 0;
}
