"""CSR index tensors from a bool mask in plain torch, on any device, without sparsecore._C: the kernel-level
checks of tests/test_cuda.py and tests/aot_sm90.py build their patterns with it, so they run even where the C++
extension failed to build (and they cross-check sparsecore.Pattern's construction)."""
import torch


def csr_index(mask: torch.Tensor):
    """(rowptr, col, colptr, row, perm), int32, of a bool (rows, cols) mask, in the layout of
    :class:`sparsecore.Pattern`: CSR in row-major order, and its transpose index with ``perm`` the CSR position
    of each column-ordered entry."""
    r, c = mask.nonzero(as_tuple=True)  # row-major order: the CSR order
    n_r, n_c = mask.shape
    rowptr = torch.zeros(n_r + 1, dtype=torch.int64, device=mask.device)
    rowptr[1:] = torch.bincount(r, minlength=n_r).cumsum(0)
    perm = torch.argsort(c * n_r + r)  # column-major order of the CSR entries
    colptr = torch.zeros(n_c + 1, dtype=torch.int64, device=mask.device)
    colptr[1:] = torch.bincount(c, minlength=n_c).cumsum(0)
    i32 = torch.int32
    return rowptr.to(i32), c.to(i32), colptr.to(i32), r[perm].to(i32), perm.to(i32)
