"""Every compiled copy of the CPU kernels (portable, AVX2+FMA, AVX-512) against the float64 reference (the
avx512bf16 cap runs the AVX-512 copy of these fp32/fp64 kernels; tests/test_ops_bf16.py covers the bf16 ones).

The kernels run the widest copy the CPU supports, so without the testing hook CI would only run that one. The
copies differ in vector width (16, 32 and 64 bytes), and so in their tiles, batch chunks, horizontal sums,
transposes and tails. A copy wider than the machine supports cannot run there and is skipped.
"""
import os
import subprocess
import sys

import pytest
import torch

from sparsecore import _C
from sparsecore.pattern import Pattern

from conftest import check_step_vs_reference, isa_supported, random_mask, reference

# The `isa` fixture (conftest) runs a test under each instruction set the CPU supports; test_ops.py's
# test_every_tile_width uses it too, for every tile width of every copy.



def test_kernel_isa_hook():
    old = _C.kernel_isa()
    _C._set_max_isa("avx512bf16")
    try:
        assert _C.kernel_isa() == _C.cpu_isa()  # the widest cap: what the CPU supports
        _C._set_max_isa("avx512")
        assert _C.kernel_isa() == ("avx512" if isa_supported("avx512") else _C.cpu_isa())
        _C._set_max_isa("generic")
        assert _C.kernel_isa() == "generic" and not _C.has_avx2()
        with pytest.raises(ValueError, match="unknown instruction set 'sse'"):
            _C._set_max_isa("sse")
        assert _C.kernel_isa() == "generic"  # a refused name leaves the cap as it was
    finally:
        _C._set_max_isa(old)


# batches: 1, odd, one that is a multiple of no tile width, and ones that give several batch chunks
@pytest.mark.parametrize("threads", [1, 2], indirect=True)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("batch", [1, 7, 40, 100, 131])
def test_csr_kernels_per_isa(isa, threads, dtype, batch, gen):
    mask = random_mask(37, 45, 0.3, gen, empty_rows=[0, 20], empty_cols=[44])
    mask[5] = False
    mask[5, 3] = True  # a row with a single entry
    w = torch.randn(*mask.shape, generator=gen, dtype=dtype) * mask
    check_step_vs_reference(Pattern.from_mask(mask), w, batch, gen)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_values_gather_pass_per_isa(isa, dtype, gen, index_form):
    """Above 1 MiB of values, dX gathers values[perm] in a pass of its own (with prefetches) before the tiles."""
    mask = random_mask(540, 600, 0.9, gen, empty_rows=[1], empty_cols=[3])
    w = torch.randn(*mask.shape, generator=gen, dtype=dtype) * mask
    check_step_vs_reference(Pattern.from_mask(mask), w, 37, gen)


@pytest.mark.parametrize("threads", [1, 2], indirect=True)
@pytest.mark.parametrize("block_bytes", [1, 3000, 200_000])
def test_values_gather_by_row_blocks(isa, threads, block_bytes, gen, index_form):
    """Above 12 MiB of values the gather runs in row blocks (each thread a range of columns, with a cursor per
    column); forced here on a small layer, with blocks of one row, of a few rows and of a third of the rows, and
    rows and columns left empty."""
    mask = random_mask(301, 257, 0.5, gen, empty_rows=[0, 150, 151, 300], empty_cols=[0, 99, 256])
    w = torch.randn(*mask.shape, generator=gen, dtype=torch.float64) * mask
    _C._set_gather_blocks(0, block_bytes)
    try:
        check_step_vs_reference(Pattern.from_mask(mask), w, 19, gen)
    finally:
        _C._set_gather_blocks(-1, -1)


@pytest.mark.parametrize("threads", [1, 2], indirect=True)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("bs,batch", [(16, 37), (3, 70), (4, 9), (32, 40), (64, 17), (8, 33), (12, 5)])
def test_bsr_kernels_per_isa(isa, threads, dtype, bs, batch, gen):
    """Block sizes that are a whole number of vector pairs (the dW kernel's two-vector path), of vectors (its
    one-vector path) or neither (scalar dW), per copy: at 16 fp32 lanes, 32 and 64 take the pair path, 16 the
    single one; 12 rows make a register block of 8 plus one of 4 under AVX-512."""
    bm = torch.rand(6, 5, generator=gen) < 0.5
    bm[1] = False
    bm[0, 0] = True
    mask = bm.repeat_interleave(bs, 0).repeat_interleave(bs, 1)
    w = torch.randn(*mask.shape, generator=gen, dtype=dtype) * mask
    check_step_vs_reference(Pattern.from_mask(mask, block_size=bs), w, batch, gen)


@pytest.mark.parametrize("value,expect", [("generic", "generic"), ("avx2", "avx2"), (" avx2 ", "avx2"),
                                          ("avx512", "avx512"), ("avx512bf16", "avx512bf16"), ("", None)])
def test_isa_cap_from_environment(value, expect):
    """SPARSECORE_MAX_ISA caps the kernels at import (checked in a fresh interpreter)."""
    if expect is not None and not isa_supported(expect):
        pytest.skip(f"this CPU does not support {expect}")
    env = dict(os.environ, SPARSECORE_MAX_ISA=value)
    out = subprocess.run([sys.executable, "-c", "import sparsecore; print(sparsecore._C.kernel_isa())"], env=env,
                         capture_output=True, text=True, check=True).stdout.strip()
    assert out == (expect or _C.cpu_isa())


def test_bad_isa_cap_in_environment_is_a_clear_error():
    env = dict(os.environ, SPARSECORE_MAX_ISA="avx1024")
    r = subprocess.run([sys.executable, "-c", "import sparsecore"], env=env, capture_output=True, text=True)
    assert r.returncode != 0
    assert "SPARSECORE_MAX_ISA: unknown instruction set 'avx1024'" in r.stderr


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads VmRSS from /proc")
def test_release_scratch_returns_large_buffers_to_the_system(gen):
    """Scratch of 1 MiB and more is mapped directly, so release_scratch() lowers the resident set at once (from
    glibc's heap it stayed resident); the next call maps it again and computes the same result."""
    def rss_kb():
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))

    mask = random_mask(600, 700, 0.9, gen)  # 378k values: dX gathers 1.5 MB of fp32 into scratch
    p = Pattern.from_mask(mask)
    v = torch.randn(p.nnz, generator=gen)
    dy = torch.randn(64, 600, generator=gen)
    from sparsecore.ops import _spmm_t_impl

    before = _spmm_t_impl(dy, v, p.rowptr, p.colptr, p.row, p.perm, 700, 1)
    held = rss_kb()
    _C.release_scratch()
    freed = held - rss_kb()
    assert freed >= 1024, f"release_scratch freed {freed} KiB"
    assert torch.equal(_spmm_t_impl(dy, v, p.rowptr, p.colptr, p.row, p.perm, 700, 1), before)


# ----------------------------------------------------------------------------------------------- shifted last tile
# A batch that is not a multiple of its last tile's width T computes that tile as the whole tile of its last T rows
# (overlapping the tile before it; kernels.cpp, shift_last_tile): the SpMMs write the overlapped rows again with
# the same values, the SDDMM masks them out of its sums. Batches 100 and 131 shift under every copy; 40 (one tile
# wider than the batch) cannot; the forced 1-vector tiles split a chunk of several tiles.
@pytest.fixture
def shift_tail(request):
    _C._set_shift_tail(request.param)
    try:
        yield request.param
    finally:
        _C._set_shift_tail(True)


@pytest.mark.parametrize("shift_tail", [True, False], indirect=True)
@pytest.mark.parametrize("threads", [1, 2], indirect=True)
@pytest.mark.parametrize("batch", [40, 100, 131])
@pytest.mark.parametrize("layout", ["row-major", "feature-major in place", "feature-major copied"])
@pytest.mark.parametrize("tile_vectors", [0, 1])
def test_shifted_last_tile_per_isa(isa, shift_tail, threads, batch, layout, tile_vectors, gen):
    """The three kernels against the float64 reference with the last tile shifted or zero-padded, in each layout
    and copy; the SpMMs give the same bits either way (each batch row is summed on a lane of its own, and at these
    sizes every tile splits a row's entries over the same number of accumulators)."""
    from sparsecore.ops import _sddmm_impl, _spmm_impl, _spmm_t_impl, feature_major

    mask = random_mask(37, 45, 0.1, gen, empty_rows=[2], empty_cols=[7])
    mask[5, 3] = True
    p = Pattern.from_mask(mask)
    w = torch.randn(37, 45, generator=gen, dtype=torch.float64) * mask
    v = p.gather(w).float()
    b = torch.randn(37, generator=gen)
    x, dy = torch.randn(batch, 45, generator=gen), torch.randn(batch, 37, generator=gen)
    if layout != "row-major":
        x, dy = feature_major(x), feature_major(dy)
    _C._set_fm_in_place_reads(-1 if layout == "feature-major in place" else 0)
    _C._set_tile_vectors(tile_vectors)
    try:
        y = _spmm_impl(x, v, b, p.rowptr, p.col, 37, 1)
        dx = _spmm_t_impl(dy, v, p.rowptr, p.colptr, p.row, p.perm, 45, 1)
        dw = _sddmm_impl(dy, x, p.rowptr, p.col, 1)
        _C._set_shift_tail(not shift_tail)
        y_other = _spmm_impl(x, v, b, p.rowptr, p.col, 37, 1)
        dx_other = _spmm_t_impl(dy, v, p.rowptr, p.colptr, p.row, p.perm, 45, 1)
    finally:
        _C._set_shift_tail(shift_tail)
        _C._set_fm_in_place_reads(-1)
        _C._set_tile_vectors(0)
    y_ref, dx_ref, dw_ref, _ = reference(x.detach(), p.to_dense(v), b, dy)
    t = {"rtol": 1e-5, "atol": 1e-5}
    torch.testing.assert_close(y.double(), y_ref.detach(), **t)
    torch.testing.assert_close(dx.double(), dx_ref, **t)
    torch.testing.assert_close(dw.double(), p.gather(dw_ref), **t)
    assert torch.equal(y, y_other) and torch.equal(dx, dx_other)


@pytest.mark.parametrize("threads", [1, 2], indirect=True)
@pytest.mark.parametrize("layout", ["row-major", "feature-major"])
@pytest.mark.parametrize("operand", ["dy", "x"])
def test_shifted_last_tile_masks_inf_in_the_overlap(isa, threads, layout, operand, gen):
    """The SDDMM zeroes the overlapped rows of dY bitwise, not by multiplying: an inf in a dY row that the shifted
    tile overlaps is summed once, by the tile before it, and never turns the sums of other entries into NaN. An inf
    in an overlapped row of X stays in the entries it reaches (non-finite, NaN where the reference has +-inf: it
    meets a zeroed dY lane) and in no other."""
    from sparsecore.ops import _sddmm_impl, feature_major

    mask = random_mask(20, 24, 0.3, gen, empty_rows=[1], empty_cols=[2])
    p = Pattern.from_mask(mask)
    batch = 100  # the shifted last tile overlaps rows 52..63 (AVX-512) or 60..63 (AVX2); the portable copy's
    # tiles divide 100
    x, dy = torch.randn(batch, 24, generator=gen), torch.randn(batch, 20, generator=gen)
    if operand == "dy":
        dy[61, 3] = float("inf")
    else:
        x[61, 5] = float("inf")
    if layout == "feature-major":
        x, dy = feature_major(x), feature_major(dy)
    dw = _sddmm_impl(dy, x, p.rowptr, p.col, 1)
    ref = p.gather(dy.double().T @ x.double())
    if operand == "dy":
        assert torch.equal(torch.isinf(dw), torch.isinf(ref)) and torch.equal(torch.isnan(dw), torch.isnan(ref))
    else:
        assert torch.equal(torch.isfinite(dw), torch.isfinite(ref))
    finite = torch.isfinite(ref)
    assert finite.sum() > 0 and (~finite).sum() > 0
    torch.testing.assert_close(dw.double()[finite], ref[finite], rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------------- epilogues
@pytest.mark.parametrize("threads", [1, 2], indirect=True)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("batch", [1, 7, 40, 100])
@pytest.mark.parametrize("fm", [False, True])
def test_relu_and_relu_mask_in_the_stores_per_isa(isa, threads, dtype, batch, fm, gen):
    """The forward's fused ReLU is torch.relu of the plain output, and dX's fused mask is threshold_backward of the
    plain dX, bit for bit (NaN kept by the ReLU; a NaN mask keeps its entry, a -0.0 one zeroes it), in each copy,
    layout, batch chunking and thread count. A row-major dX takes the mask as a separate op (same bits)."""
    from sparsecore.ops import _spmm_impl, _spmm_t_impl, feature_major

    mask = random_mask(37, 45, 0.2, gen, empty_rows=[2], empty_cols=[7])
    p = Pattern.from_mask(mask)
    v = torch.randn(p.nnz, generator=gen).to(dtype)
    b = torch.randn(37, generator=gen).to(dtype)
    x = torch.randn(batch, 45, generator=gen).to(dtype)
    x[0, 3] = float("nan")
    dy = torch.randn(batch, 37, generator=gen).to(dtype)
    relu_out = torch.randn(batch, 45, generator=gen).to(dtype).relu()
    relu_out[0, :4] = torch.tensor([float("nan"), -0.0, 0.0, 1.0], dtype=dtype)
    if fm:
        x, dy, relu_out = feature_major(x), feature_major(dy), feature_major(relu_out)
    y = _spmm_impl(x, v, b, p.rowptr, p.col, 37, 1, relu=True)
    ref = torch.relu(_spmm_impl(x, v, b, p.rowptr, p.col, 37, 1))
    assert torch.equal(y.isnan(), ref.isnan()) and y.isnan().any()
    assert torch.equal(torch.nan_to_num(y), torch.nan_to_num(ref))
    dx = _spmm_t_impl(dy, v, p.rowptr, p.colptr, p.row, p.perm, 45, 1, mask=relu_out)
    ref = torch.ops.aten.threshold_backward(_spmm_t_impl(dy, v, p.rowptr, p.colptr, p.row, p.perm, 45, 1), relu_out, 0)
    assert torch.equal(dx, ref) and dx.stride() == ref.stride()
    assert dx[0, 0] != 0 and dx[0, 1] == 0 and dx[0, 2] == 0  # NaN mask keeps, -0.0 and 0.0 zero
