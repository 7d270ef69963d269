// Body of the block-sparse (BSR) CPU kernels, compiled once per ISA like kernels_impl.h (whose tile helpers it
// uses). A stored block k of block row br and block column bc holds W[br*bs + a, bc*bs + b] at val[k*bs*bs + a*bs + b].
//
// Blocks give register reuse that unstructured sparsity cannot: in the forward and dX kernels BSR_ROWS output rows
// share every loaded tile vector (BSR_ROWS FMAs per load), and dW is a small dense GEMM per block.
//
// Types: the kernels compute in S; activations, values, bias and outputs are stored as E (S, or bf16 with S =
// float: widened where they are read, outputs rounded once where they are written). Tiles and buffers are in S.

namespace SC_ISA {

// Output rows per register block: each loaded tile vector feeds this many rows' FMAs. AVX-512 has 32 vector
// registers, room for 8 rows x 2 vectors of accumulators (16) next to the tile vectors; AVX2 and SSE have 16.
constexpr int BSR_ROWS = SC_VBYTES >= 64 ? 8 : 4;

// Rows [r, r + R) of one block row of Yt (bs x T, row-major, written to `acc`) = bias + sum over the row's blocks
// k in [k0, k1) of M_k[r : r+R, :] * Xt[idx[k]*bs : (idx[k]+1)*bs], with M_k(i, j) = m[i*rs + j*cs] for m the
// block's values: rs = bs, cs = 1 for W's block (forward); rs = 1, cs = bs for its transpose (dX, block perm[k]).
// The accumulators stay in registers from the bias to the last block. Paired against accumulating block by block
// (reloading and storing them for every block) on a 2-core Xeon, 4096x4096, batch 256, 10% density, medians of
// 12 interleaved rounds, 2 threads: blocks of 16 forward 5.43 -> 4.15 ms, dX 6.82 -> 4.73; of 32 5.46 -> 4.16, 5.83
// -> 4.45; of 64 4.35 -> 4.17, 4.89 -> 4.66; 1% density, blocks of 32: 0.91 -> 0.68, 0.92 -> 0.69 (1 thread: blocks
// of 16 10.5 -> 8.5 and 13.5 -> 9.9, of 32 and 64 equal within 3%). Each block's slice of the tile is then read
// once per register block of rows (from L2 when a block row's slices exceed L1).
template <class S, class E, class EV, int NV, int R>
inline void block_row_rows(const EV* val, const int32_t* perm, const int32_t* idx, int64_t k0, int64_t k1,
                           int64_t rs, int64_t cs, int bs, const S* xt, const E* bias, int64_t row0, S* acc, int r) {
  constexpr int L = lanes<S>();
  constexpr int T = NV * L;
  const int64_t bsq = int64_t(bs) * bs;
  V<S> a[R][NV];
  for (int u = 0; u < R; ++u) {
    const V<S> b = vsplat<S>(bias ? sc::to_compute<S>(bias[row0 + r + u]) : S(0));
    for (int v = 0; v < NV; ++v) a[u][v] = b;
  }
  for (int64_t k = k0; k < k1; ++k) {
    const EV* m = val + (perm ? perm[k] : k) * bsq;
    const S* xs = xt + int64_t(idx[k]) * bs * T;
    for (int c = 0; c < bs; ++c) {
      V<S> x[NV];
      for (int v = 0; v < NV; ++v) x[v] = vload<S>(xs + c * T + v * L);
      for (int u = 0; u < R; ++u) {
        const V<S> w = vsplat_as<S>(m + (r + u) * rs + c * cs);
        for (int v = 0; v < NV; ++v) a[u][v] += w * x[v];
      }
    }
  }
  for (int u = 0; u < R; ++u)
    for (int v = 0; v < NV; ++v) __builtin_memcpy(acc + (r + u) * T + v * L, &a[u][v], sizeof(V<S>));
}

// Y (B, n_brows*bs) = X (B, n_bcols*bs) M^T (+ bias) over a block-row structure (rp, idx). With perm the
// structure is the transpose index (colptr, row, perm) and block t is W's block perm[t] read transposed:
// that is dX = dY W. split: thread boundaries over block rows.
// The values are stored as EV: E, or S where the caller widened bf16 values once for all tiles.
//
// Work sharing as in the CSR SpMM (kernels_impl.h): with at least one batch tile per thread, each thread takes
// whole tiles from a shared counter, transposes each into a buffer of its own and computes every block row (no
// barrier, and the tile a thread reads sits in its own L2); otherwise the threads share each tile's transpose,
// meet at a barrier and split the block rows. buf holds max(2, nt) tile buffers, accbuf one block row per thread.
template <class S, class E, class EV, int NV>
void bsr_spmm(const E* X, int64_t B, int64_t n_in, const int32_t* rp, const int32_t* idx, const int32_t* perm,
              const EV* val, int bs, int64_t n_brows, const E* bias, E* Y, const int64_t* split, int nt, S* buf,
              S* accbuf) {
  constexpr int T = NV * lanes<S>();
  const int64_t n_out = n_brows * bs;
  const int64_t rs = perm ? 1 : bs, cs = perm ? bs : 1;
  const int64_t n_tiles = (B + T - 1) / T;
  const bool by_tile = nt > 1 && n_tiles >= nt;
  S* Xt[2] = {buf, buf + n_in * T};
  std::atomic<int64_t> next_tile{0};
  // Block rows [r0, r1) of the tile at b0 (tb rows) from its transpose xt.
  auto block_rows = [&](const S* xt, S* acc, int64_t b0, int tb, int64_t r0, int64_t r1) {
    for (int64_t br = r0; br < r1; ++br) {
      const int64_t k0 = rp[br], k1 = rp[br + 1];
      int r = 0;
      for (; r + BSR_ROWS <= bs; r += BSR_ROWS)
        block_row_rows<S, E, EV, NV, BSR_ROWS>(val, perm, idx, k0, k1, rs, cs, bs, xt, bias, br * bs, acc, r);
      if constexpr (BSR_ROWS > 4)
        for (; r + 4 <= bs; r += 4)
          block_row_rows<S, E, EV, NV, 4>(val, perm, idx, k0, k1, rs, cs, bs, xt, bias, br * bs, acc, r);
      for (; r < bs; ++r) block_row_rows<S, E, EV, NV, 1>(val, perm, idx, k0, k1, rs, cs, bs, xt, bias, br * bs, acc, r);
      store_rows<S, E>(acc, bs, T, tb, Y, n_out, b0, br * bs);
    }
  };
#pragma omp parallel num_threads(nt)
  {
    const int tid = sc::thread_id(), nth = sc::team_size();
    S* acc = accbuf + int64_t(tid) * bs * T;
    if (by_tile) {
      S* own = buf + int64_t(tid) * n_in * T;
      for (int64_t n; (n = next_tile.fetch_add(1, std::memory_order_relaxed)) < n_tiles;) {
        const int64_t b0 = n * T;
        const int tb = static_cast<int>(B - b0 < T ? B - b0 : T);
        transpose_tile_share<S>(X, n_in, b0, tb, T, n_in, 0, 1, own);
        block_rows(own, acc, b0, tb, 0, n_brows);
      }
    } else {
      int n = 0;
      for (int64_t b0 = 0; b0 < B; b0 += T, ++n) {
        const int tb = static_cast<int>(B - b0 < T ? B - b0 : T);
        transpose_tile_share<S>(X, n_in, b0, tb, T, n_in, tid, nth, Xt[n & 1]);
#pragma omp barrier
        for (int p = tid; p < nt; p += nth) block_rows(Xt[n & 1], acc, b0, tb, split[p], split[p + 1]);
      }
    }
  }
}

// dW for every stored block: dval[k][a][b] = sum_t dY[t, br*bs + a] X[t, bc*bs + b]. Per block row, dY's
// (B x bs) slice is copied once into a contiguous buffer (every block of the row reuses it), and per block X's
// (B x bs) slice too; the small GEMM then streams contiguous memory: a vector of X's row times 4 broadcast values
// of dY, 8 FMAs per 2 loads. ybuf, xbuf: B * bs each, per thread.
// dst[i] = src[i] for i < n, from the storage type E to the compute type S (a copy for E = S).
template <class S, class E>
inline void copy_as(S* dst, const E* src, int n) {
  if constexpr (std::is_same<E, S>::value) {
    __builtin_memcpy(dst, src, n * sizeof(S));
  } else {
    constexpr int L = lanes<S>();
    int i = 0;
    for (; i + L <= n; i += L) {
      const V<S> v = vload_as<S>(src + i);
      __builtin_memcpy(dst + i, &v, sizeof(v));
    }
    for (; i < n; ++i) dst[i] = sc::to_compute<S>(src[i]);
  }
}

// Rows [a, a + na) (na <= R) of one dW block: d[a+u][b] = sum_t yl[t][a+u] xl[t][b], over the block's columns in
// chunks of NV vectors (bs a multiple of NV * L). R rows x NV vectors of accumulators: each loaded X vector feeds
// R FMAs; the rows past na repeat the last valid row (no branch in the loop) and are not stored.
template <class S, class E, int R, int NV>
inline void block_dw_rows(const S* yl, const S* xl, int64_t B, int bs, int a, int na, E* d) {
  constexpr int L = lanes<S>();
  for (int b = 0; b < bs; b += NV * L) {
    V<S> acc[R][NV];
    for (int u = 0; u < R; ++u)
      for (int v = 0; v < NV; ++v) acc[u][v] = V<S>{};
    for (int64_t t = 0; t < B; ++t) {
      V<S> x[NV];
      for (int v = 0; v < NV; ++v) x[v] = vload<S>(xl + t * bs + b + v * L);
      for (int u = 0; u < R; ++u) {
        const V<S> y = vsplat<S>(yl[t * bs + a + (u < na ? u : na - 1)]);
        for (int v = 0; v < NV; ++v) acc[u][v] += y * x[v];
      }
    }
    for (int u = 0; u < na; ++u)
      for (int v = 0; v < NV; ++v) vstore_as<S>(d + (a + u) * bs + b + v * L, acc[u][v]);
  }
}

// X (B, n_in) rearranged into block-column panels: panel bc is X[:, bc*bs : (bc+1)*bs] stored contiguously
// (B x bs, row-major) at xp + bc * B * bs, widened to S. One pass over X, shared by the threads, instead of a
// copy of the (B x bs) slice for every stored block (at 10% density of a 4096x4096 layer in blocks of 32, 1638
// copies of 32 KiB against one of 4 MiB).
template <class S, class E>
void bsr_panels(const E* X, int64_t B, int64_t n_in, int bs, S* xp, int nt) {
  const int64_t n_bcols = n_in / bs;
#pragma omp parallel for num_threads(nt) schedule(static)
  for (int64_t bc = 0; bc < n_bcols; ++bc)
    for (int64_t t = 0; t < B; ++t) copy_as<S>(xp + (bc * B + t) * bs, X + t * n_in + bc * bs, bs);
}

// dY and dval stored as E (dY's slices are widened into the S buffers; each dW value is rounded once); X comes
// as the panels of bsr_panels.
template <class S, class E>
void bsr_sddmm(const E* dY, const S* xpanels, int64_t B, int64_t n_out, const int32_t* rp, const int32_t* col,
               int bs, E* dval, const int64_t* split, int nt, S* ybuf_all) {
  constexpr int L = lanes<S>();
  const int64_t bsq = int64_t(bs) * bs;
  // Vector paths where a block row is a whole number of vector pairs (vec2) or vectors (vec1).
  const bool vec2 = bs % (2 * L) == 0, vec1 = bs % L == 0;
#pragma omp parallel for num_threads(nt) schedule(static, 1)
  for (int p = 0; p < nt; ++p) {
    const int tid = sc::thread_id();
    S* yl = ybuf_all + int64_t(tid) * B * bs;
    for (int64_t br = split[p]; br < split[p + 1]; ++br) {
      if (rp[br] == rp[br + 1]) continue;
      for (int64_t t = 0; t < B; ++t) copy_as<S>(yl + t * bs, dY + t * n_out + br * bs, bs);
      for (int64_t k = rp[br]; k < rp[br + 1]; ++k) {
        const S* xl = xpanels + int64_t(col[k]) * B * bs;
        E* d = dval + k * bsq;
        if (!vec1) {
          for (int a = 0; a < bs; ++a)
            for (int b = 0; b < bs; ++b) {
              S s = 0;
              for (int64_t t = 0; t < B; ++t) s += yl[t * bs + a] * xl[t * bs + b];
              d[a * bs + b] = sc::from_compute<E>(s);
            }
          continue;
        }
        if (vec2) {
          int a = 0;
          for (; a + BSR_ROWS <= bs; a += BSR_ROWS) block_dw_rows<S, E, BSR_ROWS, 2>(yl, xl, B, bs, a, BSR_ROWS, d);
          for (; a < bs; a += 4) block_dw_rows<S, E, 4, 2>(yl, xl, B, bs, a, bs - a < 4 ? bs - a : 4, d);
        } else {
          int a = 0;
          for (; a + BSR_ROWS <= bs; a += BSR_ROWS) block_dw_rows<S, E, BSR_ROWS, 1>(yl, xl, B, bs, a, BSR_ROWS, d);
          for (; a < bs; a += 4) block_dw_rows<S, E, 4, 1>(yl, xl, B, bs, a, bs - a < 4 ? bs - a : 4, d);
        }
      }
    }
  }
}

}  // namespace SC_ISA
