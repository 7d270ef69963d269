// Body of the CSR CPU kernels. kernels.cpp includes this file once per instruction set, each time inside its
// own namespace (SC_ISA) and with SC_VBYTES set to the SIMD width in bytes (16, 32, 64); the AVX2+FMA and AVX-512
// copies are compiled under `#pragma GCC target`, and dispatch.h picks one at run time. Portable: GCC/Clang vector
// extensions.
//
// Layout. Activations are row-major (batch, features), as torch gives them. The kernels tile the batch by
// T = NV * lanes rows and transpose each tile into a feature-major buffer Xt (features, T) shared by the threads;
// one live connection is then a broadcast weight times NV contiguous vectors: no gathers, no atomics.
// Threads split the CSR rows into blocks of equal nnz (the SDDMM, and the SpMM with few tiles) or take whole
// batch tiles each (the SpMM with at least a tile per thread); either way no two threads write one output.
//
// bfloat16. The same templates run on bf16 data (storage type E = sc::bf16, compute type S = float): the tiles
// hold bf16 (widened to fp32 where they are read, or multiplied by vdpbf16ps in the avx512bf16 copy, SC_BF16_DOT),
// every sum is in fp32, and each output is rounded once to nearest even where it is stored. x86 copies use a few
// intrinsics for the bf16 loads (immintrin.h, included by the .cpp files).

namespace SC_ISA {

template <class S>
struct VT {
  typedef S v __attribute__((vector_size(SC_VBYTES)));
};
template <class S>
using V = typename VT<S>::v;
template <class S>
constexpr int lanes() { return SC_VBYTES / static_cast<int>(sizeof(S)); }

template <class S>
inline V<S> vload(const S* p) { V<S> v; __builtin_memcpy(&v, p, sizeof(v)); return v; }

// Storage and compute types. The kernels compute in S (float or double) and read and write their operands in a
// storage type E: E = S, or E = sc::bf16 with S = float. With E = S the conversions below are plain loads and
// stores, so the fp32/fp64 kernels compile to what they were before bf16 existed.

// L bf16 values zero-extended into the 32-bit lanes of one vector (vpmovzxwd). GCC 12 compiles the portable
// __builtin_convertvector of this into two half-width zero-extends and an insert, so x86 gets the intrinsic.
template <class U>
inline U zext_bf16(const sc::bf16* p) {
  U u;
#if defined(__x86_64__) && SC_VBYTES == 64
  // (the maskz form: the plain one trips GCC 12's -Wuninitialized in its own header)
  const __m512i z = _mm512_maskz_cvtepu16_epi32(__mmask16(0xFFFF), _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  __builtin_memcpy(&u, &z, sizeof(u));
#elif defined(__x86_64__) && SC_VBYTES == 32
  const __m256i z = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  __builtin_memcpy(&u, &z, sizeof(u));
#else
  typedef uint16_t H __attribute__((vector_size(SC_VBYTES / 2)));
  H h;
  __builtin_memcpy(&h, p, sizeof(h));
  u = __builtin_convertvector(h, U);
#endif
  return u;
}

// The low 16 bits of each 32-bit lane of u, stored as L bf16 (vpmovdw / vpackusdw).
template <class U>
inline void narrow_bf16(sc::bf16* p, U u) {
  typedef uint16_t H __attribute__((vector_size(SC_VBYTES / 2)));
  const H h = __builtin_convertvector(u & 0xFFFFu, H);
  __builtin_memcpy(p, &h, sizeof(h));
}

// One vector of S (L lanes) from L consecutive values of E: bf16 widens to fp32 by a 16-bit shift (exact).
template <class S, class E>
inline V<S> vload_as(const E* p) {
  if constexpr (std::is_same<E, S>::value) {
    return vload<S>(p);
  } else {
    static_assert(sc::is_bf16<E>() && std::is_same<S, float>::value, "storage types: S itself, or bf16 for float");
    typedef uint32_t U __attribute__((vector_size(SC_VBYTES)));
    const U u = zext_bf16<U>(p) << 16;
    V<S> v;
    __builtin_memcpy(&v, &u, sizeof(v));
    return v;
  }
}

// L lanes of an fp32 vector rounded to bf16 (nearest, ties to even; NaN kept and quieted): sc::float_to_bf16 on
// every lane, in integer vector arithmetic.
template <class U>
inline U round_bf16_lanes(U u) {
  const U r = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  const U nan = (U)((u & 0x7FFFFFFFu) > 0x7F800000u);  // all ones in the NaN lanes
  return (r & ~nan) | (((u >> 16) | 0x40u) & nan);
}

// Stores one vector of S as L consecutive values of E (rounded to nearest even for bf16).
template <class S, class E>
inline void vstore_as(E* p, V<S> v) {
  if constexpr (std::is_same<E, S>::value) {
    __builtin_memcpy(p, &v, sizeof(v));
  } else {
    static_assert(sc::is_bf16<E>() && std::is_same<S, float>::value, "storage types: S itself, or bf16 for float");
    typedef uint32_t U __attribute__((vector_size(SC_VBYTES)));
    U u;
    __builtin_memcpy(&u, &v, sizeof(u));
    narrow_bf16(p, round_bf16_lanes(u));
  }
}

// Every lane = s, written as a brace initialiser so that it compiles to one broadcast. (Not `V<S>{} + s`: IEEE
// -0.0 + 0.0 = +0.0 forces a real add; not a loop over lanes: that can become a chain of lane inserts.)
template <class S, std::size_t... I>
inline V<S> vsplat_impl(S s, std::index_sequence<I...>) { return V<S>{((void)I, s)...}; }
template <class S>
inline V<S> vsplat(S s) { return vsplat_impl<S>(s, std::make_index_sequence<lanes<S>()>{}); }

// Every lane = the value at p, as S. A bf16 is broadcast as a 16-bit word to every half of every 32-bit lane and
// shifted into the high halves (vpbroadcastw + vpslld: the scalar route, movzx + shl + vmovd + vbroadcastss, costs
// two more uops on the shuffle port that the broadcast of an fp32 from memory does not use).
template <class S, class E>
inline V<S> vsplat_as(const E* p) {
  if constexpr (std::is_same<E, S>::value) {
    return vsplat<S>(*p);
  } else {
    typedef uint32_t U __attribute__((vector_size(SC_VBYTES)));
    const V<uint16_t> h = vsplat<uint16_t>(p->bits);
    U u;
    __builtin_memcpy(&u, &h, sizeof(u));
    u <<= 16;
    V<S> v;
    __builtin_memcpy(&v, &u, sizeof(v));
    return v;
  }
}

#if defined(__clang__)
#define SC_SHUF(a, b, ...) __builtin_shufflevector(a, b, __VA_ARGS__)
#else
#define SC_SHUF(a, b, ...) __builtin_shuffle(a, b, (IV){__VA_ARGS__})
#endif

// Butterfly step of width W (a power of two below L) on a pair of rows (a, b) of an L x L block: lane c of the
// low output is a[c] where bit W of c is clear and b[c - W] where it is set; the high output is a[c + W] or b[c].
// One step swaps bit W of the row index with bit W of the column index, so the log2(L) steps W = 1, 2, ..., L/2
// transpose the block. Used for 64-byte vectors, where any two-source shuffle is one instruction (vpermt2ps).
template <int L, int W, bool HI>
constexpr int bfly_lane(int c) {
  return HI ? ((c & W) ? L + c : c + W) : ((c & W) ? L + c - W : c);
}
template <class S, int W, bool HI, std::size_t... I>
inline V<S> bfly_impl(V<S> a, V<S> b, std::index_sequence<I...>) {
  constexpr int L = lanes<S>();
#if defined(__clang__)
  return __builtin_shufflevector(a, b, bfly_lane<L, W, HI>(int(I))...);
#else
  typedef typename std::conditional<sizeof(S) == 4, int32_t, int64_t>::type IE;
  typedef IE IV __attribute__((vector_size(SC_VBYTES)));
  return __builtin_shuffle(a, b, IV{bfly_lane<L, W, HI>(int(I))...});
#endif
}
template <class S, int W, bool HI>
inline V<S> bfly(V<S> a, V<S> b) {
  return bfly_impl<S, W, HI>(a, b, std::make_index_sequence<lanes<S>()>{});
}

// bf16 tile rows widened without a shuffle. Seen as 32-bit lanes, a vector of 2L bf16 holds element 2i in the
// low half of lane i and element 2i+1 in the high half, so `<< 16` turns lane i into the fp32 of element 2i and
// `& 0xFFFF0000` into that of element 2i+1: two integer ops for 2L values (__builtin_convertvector to 32-bit
// lanes costs GCC 12 five shuffles per 16). The even and odd elements land in separate vectors, a permutation that
// a dot product ignores and that the SpMM undoes once per output row (interleave_pairs).
template <class S>
inline void widen_pairs(const sc::bf16* p, V<S>& even, V<S>& odd) {
  typedef uint32_t U __attribute__((vector_size(SC_VBYTES)));
  U u;
  __builtin_memcpy(&u, p, sizeof(u));
  const U e = u << 16, o = u & 0xFFFF0000u;
  __builtin_memcpy(&even, &e, sizeof(even));
  __builtin_memcpy(&odd, &o, sizeof(odd));
}

template <int L, bool HI>
constexpr int pair_lane(int c) { return (HI ? L / 2 : 0) + c / 2 + (c & 1 ? L : 0); }
template <class S, bool HI, std::size_t... I>
inline V<S> interleave_impl(V<S> a, V<S> b, std::index_sequence<I...>) {
  constexpr int L = lanes<S>();
#if defined(__clang__)
  return __builtin_shufflevector(a, b, pair_lane<L, HI>(int(I))...);
#else
  typedef typename std::conditional<sizeof(S) == 4, int32_t, int64_t>::type IE;
  typedef IE IV __attribute__((vector_size(SC_VBYTES)));
  return __builtin_shuffle(a, b, IV{pair_lane<L, HI>(int(I))...});
#endif
}
// even = elements 0, 2, .., 2L-2 and odd = 1, 3, .., 2L-1 of 2L values (as widen_pairs leaves them) -> the values
// in order: even = elements 0..L-1, odd = L..2L-1.
template <class S>
inline void interleave_pairs(V<S>& even, V<S>& odd) {
  const V<S> lo = interleave_impl<S, false>(even, odd, std::make_index_sequence<lanes<S>()>{});
  const V<S> hi = interleave_impl<S, true>(even, odd, std::make_index_sequence<lanes<S>()>{});
  even = lo;
  odd = hi;
}

// a[v] += w * (tile row x)[v] for the NV vectors of a tile row stored as TE. bf16 rows with NV even are widened by
// pairs, so a[2z] and a[2z+1] then hold the even and odd batch rows of the z-th 2L rows (see widen_pairs).
template <class S, class TE, int NV>
inline void tile_row_fma(V<S>* a, V<S> w, const TE* x) {
  constexpr int L = lanes<S>();
  if constexpr (sc::is_bf16<TE>() && NV % 2 == 0) {
    for (int z = 0; z < NV / 2; ++z) {
      V<S> e, o;
      widen_pairs<S>(x + z * 2 * L, e, o);
      a[2 * z] += w * e;
      a[2 * z + 1] += w * o;
    }
  } else {
    for (int v = 0; v < NV; ++v) a[v] += w * vload_as<S>(x + v * L);
  }
}
// Accumulators filled by tile_row_fma back in batch order.
template <class S, class TE, int NV>
inline void tile_row_order(V<S>* a) {
  if constexpr (sc::is_bf16<TE>() && NV % 2 == 0)
    for (int z = 0; z < NV / 2; ++z) interleave_pairs<S>(a[2 * z], a[2 * z + 1]);
}

// r[i] <- column i of the L x L block whose rows were r: the butterfly steps of width W, 2W, ..., L/2.
template <class S, int W>
inline void transpose_regs(V<S>* r) {
  constexpr int L = lanes<S>();
  if constexpr (W < L) {
    for (int i = 0; i < L; ++i) {
      if (i & W) continue;
      const V<S> lo = bfly<S, W, false>(r[i], r[i + W]);
      const V<S> hi = bfly<S, W, true>(r[i], r[i + W]);
      r[i] = lo;
      r[i + W] = hi;
    }
    transpose_regs<S, 2 * W>(r);
  }
}

// Four lanes of S, whatever the SIMD width: the result of reduce4.
template <class S>
struct V4T {
  typedef S v __attribute__((vector_size(4 * sizeof(S))));
};
template <class S>
using V4 = typename V4T<S>::v;

// Lane u of the result = sum of the lanes of s[u], u < 4, by a transpose-and-add tree (about one vector op per
// input), ending in a 4-lane vector so that four results are added to memory with one load and one store.
template <class S>
inline V4<S> reduce4(const V<S>* s) {
  constexpr int L = lanes<S>();
  V4<S> out;
  if constexpr (SC_VBYTES == 64) {
    // a: pair sums of s0 and s1 interleaved; b: of s2 and s3; c: lanes 4g + u hold partial sums of s[u].
    const V<S> a = bfly<S, 1, false>(s[0], s[1]) + bfly<S, 1, true>(s[0], s[1]);
    const V<S> b = bfly<S, 1, false>(s[2], s[3]) + bfly<S, 1, true>(s[2], s[3]);
    const V<S> c = bfly<S, 2, false>(a, b) + bfly<S, 2, true>(a, b);
    __builtin_memcpy(&out, &c, sizeof(out));
    for (int g = 1; g < L / 4; ++g) {
      V4<S> part;
      __builtin_memcpy(&part, reinterpret_cast<const char*>(&c) + g * sizeof(part), sizeof(part));
      out += part;
    }
  } else if constexpr (L == 8) {
    typedef int32_t IV __attribute__((vector_size(32)));
    // pairs: (s0+s1 interleaved), (s2+s3 interleaved)
    const V<S> a = SC_SHUF(s[0], s[1], 0, 8, 2, 10, 4, 12, 6, 14) + SC_SHUF(s[0], s[1], 1, 9, 3, 11, 5, 13, 7, 15);
    const V<S> b = SC_SHUF(s[2], s[3], 0, 8, 2, 10, 4, 12, 6, 14) + SC_SHUF(s[2], s[3], 1, 9, 3, 11, 5, 13, 7, 15);
    // c = [s0 s1 s2 s3 | s0 s1 s2 s3] partial sums of the low and high halves
    const V<S> c = SC_SHUF(a, b, 0, 1, 8, 9, 4, 5, 12, 13) + SC_SHUF(a, b, 2, 3, 10, 11, 6, 7, 14, 15);
    V4<S> lo, hi;
    __builtin_memcpy(&lo, &c, sizeof(lo));
    __builtin_memcpy(&hi, reinterpret_cast<const char*>(&c) + sizeof(lo), sizeof(hi));
    out = lo + hi;
  } else if constexpr (L == 4) {
    typedef typename std::conditional<sizeof(S) == 4, int32_t, int64_t>::type IE;
    typedef IE IV __attribute__((vector_size(4 * sizeof(IE))));
    const V<S> a = SC_SHUF(s[0], s[1], 0, 4, 2, 6) + SC_SHUF(s[0], s[1], 1, 5, 3, 7);
    const V<S> b = SC_SHUF(s[2], s[3], 0, 4, 2, 6) + SC_SHUF(s[2], s[3], 1, 5, 3, 7);
    const V<S> c = SC_SHUF(a, b, 0, 1, 4, 5) + SC_SHUF(a, b, 2, 3, 6, 7);
    __builtin_memcpy(&out, &c, sizeof(out));
  } else {
    for (int u = 0; u < 4; ++u) {
      S t = 0;
      for (int i = 0; i < L; ++i) t += s[u][i];
      out[u] = t;
    }
  }
  return out;
}

// dst[c*ldd + r] = src[r*lds + c] for r, c < L: an L x L transpose in registers. Moving data in L x L blocks
// keeps at most L source and L destination cache lines live, which matters: the rows of a (batch, features)
// tensor are often a power of two apart and would otherwise all fall into the same L1 set.
// The source and destination may be stored as bf16 (ES, ED): converted on load and rounded on store.
// bf16 to bf16 moves the 16-bit words as they are (zero-extended to 32-bit lanes for the shuffles, truncated on the
// way out), without converting them.
template <class S, class ED>
inline void transpose_store(ED* p, V<S> v, bool raw) {
  if constexpr (sc::is_bf16<ED>()) {
    if (raw) {
      typedef uint32_t U __attribute__((vector_size(SC_VBYTES)));
      U u;
      __builtin_memcpy(&u, &v, sizeof(u));
      narrow_bf16(p, u);
      return;
    }
  }
  vstore_as<S>(p, v);
}

template <class S, class ES, class ED>
inline void transpose_LxL(const ES* src, int64_t lds, ED* dst, int64_t ldd) {
  constexpr int L = lanes<S>();
  constexpr bool RAW = sc::is_bf16<ES>() && sc::is_bf16<ED>();
  V<S> r[L];
  for (int i = 0; i < L; ++i) {
    if constexpr (RAW) {
      typedef uint32_t U __attribute__((vector_size(SC_VBYTES)));
      const U u = zext_bf16<U>(src + i * lds);
      __builtin_memcpy(&r[i], &u, sizeof(u));
    } else {
      r[i] = vload_as<S>(src + i * lds);
    }
  }
  if constexpr (SC_VBYTES == 64) {
    transpose_regs<S, 1>(r);
    for (int c = 0; c < L; ++c) transpose_store<S>(dst + c * ldd, r[c], RAW);
  } else if constexpr (L == 8) {
    typedef int32_t IV __attribute__((vector_size(32)));
    V<S> t[8], u[8];
    for (int i = 0; i < 8; i += 2) {
      t[i] = SC_SHUF(r[i], r[i + 1], 0, 8, 1, 9, 4, 12, 5, 13);
      t[i + 1] = SC_SHUF(r[i], r[i + 1], 2, 10, 3, 11, 6, 14, 7, 15);
    }
    for (int h = 0; h < 8; h += 4) {
      u[h + 0] = SC_SHUF(t[h], t[h + 2], 0, 1, 8, 9, 4, 5, 12, 13);
      u[h + 1] = SC_SHUF(t[h], t[h + 2], 2, 3, 10, 11, 6, 7, 14, 15);
      u[h + 2] = SC_SHUF(t[h + 1], t[h + 3], 0, 1, 8, 9, 4, 5, 12, 13);
      u[h + 3] = SC_SHUF(t[h + 1], t[h + 3], 2, 3, 10, 11, 6, 7, 14, 15);
    }
    for (int c = 0; c < 4; ++c) {
      const V<S> lo = SC_SHUF(u[c], u[c + 4], 0, 1, 2, 3, 8, 9, 10, 11);
      const V<S> hi = SC_SHUF(u[c], u[c + 4], 4, 5, 6, 7, 12, 13, 14, 15);
      transpose_store<S>(dst + c * ldd, lo, RAW);
      transpose_store<S>(dst + (c + 4) * ldd, hi, RAW);
    }
  } else if constexpr (L == 4) {
    typedef typename std::conditional<sizeof(S) == 4, int32_t, int64_t>::type IE;
    typedef IE IV __attribute__((vector_size(4 * sizeof(IE))));
    const V<S> t0 = SC_SHUF(r[0], r[1], 0, 4, 2, 6), t1 = SC_SHUF(r[0], r[1], 1, 5, 3, 7);
    const V<S> t2 = SC_SHUF(r[2], r[3], 0, 4, 2, 6), t3 = SC_SHUF(r[2], r[3], 1, 5, 3, 7);
    const V<S> o[4] = {SC_SHUF(t0, t2, 0, 1, 4, 5), SC_SHUF(t1, t3, 0, 1, 4, 5), SC_SHUF(t0, t2, 2, 3, 6, 7),
                       SC_SHUF(t1, t3, 2, 3, 6, 7)};
    for (int c = 0; c < 4; ++c) transpose_store<S>(dst + c * ldd, o[c], RAW);
  } else {
    for (int i = 0; i < L; ++i)
      for (int c = 0; c < L; ++c) dst[c * ldd + i] = sc::from_compute<ED>(r[i][c]);
  }
}

// Xt[i*T + t] = X[(b0+t)*ldx + i] for i in [i0, i1), t < tb; lanes t >= tb are zero.
// Blocks of L source rows are swept along the features, so only L source lines are live at a time.
// X is stored as E and the tile Xt as TE: the compute type S, or bf16 (from bf16: a copy, exact either way).
template <class S, class E, class TE>
inline void transpose_tile(const E* X, int64_t ldx, int64_t b0, int tb, int T, int64_t i0, int64_t i1, TE* Xt) {
  constexpr int L = lanes<S>();
  const int tfull = tb - tb % L;
  const int64_t ifull = i0 + (i1 - i0) / L * L;
  for (int t = 0; t < tfull; t += L)
    for (int64_t i = i0; i < ifull; i += L) transpose_LxL<S>(X + (b0 + t) * ldx + i, ldx, Xt + i * T + t, T);
  for (int64_t i = i0; i < i1; ++i) {
    for (int t = (i < ifull ? tfull : 0); t < tb; ++t)
      Xt[i * T + t] = sc::from_compute<TE>(sc::to_compute<S>(X[(b0 + t) * ldx + i]));
    for (int t = tb; t < T; ++t) Xt[i * T + t] = sc::from_compute<TE>(S(0));
  }
}

// This thread's share (features [i0, i1) of an even split) of the tile transpose that all threads then read.
template <class S, class E, class TE>
inline void transpose_tile_share(const E* X, int64_t ldx, int64_t b0, int tb, int T, int64_t n, int tid, int nth,
                                 TE* Xt) {
  const int64_t per = (n + nth - 1) / nth;
  const int64_t i0 = tid * per < n ? tid * per : n;
  const int64_t i1 = i0 + per < n ? i0 + per : n;
  transpose_tile<S>(X, ldx, b0, tb, T, i0, i1, Xt);
}

// Feature-major operands. A feature-major (batch, features) tensor is stored as (features, batch): row i holds
// feature i of every sample, so the batch columns [b0, b0 + T) of it already are a tile, rows ldx apart. A full
// tile is read in place (no transpose); the last, partial one is copied here, zero-padded to T lanes, so that no
// read goes past the end of the array and the padding lanes of a dot product are zeros.
// Xt[i*T + t] = X[i*ldx + b0 + t] for i in [i0, i1), t < tb; lanes t >= tb are zero.
template <class S, class E, class TE>
inline void copy_tile_fm(const E* X, int64_t ldx, int64_t b0, int tb, int T, int64_t i0, int64_t i1, TE* Xt) {
  for (int64_t i = i0; i < i1; ++i) {
    const E* src = X + i * ldx + b0;
    TE* dst = Xt + i * T;
    for (int t = 0; t < tb; ++t) dst[t] = sc::from_compute<TE>(sc::to_compute<S>(src[t]));
    for (int t = tb; t < T; ++t) dst[t] = sc::from_compute<TE>(S(0));
  }
}

// Rows [i0, i1) of a batch tile in the form the kernels read, rows ld apart: feature-major and full, the operand
// itself (no copy); otherwise copied (feature-major) or transposed (row-major) into buf, rows T apart.
template <class S, class E, class TE>
struct TileView {
  const TE* p;
  int64_t ld;
};
//
// In place pays only while a tile row is read a few times: its rows are ldx apart, two cache lines in each page
// or so, where the buffer's rows are contiguous (and in huge pages), so many reads of them cost TLB misses. With
// `in_place` false a full feature-major tile is copied too (a plain strided copy, no transpose).
template <class S, class E, class TE>
inline TileView<S, E, TE> tile_view(const E* X, int64_t ldx, bool fm, int64_t b0, int tb, int T, int64_t i0,
                                    int64_t i1, TE* buf, bool in_place = true) {
  if (fm && tb == T && in_place) {
    if constexpr (std::is_same<E, TE>::value) return {X + b0, ldx};
  }
  if (fm) copy_tile_fm<S>(X, ldx, b0, tb, T, i0, i1, buf);
  else transpose_tile<S>(X, ldx, b0, tb, T, i0, i1, buf);
  return {buf, T};
}

// The SpMMs' epilogue (sc::Epilogue, common.h): a ReLU and/or a ReLU-backward mask on each finished output.
template <class E>
using Epilogue = sc::Epilogue<E>;

template <class S>
inline V<S> relu_v(V<S> o) { return o < V<S>{} ? V<S>{} : o; }

// Y[j*ldy + b0 + t] = a[t] (+ b) for t < tb: one finished output row written straight into a feature-major Y
// (rounded once for bf16), through the epilogue; m: the mask's row (or null).
template <class S, class E, int NV>
inline void store_row_fm(const V<S>* a, S b, E* y, int tb, bool relu, const E* m) {
  constexpr int L = lanes<S>();
  for (int v = 0; v < NV; ++v) {
    V<S> o = a[v] + b;
    if (relu) o = relu_v<S>(o);
    if ((v + 1) * L <= tb) {
      if (m) o = vload_as<S>(m + v * L) <= V<S>{} ? V<S>{} : o;
      vstore_as<S>(y + v * L, o);
    } else {
      for (int t = v * L; t < tb; ++t) {
        const S ot = o[t - v * L];
        y[t] = sc::from_compute<E>(m && sc::to_compute<S>(m[t]) <= S(0) ? S(0) : ot);
      }
      break;
    }
  }
}

// Y[(b0+t)*ldy + j0 + r] = ob[r*T + t] for r < nr, t < tb: write finished rows of a tile back to (batch, out),
// L batch rows at a time (the same cache-set argument as transpose_tile). Y stored as bf16: each value is rounded
// once, here.
template <class S, class E>
inline void store_rows(const S* ob, int nr, int T, int tb, E* Y, int64_t ldy, int64_t b0, int64_t j0) {
  constexpr int L = lanes<S>();
  const int tfull = tb - tb % L;
  const int rfull = nr - nr % L;
  for (int t = 0; t < tfull; t += L)
    for (int r = 0; r < rfull; r += L) transpose_LxL<S>(ob + r * T + t, T, Y + (b0 + t) * ldy + j0 + r, ldy);
  for (int t = 0; t < tb; ++t) {
    for (int r = (t < tfull ? rfull : 0); r < nr; ++r) Y[(b0 + t) * ldy + j0 + r] = sc::from_compute<E>(ob[r * T + t]);
  }
}

// Rows buffered before a store_rows / loaded by one transpose_tile of dY.
constexpr int ROW_BLOCK = 64;

// Rows [r0, r1) of Yt = W * Xt for one batch tile, written straight into Y (batch, n_out) (+ bias).
// With GATHER, the weights are values[perm[k]] (the transposed SpMM of dX) and are also copied to gval[k] for
// the later tiles. The copy runs GATHER_AHEAD entries ahead of the arithmetic, four per iteration, so its random
// reads of `values` overlap the FMAs instead of costing a separate pass.
//
// E: the storage type of values, gval, bias and Y (S, or bf16 with S = float: each weight is widened where it is
// broadcast, and each output rounded once, in store_rows). TE: that of the tile Xt (S, or bf16, widened on load).
constexpr int64_t GATHER_AHEAD = 64;

//
// I: the index type of col and perm: int32_t, with perm[k] the CSR position of transposed entry k; or int16_t (a
// compact pattern, see sparsecore/pattern.py), with perm[k] its offset inside W's row col[k], so that the CSR
// position is prp[col[k]] + perm[k] (prp: W's rowptr; only read with GATHER and int16_t indices).
template <class S, class E, class TE, int NV, bool GATHER, bool FMY, class I>
inline void spmm_rows(const int32_t* rp, const I* col, const E* values, const I* perm, const int32_t* prp, E* gval,
                      const TE* Xt, int64_t ldt, const E* bias, E* Y, int64_t ldy, int64_t b0, int tb, int64_t r0,
                      int64_t r1, Epilogue<E> ep) {
  constexpr int L = lanes<S>();
  constexpr int T = NV * L;
  alignas(64) S ob[FMY ? 1 : ROW_BLOCK * T];  // row-major Y: outputs of up to ROW_BLOCK rows, stored together
  int nr = 0;
  int64_t j0 = r0;
  const E* val = GATHER ? gval : values;
  int64_t gk = rp[r0];  // next entry to gather
  const int64_t gend = rp[r1];
  for (int64_t j = r0; j < r1; ++j) {
    if (GATHER) {
      const int64_t need = rp[j + 1] + GATHER_AHEAD < gend ? rp[j + 1] + GATHER_AHEAD : gend;
      for (; gk < need; ++gk) gval[gk] = values[sc::csr_position(col, perm, prp, gk)];
    }
    // U live connections per iteration on separate accumulators hide the FMA and L2 latencies; U * NV
    // accumulators and U broadcasts must fit the 16 vector registers.
    constexpr int U = NV >= 8 ? 1 : (NV >= 4 ? 2 : 4);
    V<S> acc[U][NV];
    for (int u = 0; u < U; ++u)
      for (int v = 0; v < NV; ++v) acc[u][v] = V<S>{};
    int64_t k = rp[j];
    const int64_t e = rp[j + 1];
    for (; k + U - 1 < e; k += U) {
      if (GATHER && gk + U <= gend) {
        for (int u = 0; u < U; ++u) gval[gk + u] = values[sc::csr_position(col, perm, prp, gk + u)];
        gk += U;
      }
      // int32 column indices two per 64-bit load: the loop is bound by load ports, not by arithmetic.
      uint64_t cc[(U + 1) / 2];
      if constexpr (sizeof(I) == 4) {
        if constexpr (U == 1) cc[0] = static_cast<uint32_t>(col[k]);
        else
          for (int u = 0; u < U / 2; ++u) __builtin_memcpy(&cc[u], col + k + 2 * u, 8);
      }
      for (int u = 0; u < U; ++u) {
        uint64_t ci;
        if constexpr (sizeof(I) == 4) ci = (u & 1) ? (cc[u / 2] >> 32) : static_cast<uint32_t>(cc[u / 2]);
        else ci = sc::index_at(col, k + u);
        const TE* x = Xt + static_cast<int64_t>(ci) * ldt;
        tile_row_fma<S, TE, NV>(acc[u], vsplat_as<S>(val + k + u), x);
      }
    }
    V<S>* a = acc[0];
    for (; k < e; ++k) {
      const TE* x0 = Xt + sc::index_at(col, k) * ldt;
      tile_row_fma<S, TE, NV>(a, vsplat_as<S>(val + k), x0);
    }
    for (int u = 1; u < U; ++u)
      for (int v = 0; v < NV; ++v) a[v] += acc[u][v];
    tile_row_order<S, TE, NV>(a);
    const S b = bias ? sc::to_compute<S>(bias[j]) : S(0);
    if constexpr (FMY) {
      store_row_fm<S, E, NV>(a, b, Y + j * ldy + b0, tb, ep.relu, ep.mask ? ep.mask + j * ldy + b0 : nullptr);
      continue;
    }
    for (int v = 0; v < NV; ++v) {  // (a row-major Y takes no mask: spmm_run refuses one)
      const V<S> o = ep.relu ? relu_v<S>(a[v] + b) : a[v] + b;
      __builtin_memcpy(ob + nr * T + v * L, &o, sizeof(o));
    }
    if (++nr == ROW_BLOCK) {
      store_rows<S, E>(ob, nr, T, tb, Y, ldy, b0, j0);
      nr = 0;
      j0 = j + 1;
    }
  }
  if (!FMY && nr) store_rows<S, E>(ob, nr, T, tb, Y, ldy, b0, j0);
}

// Y (B, n_rows) = X (B, n_cols) W^T + bias, W in CSR (rp, col, values). split: nt+1 row boundaries.
// With perm the weights are values[perm] (dX = dY W over the transpose index); they are gathered into gval
// (nnz) during the first tile.
//
// Two ways to share a tile's work. By rows: the threads transpose a share of the tile into a buffer all of them
// read, meet at a barrier, then each computes its rows. Whole tiles: each thread takes tiles from a shared counter,
// transposes them into its own buffer and computes every row: no barrier per tile, and the tile a thread reads is
// the one it wrote (in its own L2). With by_tile, n_whole tiles (a multiple of the thread count) go whole and the
// others by rows: the first one when it gathers gval for the rest, and the last n_tiles - n_whole - head ones, so
// that every thread gets the same share.
// X, values, gval, bias and Y are stored as E, the tile buffers buf as TE (see spmm_rows).
//
// Layouts: X is row-major (B rows ldx apart; its tiles are transposed into buf) or, with x_fm, feature-major
// (n_cols rows of ldx batch entries; a full tile is read in place). Y is row-major (ldy = its row length) or, with
// FMY, feature-major (n_rows rows ldy apart): each output row of a tile is then stored as it is finished.
template <class S, class E, class TE, int NV, bool FMY, class I>
void spmm(const E* X, int64_t ldx, bool x_fm, bool in_place, int64_t B, int64_t n_cols, const int32_t* rp,
          const I* col, const E* values, const I* perm, const int32_t* prp, E* gval, int64_t n_rows, const E* bias,
          E* Y, int64_t ldy, const int64_t* split, int nt, TE* buf, bool by_tile, Epilogue<E> ep) {
  constexpr int T = NV * lanes<S>();
  const int64_t n_tiles = (B + T - 1) / T;
  const int64_t head = by_tile ? (perm ? 1 : 0) : n_tiles;              // tiles [0, head) by rows
  const int64_t n_whole = by_tile ? (n_tiles - head) / nt * nt : 0;      // then [head, head + n_whole) whole
  // By rows: two tile buffers, so that a thread may transpose tile n+1 while another still reads tile n.
  // Whole tiles: one buffer per thread (buf holds max(2, nt) of them). A feature-major X needs a buffer only for
  // its partial last tile, which each thread then copies into its own.
  TE* Xt[2] = {buf, buf + n_cols * T};
  std::atomic<int64_t> next_tile{head};
#pragma omp parallel num_threads(nt)
  {
    const int tid = sc::thread_id(), nth = sc::team_size();
    TE* own = buf + static_cast<int64_t>(tid) * n_cols * T;
    auto tile_by_rows = [&](int64_t n) {
      const int64_t b0 = n * T;
      const int tb = static_cast<int>(B - b0 < T ? B - b0 : T);
      TileView<S, E, TE> xt{Xt[n & 1], T};
      if (x_fm) xt = tile_view<S>(X, ldx, true, b0, tb, T, 0, n_cols, own, in_place);
      else transpose_tile_share<S>(X, ldx, b0, tb, T, n_cols, tid, nth, Xt[n & 1]);
      // Also orders tile 0's gather of gval before the reads of the later tiles.
#pragma omp barrier
      for (int p = tid; p < nt; p += nth) {
        if (!perm)
          spmm_rows<S, E, TE, NV, false, FMY, I>(rp, col, values, nullptr, nullptr, nullptr, xt.p, xt.ld, bias, Y,
                                                 ldy, b0, tb, split[p], split[p + 1], ep);
        else if (n == 0)
          spmm_rows<S, E, TE, NV, true, FMY, I>(rp, col, values, perm, prp, gval, xt.p, xt.ld, bias, Y, ldy, b0,
                                                tb, split[p], split[p + 1], ep);
        else
          spmm_rows<S, E, TE, NV, false, FMY, I>(rp, col, gval, nullptr, nullptr, nullptr, xt.p, xt.ld, bias, Y,
                                                 ldy, b0, tb, split[p], split[p + 1], ep);
      }
      if (x_fm) {  // the next tile's copy may reuse `own`: no thread may still read this one (rows of other threads)
#pragma omp barrier
      }
    };
    for (int64_t n = 0; n < head; ++n) tile_by_rows(n);
    if (by_tile) {
      // Every thread must be done with the shared buffers (and, with a gather, with gval) first.
      if (head > 0) {
#pragma omp barrier
      }
      const E* val = perm ? gval : values;
      for (int64_t n; (n = next_tile.fetch_add(1, std::memory_order_relaxed)) < head + n_whole;) {
        const int64_t b0 = n * T;
        const int tb = static_cast<int>(B - b0 < T ? B - b0 : T);
        const TileView<S, E, TE> xt = tile_view<S>(X, ldx, x_fm, b0, tb, T, 0, n_cols, own, in_place);
        spmm_rows<S, E, TE, NV, false, FMY, I>(rp, col, val, nullptr, nullptr, nullptr, xt.p, xt.ld, bias, Y, ldy,
                                               b0, tb, 0, n_rows, ep);
      }
      // The tail tiles reuse the shared buffers, which overlap the per-thread ones.
      if (head + n_whole < n_tiles) {
#pragma omp barrier
      }
      for (int64_t n = head + n_whole; n < n_tiles; ++n) tile_by_rows(n);
    }
  }
}

// One row of the transposed dY tile (T = NV * lanes batch rows), held in registers for the dot products of its
// row's entries with rows of the X tile. The tiles are stored as TE: S, or bf16 (widened to fp32 on load).
// bf16 rows (NV even) are widened by pairs (widen_pairs): both operands get the same permutation of the batch
// rows, which the dot product does not see.
template <class S, class TE, int NV>
struct DyRow {
  static constexpr int L = lanes<S>();
  static constexpr bool PAIRS = sc::is_bf16<TE>() && NV % 2 == 0;
  V<S> v[NV];
  void load(const TE* p) {
    if constexpr (PAIRS)
      for (int z = 0; z < NV / 2; ++z) widen_pairs<S>(p + z * 2 * L, v[2 * z], v[2 * z + 1]);
    else
      for (int i = 0; i < NV; ++i) v[i] = vload_as<S>(p + i * L);
  }
  // Zero the lanes that `keep` (see tile_keep_mask) clears: bitwise, so an inf or NaN there goes too. (An inf in X
  // on such a lane then meets a zero: NaN in dW where the tile before already summed +-inf. Masking each x load as
  // well cost dW 4-7% at batch 100 on a Xeon, for non-finite either way: docs/DESIGN.md.)
  template <class M>
  void keep_only(const M* keep) {
    for (int i = 0; i < NV; ++i) v[i] = (V<S>)((M)v[i] & keep[i]);
  }
  // <dy, x> as one vector of partial sums (two accumulators: one FMA chain would be latency bound).
  V<S> dot(const TE* x) const {
    if constexpr (PAIRS) {
      V<S> a = V<S>{}, c = V<S>{};
      for (int z = 0; z < NV / 2; ++z) {
        V<S> e, o;
        widen_pairs<S>(x + z * 2 * L, e, o);
        a += v[2 * z] * e;
        c += v[2 * z + 1] * o;
      }
      return a + c;
    } else {
      V<S> a = v[0] * vload_as<S>(x), c = V<S>{};
      for (int i = 1; i < NV; i += 2) {
        c += v[i] * vload_as<S>(x + i * L);
        if (i + 1 < NV) a += v[i + 1] * vload_as<S>(x + (i + 1) * L);
      }
      return a + c;
    }
  }
};

#ifdef SC_BF16_DOT
// bf16 tiles with AVX512-BF16: vdpbf16ps multiplies 32 bf16 pairs and adds each adjacent pair of products into
// one of 16 fp32 lanes, so one instruction does the dot product of 32 batch rows (two FMAs and two 64-byte loads
// with fp32 tiles) and a tile row is one 64-byte vector (T = 32) instead of two. The instruction rounds each add
// to nearest even in fp32, like the FMAs, but treats denormal inputs as zero and flushes denormal results: a
// difference below 2^-126 in absolute terms, far inside the fp32 accumulation error of any dW entry that is not
// itself that small.
template <int NV>
struct DyRow<float, sc::bf16, NV> {
  static constexpr int NZ = (NV + 1) / 2;  // 64-byte vectors per tile row: 32 bf16 batch rows each
  __m512bh v[NZ];
  static __m512bh load_z(const sc::bf16* p) {
    // One vector per tile row of T = 16 bf16 (NV = 1) is half a register: the upper half must be zero, not the
    // next row's values (0 * inf would be NaN).
    // A 32-byte load zero-extended in the register (vmovdqu ymm): a partial memcpy into a zeroed vector went
    // through the stack, a store-forwarding stall per dot product (a 16-row tile took 4x the widened copy's time).
    if constexpr (NV == 1)
      return (__m512bh)_mm512_zextsi256_si512(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
    else
      return (__m512bh)_mm512_loadu_si512(p);
  }
  void load(const sc::bf16* p) {
    for (int z = 0; z < NZ; ++z) v[z] = load_z(p + z * 32);
  }
  V<float> dot(const sc::bf16* x) const {
    __m512 a = _mm512_dpbf16_ps(_mm512_setzero_ps(), v[0], load_z(x));
    if constexpr (NZ > 1) {
      __m512 c = _mm512_dpbf16_ps(_mm512_setzero_ps(), v[1], load_z(x + 32));
      for (int z = 2; z < NZ; z += 2) {
        a = _mm512_dpbf16_ps(a, v[z], load_z(x + z * 32));
        if (z + 1 < NZ) c = _mm512_dpbf16_ps(c, v[z + 1], load_z(x + (z + 1) * 32));
      }
      a = _mm512_add_ps(a, c);
    }
    return (V<float>)a;
  }
};
#endif

// Lane masks of a tile row whose first `skip` batch rows belong to the tile before it (the last tile of a batch,
// shifted to end at the batch's end: see shift_last_tile in kernels.cpp): all ones on the lanes the SDDMM sums,
// zero on the first `skip`. Integer vectors of S's width, for DyRow::keep_only.
template <class S>
struct KeepMaskT {
  typedef typename std::conditional<sizeof(S) == 4, int32_t, int64_t>::type I;
  typedef I v __attribute__((vector_size(SC_VBYTES)));
};
template <class S>
using KeepMask = typename KeepMaskT<S>::v;
template <class S, int NV>
inline void tile_keep_mask(int skip, KeepMask<S>* keep) {
  constexpr int L = lanes<S>();
  for (int i = 0; i < NV; ++i)
    for (int l = 0; l < L; ++l) keep[i][l] = i * L + l < skip ? 0 : -1;
}

// Four sums reduced to a 4-lane vector r, written to dW entries [k, k+n): r plus the previous partial sums in
// dacc (unless `first`), kept in dacc in S, or with `last` written to dout as E (rounded once, for bf16). With E = S
// dout is dacc and `last` changes nothing.
template <class S, class E>
inline void sddmm_put(V4<S> r, int n, bool first, bool last, S* dacc, E* dout, int64_t k) {
  if (n == 4) {
    if (!first) {
      V4<S> d;
      __builtin_memcpy(&d, dacc + k, sizeof(d));
      r += d;
    }
    if (sc::is_bf16<E>() && last)
      for (int u = 0; u < 4; ++u) dout[k + u] = sc::from_compute<E>(r[u]);
    else
      __builtin_memcpy(dacc + k, &r, sizeof(r));
    return;
  }
  for (int u = 0; u < n; ++u) {
    const S v = first ? r[u] : dacc[k + u] + r[u];
    if (sc::is_bf16<E>() && last) dout[k + u] = sc::from_compute<E>(v);
    else dacc[k + u] = v;
  }
}

// dW[k] (+)= <dy, Xt[col[k]]> over one batch tile for the entries k in [k, e) of a row whose dY^T tile row is
// dy. Entries go four at a time so the horizontal sums share one reduce4; the tail is zero-padded.
template <class S, class E, class TE, int NV, class I>
inline void sddmm_segment(const DyRow<S, TE, NV>& dy, const TE* xt, int64_t ldt, const I* col, int64_t k,
                          int64_t e, bool first, bool last, S* dacc, E* dout) {
  for (; k + 3 < e; k += 4) {
    V<S> s[4];
    for (int u = 0; u < 4; ++u) s[u] = dy.dot(xt + sc::index_at(col, k + u) * ldt);
    sddmm_put<S, E>(reduce4<S>(s), 4, first, last, dacc, dout, k);
  }
  if (k == e) return;
  const int n = static_cast<int>(e - k);
  V<S> s[4] = {V<S>{}, V<S>{}, V<S>{}, V<S>{}};
  for (int u = 0; u < n; ++u) s[u] = dy.dot(xt + sc::index_at(col, k + u) * ldt);
  sddmm_put<S, E>(reduce4<S>(s), n, first, last, dacc, dout, k);
}

// dW at the live connections: dW[k] (+)= sum_b dY[b, j] X[b, col[k]] for k in row j (SDDMM); += with accumulate.
// Per batch tile of T rows, X and dY are transposed into feature-major buffers (Xt: n_cols x T, dYt: n_rows x T),
// either shared by the threads (each transposes a share, then a barrier) or, with private_tiles, one pair per
// thread (each transposes all of Xt and its own rows of dYt: no barrier). An operand that is feature-major
// already (x_fm, dy_fm: rows ldx, ldy apart) is read in place, but for its partial last tile, which is copied.
// Each thread then walks its rows once per column block: in pass q it only reads the entries whose column lies in
// block q, so the rows of Xt it gathers come from one block small enough for the core's L2 (blocks of
// `block_cols` columns) instead of the whole tile. Columns are sorted within a row, so the entries of block q are
// one segment of the row; `seg` holds the segment starts, (n_rows, n_blocks + 1).
//
// Types: dY and X are stored as E, the tile buffers (buf) as TE, the sums are in S. The partial sums of dW live in
// dacc (S, nnz); with `finish`, the last tile adds its share and writes dout (E, nnz) instead, rounded once for
// bf16 (for E = S the caller passes dout = dacc).
//
// skip: the first `skip` batch rows of the first tile were summed by the call before (a last tile shifted back to
// end at the batch's end, see shift_last_tile in kernels.cpp): their lanes of each dY^T tile row are zeroed as the
// row is loaded, once per row, so every load of the tiles stays a whole vector. Not for bf16 tiles (0 there).
template <class S, class E, class TE, int NV, class I>
void sddmm(const E* dY, int64_t ldy, bool dy_fm, const E* X, int64_t ldx, bool x_fm, bool in_place, int64_t B,
           int64_t n_rows, int64_t n_cols, const int32_t* rp, const I* col, S* dacc, E* dout,
           const int64_t* split, int nt, int64_t n_blocks, const int32_t* seg, TE* buf, bool accumulate, bool finish,
           bool private_tiles, int skip) {
  constexpr int L = lanes<S>();
  constexpr int T = NV * L;
  KeepMask<S> keep[NV];
  tile_keep_mask<S, NV>(skip, keep);
  TE* Xt[2] = {buf, buf + (n_cols + n_rows) * T};
  TE* Yt[2] = {Xt[0] + n_cols * T, Xt[1] + n_cols * T};
#pragma omp parallel num_threads(nt)
  {
    const int tid = sc::thread_id(), nth = sc::team_size();
    int n = 0;
    for (int64_t b0 = 0; b0 < B; b0 += T, ++n) {
      const int tb = static_cast<int>(B - b0 < T ? B - b0 : T);
      TileView<S, E, TE> xt, yt;
      if (private_tiles) {
        TE* xp = buf + static_cast<int64_t>(tid) * (n_cols + n_rows) * T;
        TE* yp = xp + n_cols * T;
        xt = tile_view<S>(X, ldx, x_fm, b0, tb, T, 0, n_cols, xp, in_place);
        yt = {yp, T};
        if (dy_fm && tb == T && in_place && std::is_same<E, TE>::value) {
          yt = tile_view<S>(dY, ldy, true, b0, tb, T, 0, n_rows, yp);
        } else {
          for (int p = tid; p < nt; p += nth)
            yt = tile_view<S>(dY, ldy, dy_fm, b0, tb, T, split[p], split[p + 1], yp, false);
        }
      } else {
        auto share = [&](const E* A, int64_t lda, bool fm, int64_t rows, TE* dst) {
          if (fm && tb == T && in_place && std::is_same<E, TE>::value)
            return tile_view<S>(A, lda, true, b0, tb, T, 0, rows, dst);
          const int64_t per = (rows + nth - 1) / nth;
          const int64_t i0 = tid * per < rows ? tid * per : rows;
          const int64_t i1 = i0 + per < rows ? i0 + per : rows;
          tile_view<S>(A, lda, fm, b0, tb, T, i0, i1, dst, false);
          return TileView<S, E, TE>{dst, T};
        };
        xt = share(X, ldx, x_fm, n_cols, Xt[n & 1]);
        yt = share(dY, ldy, dy_fm, n_rows, Yt[n & 1]);
#pragma omp barrier
      }
      const bool first = b0 == 0 && !accumulate, last = finish && b0 + T >= B;
      const bool masked = b0 == 0 && skip > 0;
      for (int p = tid; p < nt; p += nth) {
        for (int64_t q = 0; q < n_blocks; ++q) {
          for (int64_t j = split[p]; j < split[p + 1]; ++j) {
            const int32_t* sj = seg + j * (n_blocks + 1);
            if (sj[q] == sj[q + 1]) continue;
            DyRow<S, TE, NV> dy;
            dy.load(yt.p + j * yt.ld);
            if constexpr (!sc::is_bf16<TE>()) {
              if (masked) dy.keep_only(keep);
            }
            sddmm_segment<S, E, TE, NV, I>(dy, xt.p, xt.ld, col, sj[q], sj[q + 1], first, last, dacc, dout);
          }
        }
      }
    }
  }
}

}  // namespace SC_ISA
