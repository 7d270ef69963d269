// CSR kernels for the CPU: forward SpMM, transposed SpMM (dX, through the stored transpose index) and SDDMM
// (dW at the live connections). The math lives in kernels_impl.h; this file compiles it per ISA, picks the
// tile width, splits the work across threads and exposes the entry points to Python.
#include <algorithm>
#include <atomic>
#include <type_traits>
#include <utility>
#include <vector>

#include <unistd.h>

#include "bf16.h"
#include "common.h"
#include "dispatch.h"
#include "scratch.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>  // the bf16 conversions and AVX512-BF16 intrinsics of kernels_impl.h (under each copy's target pragma)
#endif

#define SC_ISA generic
#define SC_VBYTES 16
#include "kernels_impl.h"
#undef SC_ISA
#undef SC_VBYTES

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define SC_HAVE_AVX2 1
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#define SC_ISA avx2
#define SC_VBYTES 32
#include "kernels_impl.h"
#undef SC_ISA
#undef SC_VBYTES
#pragma GCC pop_options
// AVX-512 (F, VL, DQ, BW): a 64-byte vector holds 16 fp32 batch rows of a tile row; GCC turns each two-source shuffle of
// the transposes and horizontal sums into one vpermt2ps/pd.
#pragma GCC push_options
#pragma GCC target("avx512f,avx512vl,avx512dq,avx512bw,avx2,fma")
#define SC_ISA avx512
#define SC_VBYTES 64
#include "kernels_impl.h"
#undef SC_ISA
#undef SC_VBYTES
#pragma GCC pop_options
// AVX-512 plus AVX512-BF16, for the bf16 kernels only (templates: only what the dispatch below calls is compiled):
// the SDDMM keeps its tiles in bf16 and takes its dot products with vdpbf16ps (kernels_impl.h, SC_BF16_DOT).
#pragma GCC push_options
#pragma GCC target("avx512f,avx512vl,avx512dq,avx512bw,avx512bf16,avx2,fma")
#define SC_ISA avx512bf16
#define SC_VBYTES 64
#define SC_BF16_DOT 1
#include "kernels_impl.h"
#undef SC_BF16_DOT
#undef SC_ISA
#undef SC_VBYTES
#pragma GCC pop_options
#endif

namespace sc {

// Boundaries that give each of nt threads about the same work (nnz plus a per-row cost) over rows [0, n).
std::vector<int64_t> balanced_split(const int32_t* rp, int64_t n, int nt) {
  constexpr int64_t row_cost = 4;  // a row's fixed cost (accumulator setup, stores) in nonzero-equivalents
  std::vector<int64_t> s(nt + 1, n);
  s[0] = 0;
  const double total = double(rp[n]) + double(row_cost) * n;
  int64_t j = 0;
  for (int p = 1; p < nt; ++p) {
    const double target = total * p / nt;
    while (j < n && double(rp[j]) + double(row_cost) * j < target) ++j;
    s[p] = j;
  }
  return s;
}

constexpr int64_t GATHER_PREFETCH = 64;  // values[perm] gather: how many entries ahead it prefetches
// values above g_gather_blocked_from bytes are gathered by gather_by_row_blocks, in row blocks of about
// g_gather_block_bytes of values (tuning hook: _set_gather_blocks)
constexpr int64_t GATHER_BLOCKED_FROM = int64_t(12) << 20, GATHER_BLOCK_BYTES = int64_t(8) << 20;
static int64_t g_gather_blocked_from = GATHER_BLOCKED_FROM, g_gather_block_bytes = GATHER_BLOCK_BYTES;
static int g_nv_override = 0;  // tuning hook: force the vectors per tile row (0 = automatic)
static int g_spmm_split = 0;    // tuning hook: SpMM work split, 0 = automatic, 1 = by rows, 2 = by tiles
static int g_sddmm_tiles = 0;   // tuning hook: SDDMM tile buffers, 0 = automatic, 1 = shared, 2 = per thread
// SDDMM column blocks: bytes of the transposed X tile gathered from per block, half of one core's L2 (the other
// half for the streamed dY^T rows and dW). Measured at 4096x4096, batch 256, 2 threads: on a 2-core Zen 3 (512 KiB
// L2), 10% density, 256 KiB blocks ~8% faster than the whole 1 MiB tile; on a 2-core Zen 4 (1 MiB L2, AVX-512
// 512 KiB tiles), one 512 KiB block against two of 256 KiB: 0.94x, 1.00x, 0.99x at 10% density, 0.97x at 5%
// (paired, 30-40 rounds each).
int64_t l2_bytes_per_core() {
#if defined(_SC_LEVEL2_CACHE_SIZE)
  const long b = sysconf(_SC_LEVEL2_CACHE_SIZE);
  if (b >= (64 << 10) && b <= (64 << 20)) return b;
#endif
  return 512 << 10;  // unknown: Zen 3's
}
static int64_t default_sddmm_block_bytes() { return l2_bytes_per_core() / 2; }
static int64_t g_sddmm_block_bytes = default_sddmm_block_bytes();

// Vectors per batch tile row (T = NV * lanes rows). Measured on a 2-core Zen 3 (AVX2), 4096x4096, batch 256, 1-10%
// density: SpMM is fastest with T = 16 fp32 rows (the X tile, 256 KiB, stays in L2); SDDMM with T = 64 (fewer
// horizontal reductions and read-modify-writes of dW per connection; the 1 MiB tile is read in L2-sized column
// blocks). With AVX-512, on a 2-core Zen 4 (1 MiB L2 per core), both are fastest with two 64-byte vectors per
// tile row (T = 32 fp32 rows), paired time ratios against the AVX2 copy over 40-200 interleaved calls, 2 threads:
// 4096x4096 batch 256, forward 0.93 (10% density) and 0.90 (1%), dW 0.83 and 0.74 (T = 64: 0.90 and 0.71);
// 1000x1000 batch 100 at 4.5%: forward and dX equal, dW 0.76. Two vectors per row also mean one broadcast weight
// feeds two FMAs, and there are 32 vector registers for the accumulators.
constexpr int SPMM_MAX_NV = 2;               // every instruction set
constexpr int SDDMM_MAX_NV[4] = {8, 8, 2, 2};   // generic, AVX2, AVX-512, AVX-512 + BF16 (indexed by Isa)
//
// Wider AVX-512 tiles where each tile row is read many times and the tile still fits half an L2. On a 2-core Intel
// Xeon (2 MiB L2 per core), 4096x4096, batch 256, 1 thread, 8 interleaved rounds, time against T = 32 rows:
// 10% density (410 reads per tile row): SpMM T = 64 0.92 (forward) / 0.96 (dX), T = 128 1.41 / 1.38; SDDMM
// T = 64 0.89, T = 128 0.81; 1% (41 reads per row): SpMM T = 64 1.05 / 1.04, SDDMM T = 64 0.995, T = 128 1.19. A
// wider tile costs its L2 footprint and pays back per read (one index load and one broadcast feed more FMAs).
constexpr double WIDE_TILE_READS = 128.0;  // reads per tile row (nnz / n_cols) from which wider tiles pay
static int spmm_max_nv(int isa, int64_t nnz, int64_t n_cols, int64_t elem_bytes, int64_t l2) {
  if (isa < ISA_AVX512 || double(nnz) < WIDE_TILE_READS * double(n_cols > 0 ? n_cols : 1)) return SPMM_MAX_NV;
  const int64_t wide = 2 * SPMM_MAX_NV;  // 64 fp32 rows
  return n_cols * wide * (64 / elem_bytes) * elem_bytes <= l2 / 2 ? int(wide) : SPMM_MAX_NV;
}
// The SDDMM reads its tile in column blocks of half an L2, so the tile's size does not bound it, but the L2 does:
// on a 2-core Zen 4 (1 MiB L2 per core), 4096x4096 batch 256 at 10%, 2 threads, 15 interleaved rounds, T = 128
// took 1.27x and T = 64 1.36x the time of T = 32 (at 3%: equal); the gain above was measured with 2 MiB.
constexpr int64_t WIDE_SDDMM_MIN_L2 = int64_t(2) << 20;
static int sddmm_max_nv(int isa, int64_t nnz, int64_t n_cols, int64_t l2) {
  if (isa < ISA_AVX512 || l2 < WIDE_SDDMM_MIN_L2 ||
      double(nnz) < WIDE_TILE_READS * double(n_cols > 0 ? n_cols : 1))
    return SDDMM_MAX_NV[isa];
  return 8;
}
//
// bf16. The tiles stay in bf16 (half the bytes of an fp32 tile: these kernels are bound by reading tile rows from
// L2), widened to fp32 two vectors per load by integer ops (kernels_impl.h, widen_pairs), or multiplied as bf16 by
// vdpbf16ps (the SDDMM under avx512bf16). Measured on a 2-core Intel Xeon with AVX512-BF16 and 2 MiB L2 per core,
// 4096x4096, batch 256, 2 threads, medians of 15-20 interleaved calls, time relative to the fp32 kernel, at 10% / 1%
// density; the first design, widening into fp32 tiles during the transpose, in brackets:
//   forward  AVX-512 0.85 / 0.98 (1.04 / 1.05), AVX2 0.93 / 1.03 (1.02 / 1.04)
//   dX       AVX-512 0.76 / 0.92 (0.94 / 1.00), AVX2 0.86 / 1.01 (0.95 / 1.05)
//   dW       vdpbf16ps T = 128 rows 0.77 / 0.88 (T = 64: 0.93 / 0.91, T = 32: 0.98 / 0.98);
//            AVX-512 widened T = 128 0.87 / 0.99 (T = 32: 1.09 / 1.02; fp32 tiles 1.10 / 1.03);
//            AVX2 widened T = 64 1.02 / 0.96 (fp32 tiles 1.03 / 1.02)
// So the bf16 SpMMs keep the fp32 tile widths and the bf16 SDDMM takes 8 vectors of fp32 lanes per tile row in
// every copy: fewer horizontal sums and dW read-modify-writes per entry, the arithmetic being cheaper than fp32's.
constexpr int BF16_SDDMM_MAX_NV = 8;
//
// A batch that is not a multiple of the widest tile goes in chunks of narrower tiles, so that little of the last
// tile is padding. Each tile is one pass over every nonzero, and a pass costs about the same whatever its width
// (the loads of indices and broadcast weights bound it), so a remainder of fewer than `lanes` rows does not get a
// pass of its own: it joins the last tile before it, one vector wider (tiles of 3 and 5 vectors). Batch 100 with
// AVX2 (8 lanes): the SDDMM runs 64 + 36 rows (tiles of 8 and 5 vectors; it ran 64 + 32 + 4 before), the SpMMs
// 80 + 20 (five 16-row tiles and one of 24; before: six of 16 and one of 8). Measured on a 2-core Zen 3, 1 thread,
// 1000x1000 at 4.5%, batch 100 (see docs/BENCHMARKS.md). bf16 keeps the power-of-two widths (the AVX512-BF16 dot
// products read whole 32-row pairs of vectors). Each chunk is one kernel call (nb batch rows from b0, nv vectors
// per tile row).
struct BatchChunk {
  int64_t b0, nb;
  int nv;
};

// Feature-major operands are read in place (no copy into the tile buffers) while a tile row is read fewer than
// this many times on average (nnz / n_cols): then a copy costs more than the scattered reads it saves.
static double g_fm_in_place_reads = 8.0;  // tuning hook: _set_fm_in_place_reads (0 = never in place)
static bool fm_in_place(int64_t nnz, int64_t n_cols) {
  return double(nnz) < g_fm_in_place_reads * double(n_cols > 0 ? n_cols : 1);
}

static int widest_nv(const std::vector<BatchChunk>& chunks) {
  int w = 1;
  for (const BatchChunk& c : chunks) w = std::max(w, c.nv);
  return w;
}

static bool g_merge_tail = true;  // tuning hook: _set_merge_tail (false: the remainder gets a pass of its own)

// odd_widths: whether the kernel has tiles of 3 and 5 vectors (not bf16: see above). A forced width (the
// _set_tile_vectors hook) of 3 or 5 runs as 4 or 8 where it has not.
static std::vector<BatchChunk> batch_chunks(int64_t B, int lanes, int max_nv, bool odd_widths = true) {
  if (g_nv_override || B <= 0) {
    int nv = g_nv_override ? g_nv_override : 1;
    if (!odd_widths && (nv == 3 || nv == 5)) nv = nv == 3 ? 4 : 8;
    return {{0, B > 0 ? B : 0, nv}};
  }
  std::vector<BatchChunk> chunks;
  for (int64_t b0 = 0; b0 < B;) {
    const int64_t left = B - b0;
    int nv = max_nv;
    while (nv > 1 && int64_t(nv) * lanes > left) nv /= 2;
    const int64_t T = int64_t(nv) * lanes;
    const int64_t nb = left >= T ? left / T * T : left;  // whole tiles of this width, or the last partial one
    chunks.push_back({b0, nb, nv});
    b0 += nb;
  }
  // The last chunk is partial only when fewer than `lanes` rows were left (nv 1); fold it into the tile before.
  if (!(odd_widths && g_merge_tail) || chunks.size() < 2 || chunks.back().nb >= lanes) return chunks;
  const BatchChunk tail = chunks.back();
  chunks.pop_back();
  const int pnv = chunks.back().nv;
  const int64_t tile = int64_t(pnv) * lanes;
  chunks.back().nb -= tile;  // its last whole tile (nb was a multiple of tile)
  const int64_t start = chunks.back().b0 + chunks.back().nb;
  if (chunks.back().nb == 0) chunks.pop_back();
  if (pnv >= 8) {  // half of that tile stays a tile of its own, the other half takes the remainder: <= 5 vectors
    const int half = pnv / 2;
    chunks.push_back({start, int64_t(half) * lanes, half});
    chunks.push_back({start + int64_t(half) * lanes, int64_t(half) * lanes + tail.nb, half + 1});
  } else {
    chunks.push_back({start, tile + tail.nb, pnv + 1});
  }
  return chunks;
}

// The last tile of a batch that is not a multiple of its width T (tb < T rows) is computed as the whole tile of the
// batch's last T rows instead, overlapping the tile before it by T - tb rows: every load of it is then a whole
// vector in bounds, so a feature-major operand is read in place rather than copied into a zero-padded buffer, and a
// row-major one is transposed in whole L x L blocks rather than row by row. The padding lanes it replaces cost the
// same arithmetic. The SpMMs compute each batch row on a lane of its own, so they write the overlapped rows again
// with the same sums: the same bits where both tiles split a row's entries over the same number of accumulators
// (tiles of up to 3 vectors: 4; 4 and 5: 2), another rounding where the tile before was wider (the chunks run one
// after the other: no two threads write one row at once). The SDDMM sums over the batch, so it zeroes the
// overlapped lanes of each dY^T tile row as it loads it (the returned `skip`, for the last chunk; sddmm in
// kernels_impl.h). A batch of fewer than T rows keeps its padded tile. Measured on a 2-core Xeon (AVX-512), 1
// thread, CTRE's MLP on Fashion-MNIST shapes at batch 100 (its 0.24%-dense layers read feature-major tiles in
// place): see docs/BENCHMARKS.md.
static bool g_shift_tail = true;  // tuning hook: _set_shift_tail (false: the last tile is zero-padded)
static int shift_last_tile(std::vector<BatchChunk>& chunks, int64_t B, int lanes) {
  if (!g_shift_tail || chunks.empty()) return 0;
  const BatchChunk last = chunks.back();
  const int64_t T = int64_t(last.nv) * lanes;
  const int64_t part = last.nb % T;
  if (part == 0 || B < T) return 0;
  chunks.pop_back();
  if (last.nb > part) chunks.push_back({last.b0, last.nb - part, last.nv});  // its whole tiles stay as they are
  chunks.push_back({B - T, T, last.nv});
  return int(T - part);
}

// Calls CALL_<ISA>(NV) for the kernel copy of the instruction set `isa` and the vectors per tile row NV. At
// ISA_AVX512BF16 the fp32/fp64 kernels (and the bf16 SpMM) run the AVX-512 copy.
#define SC_DISPATCH_NV(NV, CALL_GEN, CALL_AVX, CALL_512)        \
  do {                                                          \
    if (isa >= ISA_AVX512) {                                    \
      if (NV == 1) CALL_512(1); else if (NV == 2) CALL_512(2); else if (NV == 3) CALL_512(3);                    \
      else if (NV == 4) CALL_512(4); else if (NV == 5) CALL_512(5); else CALL_512(8);                            \
    } else if (isa == ISA_AVX2) {                               \
      if (NV == 1) CALL_AVX(1); else if (NV == 2) CALL_AVX(2); else if (NV == 3) CALL_AVX(3);                    \
      else if (NV == 4) CALL_AVX(4); else if (NV == 5) CALL_AVX(5); else CALL_AVX(8);                            \
    } else {                                                    \
      if (NV == 1) CALL_GEN(1); else if (NV == 2) CALL_GEN(2); else if (NV == 3) CALL_GEN(3);                    \
      else if (NV == 4) CALL_GEN(4); else if (NV == 5) CALL_GEN(5); else CALL_GEN(8);                            \
    }                                                           \
  } while (0)

// Which copy of each bf16 kernel ran last (an Isa, -1 before the first call), for the tests: they check that the
// AVX512-BF16 code really runs on a CPU that has it, and that each cap selects the copy it should.
std::atomic<int> g_bf16_ran[BF16_KERNELS] = {{-1}, {-1}, {-1}, {-1}, {-1}, {-1}};
const char* const BF16_KERNEL_NAMES[BF16_KERNELS] = {"spmm", "spmm_t", "sddmm", "bsr_spmm", "bsr_spmm_t",
                                                     "bsr_sddmm"};

// The values in the transpose's order, g[t] = val[perm[t]], for a large `val`. Taken column by column, the reads
// land on every row of W in turn, so they span all of `val`: at 8192x8192 and 10% density (27 MB) that pass took
// 21 ms on a 2-core Xeon (2 MiB L2 per core), against 1.6 ms at 4096x4096 (6.7 MB, which the second-level TLB
// covers). Here the rows of W go in blocks whose values fill about g_gather_block_bytes, and each thread takes a
// range of columns: per block it advances each of its columns' cursor over the entries whose row falls in the
// block (a column's entries are sorted by row), so the reads of a block stay within its part of `val`. Same
// machine, 8192x8192 at 10%, 2 threads: the pass 21 -> 11.5 ms, dX at batch 256 57.5-58.1 -> 52.0-53.3 ms; blocks
// of 0.25, 1, 2, 4 and 16 MiB took 21.1, 15.1, 13.4, 11.7-13.2 and 15.0 ms.
// colptr, row: the transpose index (n_cols + 1 and nnz entries); n_rows: W's rows; prp: W's rowptr (read for
// int16_t indices, where perm holds offsets inside rows: see sc::csr_position).
template <class E, class I>
static void gather_by_row_blocks(const int32_t* colptr, const I* row, const I* perm, const int32_t* prp,
                                 const E* val, E* g, int64_t n_cols, int64_t n_rows, int nt) {
  const int64_t nnz = colptr[n_cols];
  const double row_bytes = double(nnz) / double(n_rows > 0 ? n_rows : 1) * double(sizeof(E));
  const int64_t block = std::max<int64_t>(1, int64_t(double(g_gather_block_bytes) / std::max(row_bytes, 1.0)));
  // Each column's next entry; allocated here, not in the parallel region, where a throw could not be caught.
  std::vector<int64_t> cursor(colptr, colptr + n_cols);
#pragma omp parallel num_threads(nt)
  {
    const int tid = sc::thread_id(), nth = sc::team_size();
    const int64_t c0 = n_cols * tid / nth, c1 = n_cols * (tid + 1) / nth;
    for (int64_t r1 = block; r1 < n_rows + block; r1 += block) {
      for (int64_t c = c0; c < c1; ++c) {
        int64_t t = cursor[c];
        const int64_t end = colptr[c + 1];
        for (; t < end && index_at(row, t) < r1; ++t) g[t] = val[csr_position(row, perm, prp, t)];
        cursor[c] = t;
      }
    }
  }
}

// obj as a C-contiguous array of A: a copy where it is strided, but never a conversion from another dtype (bf16
// arrives as int16 words, which a conversion from float would turn into garbage).
template <class A>
static Arr<A> exact_array(const py::object& obj, const char* what) {
  require(py::isinstance<py::array_t<A>>(obj), std::string(what) + " has the wrong dtype for this kernel");
  return obj.cast<Arr<A>>();
}

// Y (B, n_rows) = X (B, n_cols) W^T (+ bias), W in CSR. With perm (the transpose index's permutation) the
// values are read as values[perm], which turns the call into dX = dY W over (colptr, row, perm).
// A: the element type of the arrays as Python hands them over (float, double, or int16: bf16 words).
//
// Layouts: X is (B, n_cols) row-major, or with x_fm (n_cols, B), the storage of a feature-major (B, n_cols)
// tensor; Y likewise (B, n_rows), or with out_fm (n_rows, B).
// The work of spmm_py and spmm_ptr on checked arguments. E: the storage type (float, double or bf16). X (B, n_cols)
// or with x_fm (n_cols, B); Y (B, n_rows) or with out_fm (n_rows, B); rp (n_rows + 1), ci and val (nnz); pe (nnz) or
// null; bias (n_rows) or null. The caller has released the GIL.
// relu, mask: the epilogue (kernels_impl.h, Epilogue); mask (the same layout as Y) needs out_fm.
// I: the index type of ci and pe (int32_t, or int16_t for a compact pattern, whose perm is read with W's rowptr
// prp: see sc::csr_position).
template <class E, class I = int32_t>
void spmm_run(const E* xp, int64_t B, int64_t n_cols, bool x_fm, const int32_t* rp, const I* ci,
              const E* val, int64_t nnz, const I* pe, const E* bias, E* yp, int64_t n_rows, bool out_fm,
              int nthreads, bool relu = false, const E* mask = nullptr, const int32_t* prp = nullptr) {
  typedef typename compute_of<E>::type S;  // as the kernels compute: float for bf16
  const int nt = threads_for_work(nthreads, nnz * B);
  const int isa = kernel_isa();
  const int L = isa_vector_bytes(isa) / int(sizeof(S));
  if (nnz == 0) pe = nullptr;
  if (is_bf16<E>()) g_bf16_ran[pe ? BF16_SPMM_T : BF16_SPMM] = std::min(isa, int(ISA_AVX512));
  // values[perm] (nnz) in scratch slot 1. Its reads land at random in `values`: while the values fit in ~1 MiB
  // the kernel's first tile gathers them between its FMAs (free at 1% density of a 4096x4096 layer, where a
  // separate pass cost 0.35 ms); a larger array misses the caches at nearly every read, which stalls that tile
  // more than a pass of its own costs (2.1 vs 3.6 ms at 10% density, 2 threads). The pass prefetches the values
  // it will read GATHER_PREFETCH entries later: on a 2-core Zen 4, 10% density, 2 threads, dX 12.3 -> 11.9 ms and
  // 11.7 -> 11.3 ms in two runs of 25 interleaved calls (32 and 128 ahead gave the same; 512, no gain).
  if (B == 0) return;
  E* gathered = pe ? scratch<E>(1, nnz) : nullptr;
  const int64_t value_bytes = nnz * int64_t(sizeof(E));
  if (pe && value_bytes > std::min<int64_t>(int64_t(1) << 20, g_gather_blocked_from)) {
    if (value_bytes > g_gather_blocked_from)
      gather_by_row_blocks(rp, ci, pe, prp, val, gathered, n_rows, n_cols, nt);
    else {
      E* g = gathered;
#pragma omp parallel for num_threads(nt) schedule(static)
      for (int64_t t = 0; t < nnz; ++t) {
        if (t + GATHER_PREFETCH < nnz) __builtin_prefetch(val + csr_position(ci, pe, prp, t + GATHER_PREFETCH));
        g[t] = val[csr_position(ci, pe, prp, t)];
      }
    }
    val = gathered;
    pe = nullptr;
  }
  const std::vector<int64_t> split = balanced_split(rp, n_rows, nt);
  std::vector<BatchChunk> chunks =
      batch_chunks(B, L, spmm_max_nv(isa, nnz, n_cols, int64_t(sizeof(E)), l2_bytes_per_core()), !is_bf16<E>());
  shift_last_tile(chunks, B, L);  // its overlapped rows are computed again: nothing to mask
  const int widest = widest_nv(chunks);
  const bool in_place = fm_in_place(nnz, n_cols);
  // The tiles are stored as E (bf16 tiles for bf16, see BF16_SDDMM_MAX_NV).
  E* buf = scratch<E>(0, std::max(2, nt) * n_cols * widest * L);
  for (const BatchChunk& c : chunks) {
    // Whole tiles per thread once there is one per thread after the gathering tile: no barrier per tile and each
    // thread reads the tile it transposed from its own L2. Measured on a 2-core Zen 3, 2 threads, medians of
    // 25-40 interleaved calls: 4096x4096, batch 256 (16 tiles), 1% density: forward 2.83 -> 2.31 ms, dX 3.03 ->
    // 2.60 ms (10%: -7%, -3%); 1000x784, batch 100 (7 tiles: 6 whole, 1 by rows), 4.5%: forward 322 -> 215 us,
    // dX 397 -> 264 us; 1000x1000 at 4.5%, batch 32 (2 tiles): forward 102 -> 65 us, batch 48: dX 212 -> 185 us.
    const int64_t n_tiles = (c.nb + c.nv * L - 1) / (c.nv * L);
    const bool by_tile = g_spmm_split ? g_spmm_split == 2 : nt > 1 && n_tiles - (pe ? 1 : 0) >= nt;
    const E* xc = x_fm ? xp + c.b0 : xp + c.b0 * n_cols;
    E* yc = out_fm ? yp + c.b0 : yp + c.b0 * n_rows;
    const int64_t ldx = x_fm ? B : n_cols, ldy = out_fm ? B : n_rows;
    const Epilogue<E> ep{relu, mask ? mask + c.b0 : nullptr};
#define SC_SPMM_ARGS (xc, ldx, x_fm, in_place, c.nb, n_cols, rp, ci, val, pe, prp, gathered, n_rows, bias, yc, ldy, split.data(), nt, buf, by_tile, ep)
#define GEN(N) (out_fm ? generic::spmm<S, E, E, N, true, I> SC_SPMM_ARGS : generic::spmm<S, E, E, N, false, I> SC_SPMM_ARGS)
#ifdef SC_HAVE_AVX2
#define AVX(N) (out_fm ? avx2::spmm<S, E, E, N, true, I> SC_SPMM_ARGS : avx2::spmm<S, E, E, N, false, I> SC_SPMM_ARGS)
#define A512(N) (out_fm ? avx512::spmm<S, E, E, N, true, I> SC_SPMM_ARGS : avx512::spmm<S, E, E, N, false, I> SC_SPMM_ARGS)
#else
#define AVX(N) GEN(N)
#define A512(N) GEN(N)
#endif
    SC_DISPATCH_NV(c.nv, GEN, AVX, A512);
#undef GEN
#undef AVX
#undef A512
#undef SC_SPMM_ARGS
    if (pe) {  // the first chunk gathered values[perm]: the others read them
      val = gathered;
      pe = nullptr;
    }
  }
}

template <class A>
void spmm_py(const Arr<A>& X, const Arr<int32_t>& rowptr, const Arr<int32_t>& col, const Arr<A>& values,
             py::object perm_obj, py::object bias_obj, Arr<A>& Y, int nthreads, bool x_fm, bool out_fm) {
  typedef typename storage_of<A>::type E;  // as the kernels store it: A, or bf16
  require(X.ndim() == 2 && Y.ndim() == 2, "spmm: X and Y must be 2-D");
  const int64_t B = X.shape(x_fm ? 1 : 0), n_cols = X.shape(x_fm ? 0 : 1);
  const int64_t n_rows = numel(rowptr) - 1;
  require(Y.shape(out_fm ? 1 : 0) == B && Y.shape(out_fm ? 0 : 1) == n_rows,
          out_fm ? "spmm: Y must have shape (n_rows, batch)" : "spmm: Y must have shape (batch, n_rows)");
  require(numel(col) == numel(values), "spmm: col and values must have the same length");
  const E* bias = nullptr;
  Arr<A> bias_arr;
  if (!bias_obj.is_none()) {
    bias_arr = exact_array<A>(bias_obj, "spmm: bias");
    require(numel(bias_arr) == n_rows, "spmm: bias must have n_rows elements");
    bias = reinterpret_cast<const E*>(bias_arr.data());
  }
  Arr<int32_t> perm;
  if (!perm_obj.is_none()) {
    perm = exact_array<int32_t>(perm_obj, "spmm: perm");
    require(numel(perm) == numel(values), "spmm: perm must have nnz elements");
  }
  const int32_t* pe = perm.size() > 0 ? perm.data() : nullptr;
  py::gil_scoped_release nogil;
  spmm_run<E>(reinterpret_cast<const E*>(X.data()), B, n_cols, x_fm, rowptr.data(), col.data(),
              reinterpret_cast<const E*>(values.data()), numel(values), pe, bias,
              reinterpret_cast<E*>(Y.mutable_data()), n_rows, out_fm, nthreads);
}

// The work of sddmm_py and sddmm_ptr on checked arguments: dY (B, n_rows) or with dy_fm (n_rows, B); X (B, n_cols) or
// with x_fm (n_cols, B); rp (n_rows + 1), ci and dv (nnz). E: the storage type. The caller has released the GIL.
template <class E, class I = int32_t>
void sddmm_run(const E* yp, const E* xp, int64_t B, int64_t n_rows, int64_t n_cols, bool dy_fm, bool x_fm,
               const int32_t* rp, const I* ci, int64_t nnz, E* dv, int nthreads) {
  typedef typename compute_of<E>::type S;
  const int nt = threads_for_work(nthreads, nnz * B);
  const int isa = kernel_isa();
  const int L = isa_vector_bytes(isa) / int(sizeof(S));
  // bf16 with AVX512-BF16: the dot products by vdpbf16ps (the avx512bf16 copy); else bf16 tiles widened to fp32.
  const bool bf16_dot = is_bf16<E>() && isa == ISA_AVX512BF16;
  if (is_bf16<E>()) g_bf16_ran[BF16_SDDMM] = bf16_dot ? isa : std::min(isa, int(ISA_AVX512));
  if (B == 0) {
    std::fill(dv, dv + nnz, sc::from_compute<E>(S(0)));
    return;
  }
  const std::vector<int64_t> split = balanced_split(rp, n_rows, nt);
  std::vector<BatchChunk> chunks =
      batch_chunks(B, L, is_bf16<E>() ? BF16_SDDMM_MAX_NV : sddmm_max_nv(isa, nnz, n_cols, l2_bytes_per_core()),
                   !is_bf16<E>());
  // bf16 tiles keep the zero-padded last tile (their dY^T rows are widened by pairs or multiplied by vdpbf16ps,
  // which keep_only does not mask).
  const int skip = is_bf16<E>() ? 0 : shift_last_tile(chunks, B, L);
  const int widest = widest_nv(chunks);
  const bool in_place = fm_in_place(nnz, n_cols);
  // Column blocks whose slice of the transposed X tile fits the budget (one core's L2 holds it, next to the
  // streamed dY^T rows), and where each row's entries of each block start. Each (row, block) segment costs a
  // reload of the row's dY^T and a padded tail, so blocks are only used while segments average >= 32 entries
  // (at 1% density of a 4096x4096 layer one block of ~41-entry rows was 8% faster than four ~10-entry ones).
  // Sized for the widest chunk's tiles: the narrower tiles of the other chunks fit as well.
  const int64_t tile_row_bytes = int64_t(widest) * L * int64_t(sizeof(E));
  const int64_t fit_cols = std::max<int64_t>(1, g_sddmm_block_bytes / tile_row_bytes);
  const int64_t fit_blocks = (n_cols + fit_cols - 1) / fit_cols;
  const int64_t long_blocks = nnz / (32 * std::max<int64_t>(1, n_rows));
  const int64_t n_blocks = std::max<int64_t>(1, std::min(fit_blocks, long_blocks));
  const int64_t block_cols = (n_cols + n_blocks - 1) / n_blocks;
  int32_t* seg = scratch<int32_t>(0, n_rows * (n_blocks + 1));
#pragma omp parallel for num_threads(nt) schedule(static)
  for (int64_t j = 0; j < n_rows; ++j) {
    int32_t* sj = seg + j * (n_blocks + 1);
    for (int64_t q = 0; q < n_blocks; ++q)
      sj[q] = static_cast<int32_t>(
          std::lower_bound(ci + rp[j], ci + rp[j + 1], q * block_cols,
                           [](const I& c, int64_t v) { return index_at(&c, 0) < v; }) -
          ci);
    sj[n_blocks] = rp[j + 1];
  }
  // Per-thread tiles: each thread transposes the whole X tile and its own rows of dY into buffers of its own, so
  // the threads never wait for each other and read nothing from another core's cache; the cost is every thread
  // transposing all of X, so it is used while that stays small next to the thread's share of the arithmetic
  // (n_cols * nt <= nnz / 8). Measured on a 2-core Zen 3, 2 threads: 4096x4096 batch 256, 1% density 4.0 -> 2.9
  // ms; 1000x1000 at 4.5%, batch 100: 404 -> 311 us; 10%: equal. Results are bit-identical either way.
  const bool private_tiles = g_sddmm_tiles ? g_sddmm_tiles == 2 : nt > 1 && n_cols * nt * 8 <= nnz;
  // Slot 1, which the transposed SpMM fills with values[perm]: the two never run at once, so a training step keeps
  // one buffer of the larger size rather than both (4096x4096 at 10%, batch 256, 2 threads: -6.4 MiB of peak).
  E* buf = scratch<E>(1, (private_tiles ? std::max(2, nt) : 2) * (n_cols + n_rows) * widest * L);
  // The partial sums: dW itself for fp32/fp64; for bf16 an fp32 array (scratch slot 2) that the last tile of the
  // last chunk reads as it writes dW, rounded once. A batch of one tile needs none.
  const bool one_tile = chunks.size() == 1 && chunks[0].nb <= int64_t(chunks[0].nv) * L;
  S* dacc = is_bf16<E>() ? (one_tile ? nullptr : scratch<S>(2, nnz)) : reinterpret_cast<S*>(dv);
  for (size_t ic = 0; ic < chunks.size(); ++ic) {  // the first chunk writes dW, the others add to it
    const BatchChunk& c = chunks[ic];
    const E* yc = dy_fm ? yp + c.b0 : yp + c.b0 * n_rows;
    const E* xc = x_fm ? xp + c.b0 : xp + c.b0 * n_cols;
    const int64_t ldy = dy_fm ? B : n_rows, ldx = x_fm ? B : n_cols;
    const bool accumulate = c.b0 > 0, finish = ic + 1 == chunks.size();
    const int c_skip = finish ? skip : 0;
#define SC_SDDMM_ARGS (yc, ldy, dy_fm, xc, ldx, x_fm, in_place, c.nb, n_rows, n_cols, rp, ci, dacc, dv, split.data(), nt, n_blocks, seg, buf, accumulate, finish, private_tiles, c_skip)
#define GEN(N) generic::sddmm<S, E, E, N, I> SC_SDDMM_ARGS
#ifdef SC_HAVE_AVX2
#define AVX(N) avx2::sddmm<S, E, E, N, I> SC_SDDMM_ARGS
#define A512(N) avx512::sddmm<S, E, E, N, I> SC_SDDMM_ARGS
#define B512(N) avx512bf16::sddmm<S, E, E, N, I> SC_SDDMM_ARGS
#else
#define AVX(N) GEN(N)
#define A512(N) GEN(N)
#endif
#ifdef SC_HAVE_AVX2
    if constexpr (is_bf16<E>()) {
      if (bf16_dot) {
        if (c.nv == 1) B512(1); else if (c.nv == 2) B512(2); else if (c.nv == 4) B512(4); else B512(8);
        continue;
      }
    }
#endif
    SC_DISPATCH_NV(c.nv, GEN, AVX, A512);
#undef GEN
#undef AVX
#undef A512
#undef B512
#undef SC_SDDMM_ARGS
  }
}

// dvalues (nnz,) = (dY^T X) at the live connections of the CSR pattern (rowptr, col). A: as for spmm_py.
// Layouts as in spmm_py: dY (B, n_rows) or with dy_fm (n_rows, B); X (B, n_cols) or with x_fm (n_cols, B).
template <class A>
void sddmm_py(const Arr<A>& dY, const Arr<A>& X, const Arr<int32_t>& rowptr, const Arr<int32_t>& col,
              Arr<A>& dval, int nthreads, bool dy_fm, bool x_fm) {
  typedef typename storage_of<A>::type E;
  require(X.ndim() == 2 && dY.ndim() == 2, "sddmm: X and dY must be 2-D");
  const int64_t B = X.shape(x_fm ? 1 : 0), n_cols = X.shape(x_fm ? 0 : 1);
  const int64_t n_rows = numel(rowptr) - 1;
  require(dY.shape(dy_fm ? 1 : 0) == B && dY.shape(dy_fm ? 0 : 1) == n_rows,
          dy_fm ? "sddmm: dY must have shape (n_rows, batch)" : "sddmm: dY must have shape (batch, n_rows)");
  require(numel(dval) == numel(col), "sddmm: dval must have nnz elements");
  py::gil_scoped_release nogil;
  sddmm_run<E>(reinterpret_cast<const E*>(dY.data()), reinterpret_cast<const E*>(X.data()), B, n_rows, n_cols, dy_fm,
               x_fm, rowptr.data(), col.data(), numel(col), reinterpret_cast<E*>(dval.mutable_data()), nthreads);
}

// Entry points by address, for sparsecore.ops: the numpy entries above cost ~15-20 us a call in conversions and
// argument casting (five to seven arrays), which at high sparsity is more than the arithmetic of a 1000x1000 layer
// (CTRE's 0.24%-dense layers: ~10 us). The caller passes tensors' data_ptr()s and sizes it has checked, and
// guarantees the layouts (contiguous, or feature-major as the flags say) and the index arrays (int32, or int16 as a
// compact Pattern builds them); what can be checked cheaply here is: sizes not negative, addresses set where there
// is data, rowptr (and a compact dX's W rowptr) running from 0 to nnz, and a compact pattern's dimensions.
// dtype: 0 float32, 1 float64, 2 bfloat16.
template <class T>
static T* at(uintptr_t p) { return reinterpret_cast<T*>(p); }

static void check_ptr_args(const char* name, int dtype, int64_t B, int64_t n_rows, int64_t n_cols, int64_t nnz,
                           uintptr_t rowptr, uintptr_t col) {
  require(dtype >= 0 && dtype <= 2, std::string(name) + ": dtype code must be 0 (float32), 1 (float64) or 2 (bfloat16)");
  require(B >= 0 && n_rows >= 0 && n_cols >= 0 && nnz >= 0, std::string(name) + ": sizes must not be negative");
  require(rowptr != 0 && (nnz == 0 || col != 0), std::string(name) + ": missing index array");
  const int32_t* rp = at<const int32_t>(rowptr);
  require(rp[0] == 0 && rp[n_rows] == nnz, std::string(name) + ": rowptr must run from 0 to nnz");
}

// index_bytes: 4 (int32 col and perm) or 2 (int16: a compact pattern, whose perm, when given, holds offsets inside
// the rows of W, read with W's rowptr perm_rowptr).
static void spmm_ptr(int dtype, uintptr_t x, int64_t B, int64_t n_cols, bool x_fm, uintptr_t rowptr, uintptr_t col,
                     uintptr_t values, int64_t nnz, uintptr_t perm, uintptr_t bias, uintptr_t y, int64_t n_rows,
                     bool out_fm, int nthreads, bool relu, uintptr_t mask, int index_bytes, uintptr_t perm_rowptr) {
  check_ptr_args("spmm_ptr", dtype, B, n_rows, n_cols, nnz, rowptr, col);
  require(B == 0 || n_rows == 0 || (y != 0 && (n_cols == 0 || x != 0)), "spmm_ptr: missing x or y");
  require(mask == 0 || out_fm, "spmm_ptr: a mask needs a feature-major output");
  require(index_bytes == 4 || index_bytes == 2, "spmm_ptr: index_bytes must be 4 (int32) or 2 (int16)");
  require(index_bytes == 4 || perm == 0 || perm_rowptr != 0, "spmm_ptr: int16 perm needs perm_rowptr");
  require(index_bytes == 4 || (n_rows <= COMPACT_MAX_DIM && n_cols <= COMPACT_MAX_DIM),
          "spmm_ptr: int16 indices need both dimensions at most 32768");
  // dX over a compact transpose index: perm_rowptr is W's rowptr, n_cols + 1 entries (W has n_cols rows here)
  require(index_bytes == 4 || perm == 0 || (at<const int32_t>(perm_rowptr)[0] == 0 &&
                                            at<const int32_t>(perm_rowptr)[n_cols] == nnz),
          "spmm_ptr: perm_rowptr must be W's rowptr, running from 0 to nnz");
  py::gil_scoped_release nogil;
  const int32_t* rp = at<const int32_t>(rowptr);
  const int32_t* prp = at<const int32_t>(perm_rowptr);
#define SC_RUN(E, I) spmm_run<E, I>(at<const E>(x), B, n_cols, x_fm, rp, at<const I>(col), at<const E>(values), nnz, \
                                    at<const I>(perm), at<const E>(bias), at<E>(y), n_rows, out_fm, nthreads, relu,   \
                                    at<const E>(mask), prp)
#define SC_RUN_I(E) if (index_bytes == 2) SC_RUN(E, int16_t); else SC_RUN(E, int32_t)
  if (dtype == 0) SC_RUN_I(float);
  else if (dtype == 1) SC_RUN_I(double);
  else SC_RUN_I(sc::bf16);
#undef SC_RUN_I
#undef SC_RUN
}

static void sddmm_ptr(int dtype, uintptr_t dy, uintptr_t x, int64_t B, int64_t n_rows, int64_t n_cols, bool dy_fm,
                      bool x_fm, uintptr_t rowptr, uintptr_t col, int64_t nnz, uintptr_t out, int nthreads,
                      int index_bytes) {
  check_ptr_args("sddmm_ptr", dtype, B, n_rows, n_cols, nnz, rowptr, col);
  require(nnz == 0 || (out != 0 && (B == 0 || (dy != 0 && x != 0))), "sddmm_ptr: missing dy, x or out");
  require(index_bytes == 4 || index_bytes == 2, "sddmm_ptr: index_bytes must be 4 (int32) or 2 (int16)");
  require(index_bytes == 4 || (n_rows <= COMPACT_MAX_DIM && n_cols <= COMPACT_MAX_DIM),
          "sddmm_ptr: int16 indices need both dimensions at most 32768");
  py::gil_scoped_release nogil;
#define SC_RUN(E, I) sddmm_run<E, I>(at<const E>(dy), at<const E>(x), B, n_rows, n_cols, dy_fm, x_fm, \
                                     at<const int32_t>(rowptr), at<const I>(col), nnz, at<E>(out), nthreads)
#define SC_RUN_I(E) if (index_bytes == 2) SC_RUN(E, int16_t); else SC_RUN(E, int32_t)
  if (dtype == 0) SC_RUN_I(float);
  else if (dtype == 1) SC_RUN_I(double);
  else SC_RUN_I(sc::bf16);
#undef SC_RUN_I
#undef SC_RUN
}

void bind_kernels(py::module_& m) {
  m.def("spmm_ptr", &spmm_ptr,
        "spmm by address (sparsecore.ops): (dtype, x, B, n_cols, x_fm, rowptr, col, values, nnz, perm or 0, bias or "
        "0, y, n_rows, out_fm, nthreads, relu=False, mask=0, index_bytes=4, perm_rowptr=0); relu: y = max(y, 0) as "
        "torch.relu; mask (the address of a tensor laid out as y, feature-major y only): y = 0 where mask <= 0, as "
        "threshold_backward; index_bytes 2: int16 col and perm (a compact pattern: perm holds offsets inside W's "
        "rows, W's rowptr at perm_rowptr); no layout checks: callers pass checked tensors",
        py::arg("dtype"), py::arg("x"), py::arg("B"), py::arg("n_cols"), py::arg("x_fm"), py::arg("rowptr"),
        py::arg("col"), py::arg("values"), py::arg("nnz"), py::arg("perm"), py::arg("bias"), py::arg("y"),
        py::arg("n_rows"), py::arg("out_fm"), py::arg("nthreads"), py::arg("relu") = false, py::arg("mask") = 0,
        py::arg("index_bytes") = 4, py::arg("perm_rowptr") = 0);
  m.def("sddmm_ptr", &sddmm_ptr,
        "sddmm by address (sparsecore.ops): (dtype, dy, x, B, n_rows, n_cols, dy_fm, x_fm, rowptr, col, nnz, out, "
        "nthreads, index_bytes=4); index_bytes 2: int16 col; no layout checks: callers pass checked tensors",
        py::arg("dtype"), py::arg("dy"), py::arg("x"), py::arg("B"), py::arg("n_rows"), py::arg("n_cols"),
        py::arg("dy_fm"), py::arg("x_fm"), py::arg("rowptr"), py::arg("col"), py::arg("nnz"), py::arg("out"),
        py::arg("nthreads"), py::arg("index_bytes") = 4);
  m.def("spmm", &spmm_py<float>, py::arg("x").noconvert(), py::arg("rowptr").noconvert(),
        py::arg("col").noconvert(), py::arg("values").noconvert(), py::arg("perm"), py::arg("bias"),
        py::arg("out").noconvert(), py::arg("nthreads"), py::arg("x_fm") = false, py::arg("out_fm") = false);
  m.def("spmm", &spmm_py<double>, py::arg("x").noconvert(), py::arg("rowptr").noconvert(),
        py::arg("col").noconvert(), py::arg("values").noconvert(), py::arg("perm"), py::arg("bias"),
        py::arg("out").noconvert(), py::arg("nthreads"), py::arg("x_fm") = false, py::arg("out_fm") = false);
  m.def("spmm_bf16", &spmm_py<int16_t>, py::arg("x").noconvert(), py::arg("rowptr").noconvert(),
        py::arg("col").noconvert(), py::arg("values").noconvert(), py::arg("perm"), py::arg("bias"),
        py::arg("out").noconvert(), py::arg("nthreads"), py::arg("x_fm") = false, py::arg("out_fm") = false,
        "spmm on bfloat16 data: x, values, bias and out are int16 views of bf16 tensors (fp32 accumulation, each "
        "output rounded to nearest even)");
  m.def("sddmm", &sddmm_py<float>, py::arg("dy").noconvert(), py::arg("x").noconvert(),
        py::arg("rowptr").noconvert(), py::arg("col").noconvert(), py::arg("out").noconvert(),
        py::arg("nthreads"), py::arg("dy_fm") = false, py::arg("x_fm") = false);
  m.def("sddmm", &sddmm_py<double>, py::arg("dy").noconvert(), py::arg("x").noconvert(),
        py::arg("rowptr").noconvert(), py::arg("col").noconvert(), py::arg("out").noconvert(),
        py::arg("nthreads"), py::arg("dy_fm") = false, py::arg("x_fm") = false);
  m.def("sddmm_bf16", &sddmm_py<int16_t>, py::arg("dy").noconvert(), py::arg("x").noconvert(),
        py::arg("rowptr").noconvert(), py::arg("col").noconvert(), py::arg("out").noconvert(),
        py::arg("nthreads"), py::arg("dy_fm") = false, py::arg("x_fm") = false,
        "sddmm on bfloat16 data: dy, x and out are int16 views of bf16 tensors (fp32 accumulation over the whole "
        "batch, each output rounded once to nearest even)");
  m.def("_set_min_work_per_thread", [](int64_t w) { sc::min_work_per_thread() = w < 0 ? 400000 : w; },
        "tuning hook: the least multiply-adds a second kernel thread must get (negative = default 400000)");
  m.def("_set_fm_in_place_reads", [](double r) { g_fm_in_place_reads = r < 0 ? 8.0 : r; },
        "tuning hook: feature-major tiles are read in place while nnz / n_cols is below this (negative = default 8)");
  m.def("_set_gather_blocks",
        [](int64_t from, int64_t block) {
          g_gather_blocked_from = from < 0 ? GATHER_BLOCKED_FROM : from;
          g_gather_block_bytes = block <= 0 ? GATHER_BLOCK_BYTES : block;
        },
        py::arg("from_bytes"), py::arg("block_bytes"),
        "tuning hook: dX gathers values above from_bytes in row blocks of ~block_bytes of values (negative / <= 0 = "
        "defaults: 12 MiB, 8 MiB)");
  m.def("_set_shift_tail", [](bool on) { g_shift_tail = on; },
        "tuning hook: compute a batch's partial last tile as the whole tile of its last rows (default True)");
  m.def("_set_merge_tail", [](bool on) { g_merge_tail = on; },
        "tuning hook: fold a batch remainder of fewer than `lanes` rows into the tile before it (default True)");
  m.def("_set_tile_vectors",
        [](int nv) {
          // only the compiled widths: another would run a wider tile than its buffers were sized for
          require(nv == 0 || nv == 1 || nv == 2 || nv == 3 || nv == 4 || nv == 5 || nv == 8,
                  "_set_tile_vectors: nv must be 0 (automatic), 1, 2, 3, 4, 5 or 8");
          g_nv_override = nv;
        },
        "tuning hook: vectors per batch tile (0 = auto; 1, 2, 3, 4, 5 or 8; bf16 runs 3 and 5 as 4 and 8)");
  m.def("_set_spmm_split", [](int mode) { g_spmm_split = mode; },
        "tuning hook: SpMM work split (0 = automatic, 1 = rows of each tile, 2 = whole tiles per thread)");
  m.def("_set_sddmm_block_bytes", [](int64_t b) { g_sddmm_block_bytes = b > 0 ? b : default_sddmm_block_bytes(); },
        "tuning hook: bytes of the X tile per SDDMM column block (<= 0 = default: half of one core's L2)");
  m.def("release_scratch", &release_scratch,
        "free the calling thread's kernel scratch buffers (kept between calls to avoid page faults)");
  m.def("has_avx2", &cpu_has_avx2, "True when the AVX2+FMA kernels are in use");
  m.def("_set_sddmm_tiles", [](int mode) { g_sddmm_tiles = mode; },
        "tuning hook: SDDMM tile buffers (0 = automatic, 1 = shared by the threads, 2 = one per thread)");
  m.def("kernel_isa", [] { return std::string(isa_name(kernel_isa())); },
        "the instruction set the kernels may use: 'generic', 'avx2', 'avx512' or 'avx512bf16' (the fp32/fp64 "
        "kernels run their avx512 copy there; the bf16 SDDMM uses AVX512-BF16)");
  m.def("cpu_isa", [] { return std::string(isa_name(cpu_isa())); },
        "the widest instruction set this CPU supports among those the kernels are compiled for");
  m.def("_set_max_isa", [](const std::string& name) { max_isa() = isa_from_name(name); },
        "testing hook: the widest instruction set the kernels may use ('generic', 'avx2', 'avx512', 'avx512bf16')");
  m.def("_bf16_copies_run", [] {
          py::dict d;
          for (int k = 0; k < BF16_KERNELS; ++k) {
            const int isa = g_bf16_ran[k].load();
            d[BF16_KERNEL_NAMES[k]] = isa < 0 ? py::object(py::none()) : py::object(py::str(isa_name(isa)));
          }
          return d;
        },
        "testing hook: {kernel: the copy ('generic', 'avx2', 'avx512', 'avx512bf16') its last bf16 call ran, or "
        "None}; 'avx512bf16' means the AVX512-BF16 instructions ran");
}

}  // namespace sc
