"""The Pattern type: constructors, transpose index, conversions and validation."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sparsecore.pattern import Pattern


@st.composite
def coords(draw, max_dim=12):
    n_r = draw(st.integers(1, max_dim))
    n_c = draw(st.integers(1, max_dim))
    cells = draw(st.sets(st.tuples(st.integers(0, n_r - 1), st.integers(0, n_c - 1)), max_size=n_r * n_c))
    cells = list(cells)
    draw(st.randoms()).shuffle(cells)
    return n_r, n_c, cells


@settings(max_examples=60, deadline=None)
@given(coords())
def test_from_indices_matches_mask_and_transpose_index(args):
    n_r, n_c, cells = args
    rows = torch.tensor([r for r, _ in cells], dtype=torch.int64)
    cols = torch.tensor([c for _, c in cells], dtype=torch.int64)
    p, order = Pattern.from_indices(rows, cols, (n_r, n_c), return_order=True)
    expect = torch.zeros(n_r, n_c, dtype=torch.bool)
    expect[rows, cols] = True
    assert torch.equal(p.mask(), expect)
    assert p.nnz == len(cells)
    # order maps CSR entries back to the input coordinates
    r, c = p.coo()
    assert torch.equal(rows[order], r) and torch.equal(cols[order], c)
    # transpose index: column-major order of the same entries, perm pointing at CSR positions (offsets inside the
    # rows in a compact pattern, which these small ones are)
    assert p.colptr.numel() == n_c + 1 and int(p.colptr[-1]) == p.nnz
    assert p.compact and p.col.dtype == p.row.dtype == p.perm.dtype == torch.int16
    perm = p.csr_positions()
    assert torch.equal(p.perm.long(), perm - p.rowptr.long()[p.row.long()])
    assert torch.equal(p.row.long(), r[perm]) and torch.equal(torch.sort(c).values, c[perm])
    for j in range(n_c):
        seg = p.row[p.colptr[j]:p.colptr[j + 1]]
        assert torch.all(seg[1:] > seg[:-1])
        assert torch.all(c[perm[p.colptr[j]:p.colptr[j + 1]]] == j)


@settings(max_examples=30, deadline=None)
@given(coords())
def test_dense_round_trip(args):
    n_r, n_c, cells = args
    w = torch.zeros(n_r, n_c, dtype=torch.float64)
    for r, c in cells:
        w[r, c] = (r + 1) * 10 + c + 1
    p = Pattern.from_dense(w)
    assert torch.equal(p.to_dense(p.gather(w)), w)
    assert p == Pattern.from_mask(w != 0)


def test_bsr_round_trip(gen):
    bm = torch.rand(3, 5, generator=gen) < 0.5
    bm[1] = False
    mask = bm.repeat_interleave(4, 0).repeat_interleave(4, 1)
    p = Pattern.from_mask(mask, block_size=4)
    assert p.values_shape == (int(bm.sum()), 4, 4) and p.shape == (12, 20)
    assert torch.equal(p.mask(), mask) and torch.equal(p.block_mask(), bm)
    w = torch.randn(12, 20, generator=gen) * mask
    v = p.gather(w)
    assert torch.equal(p.to_dense(v), w)
    r, c = p.coo()
    k = 0
    assert torch.equal(v[k], w[r[k] * 4:(r[k] + 1) * 4, c[k] * 4:(c[k] + 1) * 4])


def test_empty_and_full():
    p = Pattern.from_mask(torch.zeros(3, 4, dtype=torch.bool))
    assert p.nnz == 0 and p.density == 0 and torch.equal(p.rowptr, torch.zeros(4, dtype=torch.int32))
    q = Pattern.from_mask(torch.ones(3, 4, dtype=torch.bool))
    assert q.nnz == 12 and q.density == 1.0


def test_from_csr_validates():
    ok = Pattern.from_csr([0, 2, 3], [0, 3, 1], (2, 4))
    assert ok.nnz == 3
    with pytest.raises(ValueError, match="unsorted"):
        Pattern.from_csr([0, 2, 3], [3, 0, 1], (2, 4))
    with pytest.raises(ValueError, match="duplicate"):
        Pattern.from_csr([0, 2, 3], [1, 1, 1], (2, 4))
    with pytest.raises(ValueError, match="out of range"):
        Pattern.from_csr([0, 2, 3], [0, 4, 1], (2, 4))
    with pytest.raises(ValueError, match="rowptr"):
        Pattern.from_csr([0, 2], [0, 1], (2, 4))
    with pytest.raises(ValueError, match="non-decreasing"):
        Pattern.from_csr([0, 2, 1, 3], [0, 1, 2], (3, 4))
    with pytest.raises(ValueError, match="nnz"):
        Pattern.from_csr([0, 1, 4], [0, 1, 2], (2, 4))
    with pytest.raises(TypeError, match="integer"):
        Pattern.from_csr([0.0, 1.0, 1.0], [0], (2, 4))


def test_from_indices_errors():
    with pytest.raises(ValueError, match="duplicate index \\(1, 2\\)"):
        Pattern.from_indices([1, 0, 1], [2, 0, 2], (3, 3))
    with pytest.raises(ValueError, match="out of range"):
        Pattern.from_indices([0, 3], [0, 0], (3, 3))
    with pytest.raises(ValueError, match="out of range"):
        Pattern.from_indices([0, -1], [0, 0], (3, 3))
    with pytest.raises(ValueError, match="same length"):
        Pattern.from_indices([0, 1], [0], (3, 3))
    with pytest.raises(TypeError, match="integer"):
        Pattern.from_indices(torch.tensor([0.5]), torch.tensor([0]), (3, 3))
    with pytest.raises(ValueError, match="1-D"):
        Pattern.from_indices(torch.zeros(2, 2, dtype=torch.long), torch.zeros(4, dtype=torch.long), (3, 3))
    with pytest.raises(ValueError, match="int32"):
        Pattern.from_indices([0], [0], (2**31, 3))
    with pytest.raises(ValueError, match="non-negative"):
        Pattern.from_indices([], [], (-1, 3))
    with pytest.raises(ValueError, match="divide"):
        Pattern.from_indices([0], [0], (6, 9), block_size=2)


def test_from_mask_errors():
    with pytest.raises(TypeError, match="bool"):
        Pattern.from_mask(torch.ones(2, 2))
    with pytest.raises(ValueError, match="2-D"):
        Pattern.from_mask(torch.ones(2, dtype=torch.bool))
    with pytest.raises(TypeError, match="torch.Tensor"):
        Pattern.from_mask([[True]])


def test_nan_counts_as_nonzero():
    w = torch.tensor([[0.0, float("nan")], [1.0, 0.0]])
    assert Pattern.from_dense(w).nnz == 2
