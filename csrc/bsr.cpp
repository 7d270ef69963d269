// Block-sparse (BSR) CPU kernels: forward, dX through the transpose index, dW per stored block.
// The math lives in bsr_impl.h, compiled per ISA like the CSR kernels (portable, AVX2+FMA, AVX-512); this file
// dispatches and binds.
#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <type_traits>
#include <utility>
#include <vector>

#include "bf16.h"
#include "common.h"
#include "dispatch.h"
#include "scratch.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>  // the bf16 conversions of kernels_impl.h (under each copy's target pragma)
#endif

#define SC_ISA generic
#define SC_VBYTES 16
#include "kernels_impl.h"
#include "bsr_impl.h"
#undef SC_ISA
#undef SC_VBYTES

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define SC_HAVE_AVX2 1
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#define SC_ISA avx2
#define SC_VBYTES 32
#include "kernels_impl.h"
#include "bsr_impl.h"
#undef SC_ISA
#undef SC_VBYTES
#pragma GCC pop_options
// AVX-512: 16 fp32 batch rows per vector and 32 registers, so 8 output rows share each loaded tile vector
// (bsr_impl.h, BSR_ROWS). Against the AVX2 copy on a 2-core Xeon (2 MiB L2 per core), 4096x4096, blocks of 32,
// batch 256, 10% density, 2 threads: forward 7.98 -> 5.58 ms, dX 8.67 -> 5.78, dW 7.69 -> 4.68 (docs/BENCHMARKS.md).
#pragma GCC push_options
#pragma GCC target("avx512f,avx512vl,avx512dq,avx512bw,avx2,fma")
#define SC_ISA avx512
#define SC_VBYTES 64
#include "kernels_impl.h"
#include "bsr_impl.h"
#undef SC_ISA
#undef SC_VBYTES
#pragma GCC pop_options
#endif

namespace sc {

std::vector<int64_t> balanced_split(const int32_t* rp, int64_t n, int nt);  // kernels.cpp
int64_t l2_bytes_per_core();                                                 // kernels.cpp

// The copy of the BSR kernels that runs: the widest the CPU supports under the cap (AVX512-BF16 runs the AVX-512
// copy: the BSR kernels have no BF16-instruction variant).
static int bsr_isa() {
  const int isa = kernel_isa();
  return isa >= ISA_AVX512 ? int(ISA_AVX512) : isa;
}

// Shared driver of the forward (perm == nullptr) and dX (perm given) BSR SpMM. A: the arrays' element type as
// Python hands them over (float, double, or int16 for bf16 words); the kernels store E and compute in S.
template <class A>
static void bsr_spmm_run(const Arr<A>& X, const Arr<int32_t>& rowptr, const Arr<int32_t>& idx, const int32_t* perm,
                         const Arr<A>& values, const typename storage_of<A>::type* bias, Arr<A>& Y, int nthreads,
                         const char* name) {
  typedef typename storage_of<A>::type E;
  typedef typename compute_of<E>::type S;
  require(values.ndim() == 3 && values.shape(1) == values.shape(2), std::string(name) + ": values must be (nnzb, bs, bs)");
  require(X.ndim() == 2 && Y.ndim() == 2, std::string(name) + ": activations must be 2-D");
  const int bs = static_cast<int>(values.shape(1));
  const int64_t B = X.shape(0), n_in = X.shape(1);
  const int64_t n_brows = numel(rowptr) - 1;
  require(bs > 0 && n_in % bs == 0, std::string(name) + ": input width must be a multiple of the block size");
  require(Y.shape(0) == B && Y.shape(1) == n_brows * bs, std::string(name) + ": output has the wrong shape");
  require(numel(idx) == values.shape(0), std::string(name) + ": index and values disagree on nnz");
  const int nt = threads_for_work(nthreads, values.shape(0) * int64_t(bs) * bs * B);
  const int isa = bsr_isa();
  const int L = isa_vector_bytes(isa) / int(sizeof(S));
  // Two vectors per tile row (AVX2: T = 16 fp32 rows, AVX-512: 32) while the tile fits half of one core's L2, as
  // for the CSR SpMMs (kernels.cpp); one otherwise (a batch within one vector, or a wide layer on a small L2).
  const bool two = B > L && n_in * 2 * L * int64_t(sizeof(S)) <= l2_bytes_per_core() / 2;
  const int NV = two ? 2 : 1;
  const int32_t* rp = rowptr.data();
  const int32_t* ix = idx.data();
  const E* xp = reinterpret_cast<const E*>(X.data());
  const E* vp = reinterpret_cast<const E*>(values.data());
  E* yp = reinterpret_cast<E*>(Y.mutable_data());
  py::gil_scoped_release nogil;
  if (is_bf16<E>()) g_bf16_ran[perm ? BF16_BSR_SPMM_T : BF16_BSR_SPMM] = bsr_isa();
  if (B == 0) return;
  const std::vector<int64_t> split = balanced_split(rp, n_brows, nt);
  S* buf = scratch<S>(0, std::max(2, nt) * n_in * NV * L);
  S* acc = scratch<S>(1, int64_t(nt) * bs * NV * L);
  // bf16 values are widened to fp32 once (scratch slot 2), not at every broadcast of every batch tile: a weight
  // feeds only NV FMAs per broadcast here, so a bf16 broadcast's two extra uops are not hidden. 4096x4096, blocks
  // of 32, batch 256, 2 threads, bf16 time / fp32 time at 10% and 1% density (medians of 15 paired calls, a 2-core
  // Xeon with AVX512-BF16): forward 1.12 and 1.11, dX 1.02 and 1.11 widening at each broadcast; 1.01 and 1.07,
  // 1.04 and 1.05 with this pass. (The tiles stay fp32 here: each tile vector feeds 4 rows' FMAs.)
  const S* vw = nullptr;
  if constexpr (is_bf16<E>()) {
    const int64_t n = numel(values);
    S* w = scratch<S>(2, n);
#pragma omp parallel for num_threads(nt) schedule(static)
    for (int64_t i = 0; i < n; ++i) w[i] = sc::to_compute<S>(vp[i]);
    vw = w;
  }
#define SC_BSR_CALL(NS, N)                                                                                 \
  do {                                                                                                     \
    if constexpr (is_bf16<E>())                                                                            \
      NS::bsr_spmm<S, E, S, N>(xp, B, n_in, rp, ix, perm, vw, bs, n_brows, bias, yp, split.data(), nt, buf, acc); \
    else                                                                                                   \
      NS::bsr_spmm<S, E, E, N>(xp, B, n_in, rp, ix, perm, vp, bs, n_brows, bias, yp, split.data(), nt, buf, acc); \
  } while (0)
#ifdef SC_HAVE_AVX2
  if (isa == ISA_AVX512) {
    if (NV == 1) SC_BSR_CALL(avx512, 1); else SC_BSR_CALL(avx512, 2);
  } else if (isa == ISA_AVX2) {
    if (NV == 1) SC_BSR_CALL(avx2, 1); else SC_BSR_CALL(avx2, 2);
  } else
#endif
  {
    if (NV == 1) SC_BSR_CALL(generic, 1); else SC_BSR_CALL(generic, 2);
  }
#undef SC_BSR_CALL
}

template <class A>
void bsr_spmm_py(const Arr<A>& X, const Arr<int32_t>& rowptr, const Arr<int32_t>& col, const Arr<A>& values,
                 py::object bias_obj, Arr<A>& Y, int nthreads) {
  typedef typename storage_of<A>::type E;
  Arr<A> bias_arr;
  const E* bias = nullptr;
  if (!bias_obj.is_none()) {
    // The dtype must match exactly: a cast from another dtype would reinterpret numbers as bf16 words.
    require(py::isinstance<py::array_t<A>>(bias_obj), "bsr_spmm: bias has the wrong dtype for this kernel");
    bias_arr = bias_obj.cast<Arr<A>>();
    require(Y.ndim() == 2 && numel(bias_arr) == Y.shape(1), "bsr_spmm: bias must have n_out elements");
    bias = reinterpret_cast<const E*>(bias_arr.data());
  }
  bsr_spmm_run<A>(X, rowptr, col, nullptr, values, bias, Y, nthreads, "bsr_spmm");
}

template <class A>
void bsr_spmm_t_py(const Arr<A>& dY, const Arr<int32_t>& colptr, const Arr<int32_t>& row, const Arr<int32_t>& perm,
                   const Arr<A>& values, Arr<A>& dX, int nthreads) {
  require(numel(perm) == numel(row), "bsr_spmm_t: perm and row must have the same length");
  bsr_spmm_run<A>(dY, colptr, row, perm.data(), values, nullptr, dX, nthreads, "bsr_spmm_t");
}

template <class A>
void bsr_sddmm_py(const Arr<A>& dY, const Arr<A>& X, const Arr<int32_t>& rowptr, const Arr<int32_t>& col,
                  Arr<A>& dval, int nthreads) {
  typedef typename storage_of<A>::type E;
  typedef typename compute_of<E>::type S;
  require(dval.ndim() == 3 && dval.shape(1) == dval.shape(2), "bsr_sddmm: out must be (nnzb, bs, bs)");
  const int bs = static_cast<int>(dval.shape(1));
  const int64_t B = X.shape(0), n_in = X.shape(1), n_out = dY.shape(1);
  require(dY.shape(0) == B && n_out == (numel(rowptr) - 1) * bs, "bsr_sddmm: dY has the wrong shape");
  require(numel(col) == dval.shape(0), "bsr_sddmm: out must have nnzb blocks");
  require(bs > 0 && n_in % bs == 0, "bsr_sddmm: input width must be a multiple of the block size");
  const int nt = threads_for_work(nthreads, numel(col) * int64_t(bs) * bs * B);
  const int32_t* rp = rowptr.data();
  const int32_t* ci = col.data();
  const E* yp = reinterpret_cast<const E*>(dY.data());
  const E* xp = reinterpret_cast<const E*>(X.data());
  E* dv = reinterpret_cast<E*>(dval.mutable_data());
  const int64_t n_brows = numel(rowptr) - 1;
  py::gil_scoped_release nogil;
  if (is_bf16<E>()) g_bf16_ran[BF16_BSR_SDDMM] = bsr_isa();
  const std::vector<int64_t> split = balanced_split(rp, n_brows, nt);
  if (B == 0) {
    std::fill(dv, dv + numel(dval), sc::from_compute<E>(S(0)));
    return;
  }
  if (numel(col) == 0) return;
  S* ybuf = scratch<S>(0, int64_t(nt) * B * bs);
  S* xpanels = scratch<S>(1, B * n_in);
  const int isa = bsr_isa();
#define SC_BSR_DW(NS)                                                                              \
  do {                                                                                             \
    NS::bsr_panels<S, E>(xp, B, n_in, bs, xpanels, nt);                                           \
    NS::bsr_sddmm<S, E>(yp, xpanels, B, n_out, rp, ci, bs, dv, split.data(), nt, ybuf);           \
  } while (0)
#ifdef SC_HAVE_AVX2
  if (isa == ISA_AVX512) SC_BSR_DW(avx512);
  else if (isa == ISA_AVX2) SC_BSR_DW(avx2);
  else
#endif
    SC_BSR_DW(generic);
#undef SC_BSR_DW
}

void bind_bsr(py::module_& m) {
#define SC_BIND(S)                                                                                              \
  m.def("bsr_spmm", &bsr_spmm_py<S>, py::arg("x").noconvert(), py::arg("rowptr").noconvert(),                   \
        py::arg("col").noconvert(), py::arg("values").noconvert(), py::arg("bias"), py::arg("out").noconvert(),  \
        py::arg("nthreads"));                                                                                   \
  m.def("bsr_spmm_t", &bsr_spmm_t_py<S>, py::arg("dy").noconvert(), py::arg("colptr").noconvert(),              \
        py::arg("row").noconvert(), py::arg("perm").noconvert(), py::arg("values").noconvert(),                  \
        py::arg("out").noconvert(), py::arg("nthreads"));                                                       \
  m.def("bsr_sddmm", &bsr_sddmm_py<S>, py::arg("dy").noconvert(), py::arg("x").noconvert(),                     \
        py::arg("rowptr").noconvert(), py::arg("col").noconvert(), py::arg("out").noconvert(), py::arg("nthreads"));
  SC_BIND(float)
  SC_BIND(double)
#undef SC_BIND
  // bf16 (int16 views of bf16 tensors; fp32 accumulation, each output rounded once to nearest even).
  m.def("bsr_spmm_bf16", &bsr_spmm_py<int16_t>, py::arg("x").noconvert(), py::arg("rowptr").noconvert(),
        py::arg("col").noconvert(), py::arg("values").noconvert(), py::arg("bias"), py::arg("out").noconvert(),
        py::arg("nthreads"));
  m.def("bsr_spmm_t_bf16", &bsr_spmm_t_py<int16_t>, py::arg("dy").noconvert(), py::arg("colptr").noconvert(),
        py::arg("row").noconvert(), py::arg("perm").noconvert(), py::arg("values").noconvert(),
        py::arg("out").noconvert(), py::arg("nthreads"));
  m.def("bsr_sddmm_bf16", &bsr_sddmm_py<int16_t>, py::arg("dy").noconvert(), py::arg("x").noconvert(),
        py::arg("rowptr").noconvert(), py::arg("col").noconvert(), py::arg("out").noconvert(), py::arg("nthreads"));
}

}  // namespace sc
