// Sparsity structure builders: COO -> CSR, the transpose (column-ordered) index, validation.
// Indices are int32 (DESIGN.md: int32 while nnz and dimensions fit; Python raises a clear error beyond).
#include <algorithm>
#include <numeric>
#include <sstream>
#include <vector>

#include "common.h"

namespace sc {

// rows, cols: int64 (nnz,) in any order. Returns (rowptr int32 (n_rows+1,), col int32 (nnz,), order int64 (nnz,))
// with col sorted inside each row and order[k] = the input position of CSR entry k. O(nnz log(max row)).
py::tuple build_csr(const Arr<int64_t>& rows, const Arr<int64_t>& cols, int64_t n_rows, int64_t n_cols) {
  const int64_t nnz = numel(rows);
  require(numel(cols) == nnz, "rows and cols must have the same length");
  require(n_rows >= 0 && n_cols >= 0, "shape must be non-negative");
  const int64_t* r = cptr(rows);
  const int64_t* c = cptr(cols);
  Arr<int32_t> rowptr(n_rows + 1);
  Arr<int32_t> col(nnz);
  Arr<int64_t> order(nnz);
  int32_t* rp = mptr(rowptr);
  int32_t* co = mptr(col);
  int64_t* ord = mptr(order);
  std::fill(rp, rp + n_rows + 1, 0);
  for (int64_t k = 0; k < nnz; ++k) {
    if (r[k] < 0 || r[k] >= n_rows || c[k] < 0 || c[k] >= n_cols) {
      std::ostringstream s;
      s << "index out of range: entry " << k << " is (" << r[k] << ", " << c[k] << ") for shape (" << n_rows
        << ", " << n_cols << ")";
      throw std::invalid_argument(s.str());
    }
    rp[r[k] + 1]++;
  }
  for (int64_t i = 0; i < n_rows; ++i) rp[i + 1] += rp[i];
  // Stable counting sort by row, then sort each row by column. rowptr itself serves as the per-row cursor (it
  // ends one row ahead and is shifted back), so nothing per row is allocated beyond rowptr: a tall layer of few
  // entries (2**30 rows, 4,096 entries) costs rowptr's 4 GiB, not three times that.
  for (int64_t k = 0; k < nnz; ++k) ord[rp[r[k]]++] = k;
  for (int64_t i = n_rows; i > 0; --i) rp[i] = rp[i - 1];
  rp[0] = 0;
  for (int64_t i = 0; i < n_rows; ++i) {
    int64_t* b = ord + rp[i];
    int64_t* e = ord + rp[i + 1];
    std::sort(b, e, [&](int64_t a, int64_t z) { return c[a] < c[z]; });
    for (int64_t* p = b; p < e; ++p) {
      co[p - ord] = static_cast<int32_t>(c[*p]);
      if (p > b && c[*p] == c[*(p - 1)]) {
        std::ostringstream s;
        s << "duplicate index (" << i << ", " << c[*p] << ")";
        throw std::invalid_argument(s.str());
      }
    }
  }
  return py::make_tuple(rowptr, col, order);
}

// Column-ordered index of a CSR structure by a stable counting sort, O(nnz + n_cols):
// colptr int32 (n_cols+1,), row (nnz,) ascending inside each column, and perm (nnz,) with perm[t] = the CSR
// position of transposed entry t, so W^T's values are values[perm]. row and perm are int32, or with `compact`
// int16 (sparsecore/pattern.py's compact patterns: both dimensions at most 32768) with perm[t] the offset of the
// entry inside its row, the CSR position being rowptr[row[t]] + perm[t].
template <class I>
static void transpose_into(const int32_t* rp, const int32_t* co, int64_t n_rows, int64_t n_cols, int32_t* cp, I* ro,
                           I* pe, bool offsets) {
  std::fill(cp, cp + n_cols + 1, 0);
  for (int64_t k = 0; k < rp[n_rows]; ++k) cp[co[k] + 1]++;
  for (int64_t j = 0; j < n_cols; ++j) cp[j + 1] += cp[j];
  // colptr is its own cursor (it ends one column ahead and is shifted back): nothing per column is allocated
  // beyond colptr, which matters for very wide layers of few entries.
  for (int64_t i = 0; i < n_rows; ++i) {
    for (int32_t k = rp[i]; k < rp[i + 1]; ++k) {
      const int32_t t = cp[co[k]]++;
      ro[t] = static_cast<I>(i);
      pe[t] = static_cast<I>(offsets ? k - rp[i] : k);
    }
  }
  for (int64_t j = n_cols; j > 0; --j) cp[j] = cp[j - 1];
  cp[0] = 0;
}

py::tuple transpose_index(const Arr<int32_t>& rowptr, const Arr<int32_t>& col, int64_t n_cols, bool compact) {
  const int64_t n_rows = numel(rowptr) - 1;
  require(n_rows >= 0, "rowptr must have at least one element");
  const int32_t* rp = cptr(rowptr);
  const int32_t* co = cptr(col);
  const int64_t nnz = numel(col);
  require(rp[n_rows] == nnz, "rowptr[-1] must equal len(col)");
  require(!compact || (n_rows <= COMPACT_MAX_DIM && n_cols <= COMPACT_MAX_DIM),
          "a compact (int16) transpose index needs both dimensions at most 32768");
  Arr<int32_t> colptr(n_cols + 1);
  int32_t* cp = mptr(colptr);
  if (compact) {
    Arr<int16_t> row(nnz), perm(nnz);
    int16_t *ro = mptr(row), *pe = mptr(perm);
    {
      py::gil_scoped_release nogil;
      transpose_into(rp, co, n_rows, n_cols, cp, ro, pe, true);
    }
    return py::make_tuple(colptr, row, perm);
  }
  Arr<int32_t> row(nnz), perm(nnz);
  int32_t *ro = mptr(row), *pe = mptr(perm);
  {
    py::gil_scoped_release nogil;
    transpose_into(rp, co, n_rows, n_cols, cp, ro, pe, false);
  }
  return py::make_tuple(colptr, row, perm);
}

// Full validation of a CSR structure; raises ValueError naming the first problem found.
void check_csr(const Arr<int32_t>& rowptr, const Arr<int32_t>& col, int64_t n_rows, int64_t n_cols) {
  require(numel(rowptr) == n_rows + 1, "rowptr must have n_rows + 1 = " + std::to_string(n_rows + 1) +
                                           " elements, got " + std::to_string(numel(rowptr)));
  const int32_t* rp = cptr(rowptr);
  const int32_t* co = cptr(col);
  const int64_t nnz = numel(col);
  require(rp[0] == 0, "rowptr[0] must be 0");
  require(rp[n_rows] == nnz, "rowptr[-1] = " + std::to_string(rp[n_rows]) + " must equal nnz = " +
                                 std::to_string(nnz));
  for (int64_t i = 0; i < n_rows; ++i) {
    require(rp[i] <= rp[i + 1], "rowptr must be non-decreasing (row " + std::to_string(i) + ")");
    for (int32_t k = rp[i]; k < rp[i + 1]; ++k) {
      if (co[k] < 0 || co[k] >= n_cols) {
        throw std::invalid_argument("column index out of range: " + std::to_string(co[k]) + " in row " +
                                    std::to_string(i) + " (n_cols = " + std::to_string(n_cols) + ")");
      }
      if (k > rp[i] && co[k] <= co[k - 1]) {
        throw std::invalid_argument(std::string(co[k] == co[k - 1] ? "duplicate" : "unsorted") +
                                    " column indices in row " + std::to_string(i) + " (" +
                                    std::to_string(co[k - 1]) + " then " + std::to_string(co[k]) + ")");
      }
    }
  }
}

}  // namespace sc
