"""Compact patterns: int16 col, row and perm (offsets inside rows) for CSR layers up to 32768 wide.

Every other test runs on compact patterns (all its layers are small); the ``index_form`` fixture runs the kernel
tests in the int32 form too. Here: which form a pattern gets, the boundary of the int16 range, bit-identical kernels
in both forms, what a layer holds (bytes per connection, buffers DDP can broadcast) and state dicts across forms.
"""
import io

import pytest
import torch

import sparsecore.pattern
from sparsecore import Pattern, SparseLinear
from sparsecore.ops import _sddmm_impl, _spmm_impl, _spmm_t_impl

from conftest import random_mask


def _int32_form(p: Pattern, monkeypatch) -> Pattern:
    """The same structure in the int32 form."""
    with monkeypatch.context() as m:
        m.setattr(sparsecore.pattern, "COMPACT_MAX_DIM", 0)
        q = Pattern.from_csr(p.rowptr, p.col, p.shape, p.block_size)
    assert not q.compact and q == p
    return q


def test_which_patterns_are_compact():
    assert Pattern.from_mask(torch.ones(3, 5, dtype=torch.bool)).compact
    edge = Pattern.from_indices(torch.tensor([0, 1]), torch.tensor([32767, 0]), (2, 32768))
    assert edge.compact and edge.col.dtype == edge.row.dtype == edge.perm.dtype == torch.int16
    wide = Pattern.from_indices(torch.tensor([0, 1]), torch.tensor([32768, 0]), (2, 32769))
    assert not wide.compact and wide.col.dtype == wide.row.dtype == wide.perm.dtype == torch.int32
    tall = Pattern.from_indices(torch.tensor([32768]), torch.tensor([1]), (32769, 2))
    assert not tall.compact
    bsr = Pattern.from_mask(torch.ones(4, 4, dtype=torch.bool), block_size=2)
    assert not bsr.compact and bsr.col.dtype == torch.int32
    for p in (edge, wide, tall, bsr):  # rowptr and colptr stay int32 (they count entries)
        assert p.rowptr.dtype == p.colptr.dtype == torch.int32


@pytest.mark.parametrize("threads", [1, 2], indirect=True)
def test_int16_range_edges_against_the_reference(threads):
    """Indices up to 32767 (column 32767, row 32767 and a row offset near the top of the range) read right:
    zero-extended, never sign-extended. A (32768, 2) and a (2, 32768) layer with a full row."""
    gen = torch.Generator().manual_seed(5)
    for shape, rows, cols in (((2, 32768), [0] * 32768 + [1], list(range(32768)) + [32767]),
                              ((32768, 2), [32767, 32767, 0, 16000], [0, 1, 1, 0])):
        p = Pattern.from_indices(torch.tensor(rows), torch.tensor(cols), shape)
        assert p.compact
        v = torch.randn(p.nnz, dtype=torch.float64, generator=gen)
        x = torch.randn(3, shape[1], dtype=torch.float64, generator=gen)
        dy = torch.randn(3, shape[0], dtype=torch.float64, generator=gen)
        w = p.to_dense(v)
        torch.testing.assert_close(_spmm_impl(x, v, None, p.rowptr, p.col, shape[0], 1), x @ w.T)
        torch.testing.assert_close(_spmm_t_impl(dy, v, p.rowptr, p.colptr, p.row, p.perm, shape[1], 1), dy @ w)
        torch.testing.assert_close(_sddmm_impl(dy, x, p.rowptr, p.col, 1), p.gather(dy.T @ x))


@pytest.mark.parametrize("threads", [1, 2], indirect=True)
@pytest.mark.parametrize("shape,density,batch", [((57, 203), 0.3, 70), ((540, 600), 0.9, 37), ((9, 4), 0.5, 1)])
def test_both_forms_give_the_same_bits(shape, density, batch, threads, monkeypatch):
    """The kernels read the two forms with the same arithmetic in the same order: y, dX and dW are bit-identical
    (the large layer's dX gathers its values in a pass of its own, the others during the first tile)."""
    gen = torch.Generator().manual_seed(7)
    mask = random_mask(*shape, density, gen, empty_rows=[1], empty_cols=[2])
    p = Pattern.from_mask(mask)
    q = _int32_form(p, monkeypatch)
    v = torch.randn(p.nnz, generator=gen)
    x, dy = torch.randn(batch, shape[1], generator=gen), torch.randn(batch, shape[0], generator=gen)
    for a, b in ((p, q), (q, p)):
        assert a.compact != b.compact
        assert torch.equal(_spmm_impl(x, v, None, a.rowptr, a.col, shape[0], 1),
                           _spmm_impl(x, v, None, b.rowptr, b.col, shape[0], 1))
        assert torch.equal(_spmm_t_impl(dy, v, a.rowptr, a.colptr, a.row, a.perm, shape[1], 1),
                           _spmm_t_impl(dy, v, b.rowptr, b.colptr, b.row, b.perm, shape[1], 1))
        assert torch.equal(_sddmm_impl(dy, x, a.rowptr, a.col, 1), _sddmm_impl(dy, x, b.rowptr, b.col, 1))
    assert torch.equal(p.csr_positions(), q.csr_positions()) and torch.equal(q.csr_positions(), q.perm.long())


def test_mixed_or_incomplete_index_forms_are_refused(gen):
    p = Pattern.from_mask(random_mask(6, 5, 0.5, gen))
    v, dy = torch.randn(p.nnz), torch.randn(3, 6)
    with pytest.raises(TypeError, match="all of one dtype"):
        _spmm_t_impl(dy, v, p.rowptr, p.colptr, p.row.int(), p.perm, 5, 1)
    with pytest.raises(TypeError, match="contiguous int32"):  # a compact perm needs W's int32 rowptr
        _spmm_t_impl(dy, v, p.rowptr.long(), p.colptr, p.row, p.perm, 5, 1)


def test_a_layer_holds_14_bytes_per_connection():
    """fp32 values and their gradient (8 bytes) and 6 bytes of entry indices per live connection, plus rowptr and
    colptr: 17.5% of a dense weight and its gradient at 10% density (25% in the int32 form)."""
    layer = SparseLinear(1000, 800, density=0.1, generator=torch.Generator().manual_seed(0))
    nnz = layer.nnz
    index_bytes = sum(t.numel() * t.element_size() for t in layer.pattern.tensors().values())
    assert index_bytes == 6 * nnz + 4 * (800 + 1 + 1000 + 1)
    held = sum(b.numel() * b.element_size() for b in layer.buffers())
    assert held == index_bytes  # the byte buffers are the same memory, not copies
    assert layer.pattern.col.data_ptr() == layer._buffers["col"].data_ptr()


def test_buffers_are_broadcastable_and_attributes_read_int16():
    """DDP broadcasts every buffer, and gloo and NCCL have no int16: the indices are held as uint8 bytes, while
    layer.col / .row / .perm and the pattern read them as int16. Assigning an int16 tensor keeps the byte form."""
    layer = SparseLinear(7, 5, density=0.5, generator=torch.Generator().manual_seed(0))
    assert {n: b.dtype for n, b in layer.named_buffers()} == {
        "rowptr": torch.int32, "col": torch.uint8, "colptr": torch.int32, "row": torch.uint8, "perm": torch.uint8}
    assert layer.col.dtype == torch.int16 and torch.equal(layer.col, layer.pattern.col)
    col = layer.col.clone()
    layer.col = col
    assert layer._buffers["col"].dtype == torch.uint8 and layer._buffers["col"].data_ptr() == col.data_ptr()
    x = torch.randn(4, 7)
    torch.testing.assert_close(layer(x), x @ layer.weight.T + layer.bias)


def test_state_dicts_hold_int16_and_load_across_forms(monkeypatch):
    gen = torch.Generator().manual_seed(3)
    layer = SparseLinear(40, 30, density=0.3, generator=gen)
    sd = layer.state_dict()
    assert sd["col"].dtype == sd["row"].dtype == sd["perm"].dtype == torch.int16 and sd["rowptr"].dtype == torch.int32
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    fresh = SparseLinear(40, 30, density=0.3, generator=torch.Generator().manual_seed(99))
    fresh.load_state_dict(torch.load(buf))
    x = torch.randn(5, 40)
    assert torch.equal(fresh(x), layer(x)) and fresh.pattern.compact

    # A checkpoint of the int32 form (an older sparsecore, or a layer wider than 32768): absolute perm, int32
    with monkeypatch.context() as m:
        m.setattr(sparsecore.pattern, "COMPACT_MAX_DIM", 0)
        old = SparseLinear(40, 30, density=0.3, generator=torch.Generator().manual_seed(4))
        old_sd = old.state_dict()
        assert old_sd["perm"].dtype == torch.int32 and not old.pattern.compact
        # ... and the other way: a compact checkpoint into a layer whose patterns are int32
        into_int32 = SparseLinear(40, 30, density=0.3, generator=torch.Generator().manual_seed(5))
        into_int32.load_state_dict(sd)
        assert not into_int32.pattern.compact and torch.equal(into_int32(x), layer(x))
    fresh.load_state_dict(old_sd)
    assert fresh.pattern.compact and torch.equal(fresh(x), old(x))
    # a stored transpose index that disagrees with rowptr/col is refused in either form
    bad = dict(old_sd, perm=old_sd["perm"].flip(0))
    with pytest.raises(RuntimeError, match="not the transpose index"):
        fresh.load_state_dict(bad)
    bad16 = dict(sd, perm=sd["perm"].flip(0))
    with pytest.raises(RuntimeError, match="not the transpose index"):
        fresh.load_state_dict(bad16)
    assert torch.equal(fresh(x), old(x))  # unchanged by the refused loads
