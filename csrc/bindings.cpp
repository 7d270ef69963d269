// The sparsecore._C module: structure builders and CPU kernels. Every entry releases the GIL while it works.
#include "common.h"

namespace sc {
py::tuple build_csr(const Arr<int64_t>&, const Arr<int64_t>&, int64_t, int64_t);
py::tuple transpose_index(const Arr<int32_t>&, const Arr<int32_t>&, int64_t, bool);
void check_csr(const Arr<int32_t>&, const Arr<int32_t>&, int64_t, int64_t);
void bind_kernels(py::module_& m);
void bind_bsr(py::module_& m);
void bind_dst(py::module_& m);
}  // namespace sc

PYBIND11_MODULE(_C, m) {
  m.doc() = "sparsecore C++ CPU kernels (CSR/BSR SpMM, SDDMM, structure builders)";
  m.def("build_csr", &sc::build_csr, py::arg("rows").noconvert(), py::arg("cols").noconvert(), py::arg("n_rows"),
        py::arg("n_cols"));
  m.def("transpose_index", &sc::transpose_index, py::arg("rowptr").noconvert(), py::arg("col").noconvert(),
        py::arg("n_cols"), py::arg("compact") = false);
  m.def("check_csr", &sc::check_csr, py::arg("rowptr").noconvert(), py::arg("col").noconvert(), py::arg("n_rows"),
        py::arg("n_cols"));
  sc::bind_kernels(m);
  sc::bind_bsr(m);
  sc::bind_dst(m);
#ifdef _OPENMP
  m.attr("has_openmp") = true;
#else
  m.attr("has_openmp") = false;
#endif
}
