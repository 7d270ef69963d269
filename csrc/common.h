// Shared helpers for the sparsecore C++ kernels: array views, checks, thread control.
// The extension never includes torch headers: it works on raw, C-contiguous buffers handed over as numpy
// views of CPU tensors (zero copy). Python (sparsecore/ops.py) guarantees dtype and contiguity; the checks
// here are the last line of defence and raise ValueError (std::invalid_argument) rather than crash.
#pragma once

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace py = pybind11;

namespace sc {

template <class T>
using Arr = py::array_t<T, py::array::c_style>;

inline void require(bool ok, const std::string& msg) {
  if (!ok) throw std::invalid_argument(msg);
}

template <class T>
inline const T* cptr(const Arr<T>& a) { return a.data(); }
template <class T>
inline T* mptr(Arr<T>& a) { return a.mutable_data(); }

inline int64_t numel(const py::array& a) { return static_cast<int64_t>(a.size()); }

// This thread's number and the team size inside an OpenMP parallel region (0 and 1 without OpenMP).
inline int thread_id() {
#ifdef _OPENMP
  return omp_get_thread_num();
#else
  return 0;
#endif
}
inline int team_size() {
#ifdef _OPENMP
  return omp_get_num_threads();
#else
  return 1;
#endif
}

// Number of threads for one kernel call: the caller passes torch.get_num_threads().
inline int clamp_threads(int n) { return n < 1 ? 1 : n; }

// The least work (multiply-adds: stored weights x batch rows) that a second thread must get: below it, starting
// and joining a parallel region and its barriers cost more than the thread saves, so a kernel never gets slower
// with more threads. Settable for tuning (_C._set_min_work_per_thread); see kernels.cpp for the measurement.
inline int64_t& min_work_per_thread() {
  static int64_t w = 400000;
  return w;
}

// Threads for a kernel call of `work` multiply-adds: at most n, and each with at least min_work_per_thread().
inline int threads_for_work(int n, int64_t work) {
  const int64_t most = work / (min_work_per_thread() > 0 ? min_work_per_thread() : 1);
  const int nt = clamp_threads(n);
  return most < nt ? (most < 1 ? 1 : int(most)) : nt;
}

// What the SpMMs apply to each finished output before storing it (sparsecore.SparseSequential fuses a layer's ReLU
// into its forward, and the ReLU before a layer into that layer's dX): `relu`, y < 0 -> 0 with NaN and -0.0 kept,
// as torch.relu; `mask`, y -> 0 where mask <= 0 (a NaN mask keeps y), as aten::threshold_backward(y, mask, 0).
// mask is stored as E in Y's layout, feature-major only (rows ldy apart, offset to the call's first batch row).
// Rounding a bf16 output after either gives what rounding before it gives.
template <class E>
struct Epilogue {
  bool relu;
  const E* mask;
};

// The largest dimension (in entries: block rows or columns) of a compact pattern, whose indices are int16.
constexpr int64_t COMPACT_MAX_DIM = 32768;

// Pattern indices (col, row, perm) come as int32_t, or as int16_t in a compact pattern (sparsecore/pattern.py: both
// dimensions at most 32768): entries there are below 32768, so non-negative, and read zero-extended.
inline int64_t index_at(const int32_t* a, int64_t k) { return a[k]; }
inline int64_t index_at(const int16_t* a, int64_t k) { return static_cast<uint16_t>(a[k]); }

// The CSR position of transposed entry t, whose W row is row[t]: perm[t] itself (int32 indices), or in a compact
// pattern the offset perm[t] inside that row, added to W's rowptr prp.
inline int64_t csr_position(const int32_t*, const int32_t* perm, const int32_t*, int64_t t) { return perm[t]; }
inline int64_t csr_position(const int16_t* row, const int16_t* perm, const int32_t* prp, int64_t t) {
  return int64_t(prp[index_at(row, t)]) + index_at(perm, t);
}

}  // namespace sc
