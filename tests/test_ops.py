"""The sparse linear op on the C++ CPU kernels against a float64 dense reference."""
import contextlib

import pytest
import torch

from sparsecore import _C, sparse_linear
from sparsecore.ops import sddmm, spmm, spmm_t
from sparsecore.pattern import Pattern

from conftest import check_step_vs_reference, random_mask, reference, tol

# (out, in, batch): 1xN, Nx1, odd sizes, batch 1, batches that are not a multiple of any tile width (8/16/64)
SHAPES = [(1, 1, 1), (1, 9, 3), (9, 1, 4), (13, 17, 5), (37, 29, 1), (33, 65, 70), (64, 40, 131), (20, 300, 17)]


def check_mask(mask, batch, dtype, gen):
    """check_step_vs_reference with random weights at the True entries of `mask`."""
    w = torch.randn(*mask.shape, generator=gen, dtype=dtype) * mask
    check_step_vs_reference(Pattern.from_mask(mask), w, batch, gen)


@contextlib.contextmanager
def tuned(set_hook, value):
    """Run the block with a kernel tuning hook of sparsecore._C set to value, then back to automatic (0)."""
    set_hook(value)
    try:
        yield
    finally:
        set_hook(0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("threads", [1, 2])
def test_forward_backward_vs_dense(shape, dtype, threads, gen, index_form):
    out_f, in_f, batch = shape
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        mask = random_mask(out_f, in_f, 0.35, gen, empty_rows=[0] if out_f > 2 else (),
                           empty_cols=[in_f - 1] if in_f > 2 else ())
        if mask.sum() == 0:
            mask[out_f // 2, in_f // 2] = True
        check_mask(mask, batch, dtype, gen)
    finally:
        torch.set_num_threads(old)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("block_bytes", [256, 4096, 0])
def test_sddmm_column_blocks(block_bytes, dtype, gen):
    """The SDDMM walks each row once per column block (blocks of block_bytes of the transposed X tile, 0 = the
    default, half of one core's L2, but no more blocks than give segments of 32 entries on average). Small blocks give empty
    and 1-3 entry segments; batch 70 gives a 64-row tile and a 6-row tail tile."""
    mask = random_mask(23, 1201, 0.5, gen, empty_rows=[5], empty_cols=[0, 1, 2])
    mask[7] = False
    mask[7, 150] = True  # a row with a single entry
    mask[9, 200:] = False  # a row with entries in the first blocks only
    with tuned(_C._set_sddmm_block_bytes, block_bytes):
        check_mask(mask, 70, dtype, gen)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("nv", [1, 2, 3, 4, 5, 8])
def test_every_tile_width(isa, nv, dtype, gen, index_form):
    """The kernels pick the batch tile (nv SIMD vectors per row) from the batch; the tuning hook forces each
    width, so every unrolling of the SpMM and SDDMM loops is checked (batch 70: full tiles and a tail), in every
    compiled copy of the kernels the CPU supports."""
    mask = random_mask(29, 41, 0.3, gen, empty_rows=[2], empty_cols=[5])
    with tuned(_C._set_tile_vectors, nv):
        check_mask(mask, 70, dtype, gen)


def test_tile_width_hook_takes_only_compiled_widths():
    for nv in (6, 7, 16, -1):
        with pytest.raises(ValueError, match="nv must be 0"):
            _C._set_tile_vectors(nv)
    _C._set_tile_vectors(0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("batch", [100, 130, 71, 68, 40, 20, 7])
@pytest.mark.parametrize("merge_tail", [True, False])
def test_batch_in_chunks_of_narrower_tiles(batch, merge_tail, dtype, gen):
    """A batch that is not a multiple of the widest tile runs as chunks of narrower tiles, and a remainder of
    fewer than a vector's lanes joins the tile before it, one vector wider (AVX2 fp32 SDDMM: 100 = 64 + 36 rows in
    tiles of 8 and 5 vectors, 68 = 32 + 36, 130 = 64 + 32 + 34; SpMMs: 100 = 80 + 20, a last tile of 3 vectors;
    without the merge 100 = 64 + 32 + 4 and 96 + 4): later SDDMM chunks add to dW, later dX chunks read the values
    the first one gathered. Two threads, so that whole-tile and by-row chunks both occur."""
    mask = random_mask(45, 38, 0.3, gen, empty_rows=[4], empty_cols=[0, 37])
    old = torch.get_num_threads()
    torch.set_num_threads(2)
    _C._set_merge_tail(merge_tail)
    try:
        check_mask(mask, batch, dtype, gen)
    finally:
        _C._set_merge_tail(True)  # the default
        torch.set_num_threads(old)


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("nnz_kind", ["gather_in_first_tile", "gather_pass"])
def test_spmm_work_splits_agree(threads, nnz_kind, gen, index_form):
    """The SpMMs share work by rows of each batch tile or by whole tiles (the hook forces either; automatic takes
    tiles from two per thread up). Both sum each output in the same order, so y and dX must be bit-identical,
    and right against the reference; batch 70 = four full 16-row tiles and a 6-row tail. With 290K entries the
    transposed values are gathered in their own pass, with fewer during the first tile (split by rows)."""
    if nnz_kind == "gather_pass":
        mask = random_mask(540, 600, 0.9, gen, empty_rows=[1], empty_cols=[3])
    else:
        mask = random_mask(57, 203, 0.3, gen, empty_rows=[1], empty_cols=[3])
    w = torch.randn(*mask.shape, generator=gen) * mask
    p = Pattern.from_mask(mask)
    x = torch.randn(70, mask.shape[1], generator=gen)
    dy = torch.randn(70, mask.shape[0], generator=gen)
    values = p.gather(w)
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        outs = []
        for mode in (1, 2):
            with tuned(_C._set_spmm_split, mode):
                check_step_vs_reference(p, w, 70, gen)
                outs.append((spmm(x, values, None, p.rowptr, p.col, p.colptr, p.row, p.perm, p.shape[0], 1),
                             spmm_t(dy, values, p.rowptr, p.col, p.colptr, p.row, p.perm, p.shape[1], 1)))
    finally:
        torch.set_num_threads(old)
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("block_bytes", [2048, 0])
def test_sddmm_tile_buffers_agree(threads, block_bytes, gen, index_form):
    """The SDDMM's transposed tiles are shared by the threads or one per thread (each transposing all of X and
    its own rows of dY); the hook forces either. Same sums in the same order: dW must be bit-identical, and right
    against the reference. Batch 70 = a 64-row and a 6-row chunk; small column blocks give short segments."""
    mask = random_mask(61, 150, 0.4, gen, empty_rows=[0, 30], empty_cols=[7])
    w = torch.randn(*mask.shape, generator=gen) * mask
    p = Pattern.from_mask(mask)
    x = torch.randn(70, mask.shape[1], generator=gen)
    dy = torch.randn(70, mask.shape[0], generator=gen)
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        dws = []
        with tuned(_C._set_sddmm_block_bytes, block_bytes):
            for mode in (1, 2):
                with tuned(_C._set_sddmm_tiles, mode):
                    check_step_vs_reference(p, w, 70, gen)
                    dws.append(sddmm(dy, x, p.rowptr, p.col, p.colptr, p.row, p.perm, 1))
    finally:
        torch.set_num_threads(old)
    assert torch.equal(dws[0], dws[1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_transposed_values_gathered_in_a_separate_pass(dtype, gen, index_form):
    """dX reads values[perm]: above 1 MiB of values they are gathered before the kernel, below it during the
    kernel's first tile (every other test). 290K entries take the separate pass in both dtypes."""
    mask = random_mask(540, 600, 0.9, gen, empty_cols=[3])
    assert mask.sum() * 4 > 2**20
    check_mask(mask, 3, dtype, gen)


@pytest.mark.parametrize("kind", ["single", "empty", "full_row", "full_col"])
def test_structural_edge_cases(kind, gen, index_form):
    out_f, in_f, batch = 11, 7, 6
    mask = torch.zeros(out_f, in_f, dtype=torch.bool)
    if kind == "single":
        mask[4, 2] = True
    elif kind == "full_row":
        mask[3] = True
    elif kind == "full_col":
        mask[:, 5] = True
    p = Pattern.from_mask(mask)
    w = torch.randn(out_f, in_f, generator=gen, dtype=torch.float64) * mask
    values = p.gather(w).requires_grad_()
    x = torch.randn(batch, in_f, generator=gen, dtype=torch.float64, requires_grad=True)
    dy = torch.randn(batch, out_f, generator=gen, dtype=torch.float64)
    y = sparse_linear(x, values, p)
    y.backward(dy)
    y_ref, dx_ref, dw_ref, _ = reference(x, w, None, dy)
    torch.testing.assert_close(y, y_ref.detach())
    torch.testing.assert_close(x.grad, dx_ref)
    torch.testing.assert_close(values.grad, p.gather(dw_ref))


def test_non_contiguous_and_3d_inputs(gen):
    mask = random_mask(10, 12, 0.4, gen)
    p = Pattern.from_mask(mask)
    w = torch.randn(10, 12, generator=gen, dtype=torch.float64) * mask
    values = p.gather(w)
    base = torch.randn(12, 2, 9, generator=gen, dtype=torch.float64)
    x = base.permute(1, 2, 0)  # (2, 9, 12), not contiguous
    assert not x.is_contiguous()
    torch.testing.assert_close(sparse_linear(x, values, p), x @ w.T)
    xs = torch.randn(9, 24, generator=gen, dtype=torch.float64)[:, ::2]  # strided last dim
    torch.testing.assert_close(sparse_linear(xs, values, p), xs @ w.T)
    wide = torch.randn(2 * p.nnz, dtype=torch.float64, generator=gen)[::2]  # non-contiguous values
    torch.testing.assert_close(sparse_linear(xs, wide, p), xs @ p.to_dense(wide).T)


def test_zero_batch(gen):
    p = Pattern.from_mask(random_mask(5, 4, 0.5, gen))
    values = torch.randn(p.nnz, dtype=torch.float64, requires_grad=True)
    x = torch.zeros(0, 4, dtype=torch.float64, requires_grad=True)
    y = sparse_linear(x, values, p)
    assert y.shape == (0, 5)
    y.sum().backward()
    assert torch.equal(values.grad, torch.zeros_like(values))


def test_inference_skips_autograd_with_the_same_result(gen):
    """Without grad mode, or with nothing that requires grad, sparse_linear calls the kernel directly: the output
    must be bit-identical to the training path's and carry no graph."""
    mask = random_mask(9, 14, 0.4, gen, empty_rows=[3])
    p = Pattern.from_mask(mask)
    values = torch.randn(p.nnz, generator=gen, requires_grad=True)
    bias = torch.randn(9, generator=gen, requires_grad=True)
    x = torch.randn(2, 5, 14, generator=gen)
    trained = sparse_linear(x, values, p, bias)
    assert trained.grad_fn is not None
    with torch.no_grad():
        y_no_grad = sparse_linear(x, values, p, bias)
    with torch.inference_mode():
        y_inference = sparse_linear(x, values, p, bias)
    y_frozen = sparse_linear(x, values.detach(), p, bias.detach())
    for y in (y_no_grad, y_inference, y_frozen):
        assert y.grad_fn is None and not y.requires_grad and y.shape == (2, 5, 9)
        assert torch.equal(y, trained.detach())
    torch.testing.assert_close(y_frozen.double(), x.double() @ p.to_dense(values.detach()).double().T
                               + bias.detach().double(), **tol(torch.float32))


def test_gradcheck(gen, index_form):
    mask = random_mask(6, 5, 0.5, gen, empty_rows=[1], empty_cols=[2])
    p = Pattern.from_mask(mask)
    values = torch.randn(p.nnz, dtype=torch.float64, generator=gen, requires_grad=True)
    bias = torch.randn(6, dtype=torch.float64, generator=gen, requires_grad=True)
    x = torch.randn(3, 5, dtype=torch.float64, generator=gen, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, v, b: sparse_linear(x, v, p, b), (x, values, bias))


def test_opcheck(gen):
    """torch.library's own consistency checks: schema, fake tensor, autograd registration."""
    p = Pattern.from_mask(random_mask(6, 5, 0.5, gen))
    v = torch.randn(p.nnz, dtype=torch.float64, requires_grad=True)
    x = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    args = (x, v, None, p.rowptr, p.col, p.colptr, p.row, p.perm, 6, 1)
    torch.library.opcheck(spmm, args)
    dy = torch.randn(3, 6, dtype=torch.float64)
    torch.library.opcheck(spmm_t, (dy, v.detach(), p.rowptr, p.col, p.colptr, p.row, p.perm, 5, 1))
    torch.library.opcheck(sddmm, (dy, x.detach(), p.rowptr, p.col, p.colptr, p.row, p.perm, 1))


def test_torch_compile(gen):
    p = Pattern.from_mask(random_mask(8, 6, 0.5, gen))
    v = torch.randn(p.nnz, requires_grad=True)
    x = torch.randn(4, 6)
    f = torch.compile(lambda x, v: sparse_linear(x, v, p).relu().sum(), fullgraph=True)
    loss = f(x, v)
    loss.backward()
    ref_v = v.detach().clone().requires_grad_()
    (x @ p.to_dense(ref_v).T).relu().sum().backward()
    torch.testing.assert_close(v.grad, ref_v.grad)


def test_bad_inputs(gen):
    p = Pattern.from_mask(random_mask(5, 4, 0.5, gen))
    v = torch.randn(p.nnz)
    with pytest.raises(ValueError, match="in_features = 4"):
        sparse_linear(torch.randn(2, 3), v, p)
    with pytest.raises(TypeError, match="one dtype, got input torch.float64, weights torch.float32"):
        sparse_linear(torch.randn(2, 4, dtype=torch.float64), v, p)
    with pytest.raises(TypeError, match="bias torch.float64"):
        sparse_linear(torch.randn(2, 4), v, p, torch.randn(5, dtype=torch.float64))
    with pytest.raises(ValueError, match="values must have shape"):
        sparse_linear(torch.randn(2, 4), torch.randn(p.nnz + 1), p)
    with pytest.raises(ValueError, match="bias"):
        sparse_linear(torch.randn(2, 4), v, p, torch.randn(4))
    with pytest.raises(TypeError, match="float16: on the CPU use bfloat16"):
        sparse_linear(torch.randn(2, 4).half(), v.half(), p)
    with pytest.raises(TypeError, match="float32, float64 and bfloat16, got torch.int64"):
        sparse_linear(torch.ones(2, 4, dtype=torch.int64), v.long(), p)
    with pytest.raises(TypeError):
        sparse_linear([[1.0] * 4], v, p)
    with pytest.raises(ValueError, match="meta"):
        sparse_linear(torch.randn(2, 4, device="meta"), v, p)


def test_kernels_by_address_check_what_they_can(gen):
    """The C++ CSR kernels are called by address: the Python side checks layouts, dtypes and index lengths, the
    C++ side sizes, dtype codes and that rowptr runs from 0 to nnz; a mismatch raises, it never reads astray."""
    from sparsecore.ops import _sddmm_impl, _spmm_impl, _spmm_t_impl

    p = Pattern.from_mask(random_mask(6, 5, 0.5, gen))
    v, x, dy = torch.randn(p.nnz), torch.randn(3, 5), torch.randn(3, 6)
    strided = torch.randn(3, 10)[:, ::2]  # neither row-major nor feature-major
    with pytest.raises(ValueError, match="row-major .* or feature-major"):
        _spmm_impl(strided, v, None, p.rowptr, p.col, 6, 1)
    with pytest.raises(ValueError, match="values must be contiguous torch.float32 with shape"):
        _spmm_impl(x, v[:-1], None, p.rowptr, p.col, 6, 1)
    with pytest.raises(ValueError, match="values must be contiguous torch.float32"):
        _spmm_impl(x, v.double(), None, p.rowptr, p.col, 6, 1)
    with pytest.raises(ValueError, match="bias must be contiguous"):
        _spmm_impl(x, v, torch.randn(5), p.rowptr, p.col, 6, 1)
    with pytest.raises(ValueError, match="rowptr has 7 entries for 5 output rows"):
        _spmm_impl(x, v, None, p.rowptr, p.col, 5, 1)
    with pytest.raises(TypeError, match="contiguous int32"):
        _spmm_impl(x, v, None, p.rowptr.long(), p.col, 6, 1)
    with pytest.raises(ValueError, match="colptr has 6 entries for 4 input columns"):
        _spmm_t_impl(dy, v, p.rowptr, p.colptr, p.row, p.perm, 4, 1)
    with pytest.raises(ValueError, match="perm has shape"):
        _spmm_t_impl(dy, v, p.rowptr, p.colptr, p.row, p.perm[:-1], 5, 1)
    with pytest.raises(ValueError, match="do not match a pattern of 6 rows"):
        _sddmm_impl(torch.randn(3, 5), x, p.rowptr, p.col, 1)
    with pytest.raises(ValueError, match="do not match"):
        _sddmm_impl(dy, torch.randn(4, 5), p.rowptr, p.col, 1)
    # C++: a rowptr that does not end at nnz (a pattern and values out of step), a bad dtype code, negative sizes
    bad = p.rowptr.clone()
    bad[-1] += 1
    y = torch.empty(3, 6)
    with pytest.raises(ValueError, match="rowptr must run from 0 to nnz"):
        _C.spmm_ptr(0, x.data_ptr(), 3, 5, False, bad.data_ptr(), p.col.data_ptr(), v.data_ptr(), p.nnz, 0, 0,
                    y.data_ptr(), 6, False, 1)
    with pytest.raises(ValueError, match="dtype code"):
        _C.sddmm_ptr(7, dy.data_ptr(), x.data_ptr(), 3, 6, 5, False, False, p.rowptr.data_ptr(), p.col.data_ptr(),
                     p.nnz, v.data_ptr(), 1)
    with pytest.raises(ValueError, match="must not be negative"):
        _C.sddmm_ptr(0, dy.data_ptr(), x.data_ptr(), -3, 6, 5, False, False, p.rowptr.data_ptr(), p.col.data_ptr(),
                     p.nnz, v.data_ptr(), 1)
    # int16 indices: both dimensions at most 32768, and a compact dX's perm_rowptr (W's rowptr) running to nnz
    c16 = p.col.to(torch.int16)
    with pytest.raises(ValueError, match="int16 indices need both dimensions at most 32768"):
        _C.sddmm_ptr(0, dy.data_ptr(), x.data_ptr(), 3, 6, 40000, False, False, p.rowptr.data_ptr(), c16.data_ptr(),
                     p.nnz, v.data_ptr(), 1, index_bytes=2)
    off = (p.csr_positions() - p.rowptr.long()[p.row.long()]).to(torch.int16)
    dx = torch.empty(3, 5)
    with pytest.raises(ValueError, match="perm_rowptr must be W's rowptr"):
        _C.spmm_ptr(0, dy.data_ptr(), 3, 6, False, p.colptr.data_ptr(), p.row.to(torch.int16).data_ptr(),
                    v.data_ptr(), p.nnz, off.data_ptr(), 0, dx.data_ptr(), 5, False, 1, index_bytes=2,
                    perm_rowptr=bad.data_ptr())
    # and the entries by address give the numpy entries' bits
    ref = torch.empty(3, 6)
    _C.spmm(x.numpy(), p.rowptr.numpy(), p.col.int().numpy(), v.numpy(), None, None, ref.numpy(), 1)
    assert torch.equal(_spmm_impl(x, v, None, p.rowptr, p.col, 6, 1), ref)


def test_nan_propagates_not_crashes(gen):
    p = Pattern.from_mask(torch.ones(3, 4, dtype=torch.bool))
    v = torch.randn(p.nnz)
    x = torch.randn(2, 4)
    x[0, 1] = float("nan")
    y = sparse_linear(x, v, p)
    assert torch.isnan(y[0]).all() and torch.isfinite(y[1]).all()


# ----------------------------------------------------------------------------------------------- layouts
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("batch", [2, 17, 33, 100, 131])
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("in_place_reads", [-1, 0])  # -1: the default rule (in place at low nnz), 0: always copied
def test_feature_major_layouts_give_the_row_major_bits(dtype, batch, threads, in_place_reads, gen, index_form):
    """Every combination of row-major and feature-major x, dy and outputs gives bit for bit what the row-major
    kernels give (the same sums in the same order), and the outputs come back in the asked layout."""
    from sparsecore.ops import _is_fm, _sddmm_impl, _spmm_impl, _spmm_t_impl, feature_major

    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    _C._set_fm_in_place_reads(in_place_reads)
    try:
        for density in (0.02, 0.4):
            mask = random_mask(37, 45, density, gen, empty_rows=[3], empty_cols=[0])
            mask[5, 7] = True
            p = Pattern.from_mask(mask)
            v = torch.randn(p.nnz, generator=gen).to(dtype)
            b = torch.randn(37, generator=gen).to(dtype)
            x = torch.randn(batch, 45, generator=gen).to(dtype)
            dy = torch.randn(batch, 37, generator=gen).to(dtype)
            y_ref = _spmm_impl(x, v, b, p.rowptr, p.col, 37, 1)
            dx_ref = _spmm_t_impl(dy, v, p.rowptr, p.colptr, p.row, p.perm, 45, 1)
            dw_ref = _sddmm_impl(dy, x, p.rowptr, p.col, 1)
            for xf in (x, feature_major(x)):
                for out_fm in (False, True):
                    y = _spmm_impl(xf, v, b, p.rowptr, p.col, 37, 1, out_fm)
                    assert _is_fm(y) == out_fm and torch.equal(y, y_ref)
            for dyf in (dy, feature_major(dy)):
                for out_fm in (False, True):
                    dx = _spmm_t_impl(dyf, v, p.rowptr, p.colptr, p.row, p.perm, 45, 1, out_fm)
                    assert _is_fm(dx) == out_fm and torch.equal(dx, dx_ref)
                for xf in (x, feature_major(x)):
                    assert torch.equal(_sddmm_impl(dyf, xf, p.rowptr, p.col, 1), dw_ref)
        # and the row-major results themselves against float64 (the rest of this file checks them more widely)
        ref = x.double() @ p.to_dense(v.double()).T + b.double()
        torch.testing.assert_close(y_ref.double(), ref, rtol=2e-2 if dtype == torch.bfloat16 else 1e-4, atol=2e-2)
    finally:
        _C._set_fm_in_place_reads(-1)
        torch.set_num_threads(old)


def test_feature_major_training_step_and_gradcheck(gen):
    """A chain of feature-major layers keeps the layout end to end, equals the row-major chain bit for bit, and
    is differentiable (gradcheck, gradgradcheck in float64)."""
    import sparsecore

    torch.manual_seed(0)
    layers = [sparsecore.SparseLinear(12, 20, density=0.3, dtype=torch.float64),
              sparsecore.SparseLinear(20, 7, density=0.3, dtype=torch.float64)]
    x = torch.randn(9, 12, dtype=torch.float64, requires_grad=True)

    def chain(inp, fm):
        for layer in layers:
            layer.feature_major = fm
        h = torch.relu(layers[0](inp))
        if fm:
            assert h.stride() == (1, 9)
        return layers[1](h)

    out_fm, out_rm = chain(x, True), chain(x, False)
    assert torch.equal(out_fm, out_rm)
    g_fm = torch.autograd.grad(out_fm.square().sum(), [x, layers[0].values, layers[1].bias])
    g_rm = torch.autograd.grad(chain(x, False).square().sum(), [x, layers[0].values, layers[1].bias])
    assert all(torch.equal(a, b) for a, b in zip(g_fm, g_rm))
    xf = sparsecore.feature_major(x.detach()).requires_grad_()
    assert torch.autograd.gradcheck(lambda t: chain(t, True), (xf,))
    assert torch.autograd.gradgradcheck(lambda t: chain(t, True), (xf,))
    for layer in layers:
        layer.feature_major = False


def test_small_kernels_run_on_one_thread_with_the_same_bits(gen):
    """Below the minimum work per thread a kernel runs on one thread; the result is the one the threaded split
    gives (each output is summed in the same order whatever the split)."""
    mask = random_mask(64, 80, 0.1, gen)
    p = Pattern.from_mask(mask)
    w = torch.randn(64, 80, generator=gen) * mask
    old = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        outs = []
        for minimum in (0, -1):  # 0: two threads even here; -1: the default (one thread at this size)
            _C._set_min_work_per_thread(minimum)
            v = p.gather(w).requires_grad_()
            x = torch.randn(40, 80, generator=torch.Generator().manual_seed(5), requires_grad=True)
            y = sparse_linear(x, v, p)
            y.square().sum().backward()
            outs.append((y.detach(), x.grad, v.grad))
    finally:
        _C._set_min_work_per_thread(0)
        torch.set_num_threads(old)
    assert all(torch.equal(a, b) for a, b in zip(*outs))
    check_step_vs_reference(p, w, 40, gen)


@pytest.mark.parametrize("batch", [64, 100, 131])
def test_wide_tiles_where_rows_are_read_often(isa, batch, gen):
    """nnz / n_cols >= 128 picks the wider AVX-512 tiles (64 rows for the SpMMs, 128 for the SDDMM) by itself."""
    mask = random_mask(300, 64, 0.6, gen, empty_rows=[1], empty_cols=[3])
    check_mask(mask, batch, torch.float32, gen)
