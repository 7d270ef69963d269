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

from conftest import check_step_vs_reference, isa_supported, random_mask

# The `isa` fixture (conftest) runs a test under each instruction set the CPU supports; test_ops.py's
# test_every_tile_width uses it too, for every tile width of every copy.


@pytest.fixture
def threads(request):
    old = torch.get_num_threads()
    torch.set_num_threads(request.param)
    try:
        yield request.param
    finally:
        torch.set_num_threads(old)


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
def test_values_gather_pass_per_isa(isa, dtype, gen):
    """Above 1 MiB of values, dX gathers values[perm] in a pass of its own (with prefetches) before the tiles."""
    mask = random_mask(540, 600, 0.9, gen, empty_rows=[1], empty_cols=[3])
    w = torch.randn(*mask.shape, generator=gen, dtype=dtype) * mask
    check_step_vs_reference(Pattern.from_mask(mask), w, 37, gen)


@pytest.mark.parametrize("threads", [1, 2], indirect=True)
@pytest.mark.parametrize("block_bytes", [1, 3000, 200_000])
def test_values_gather_by_row_blocks(isa, threads, block_bytes, gen):
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

    before = _spmm_t_impl(dy, v, p.colptr, p.row, p.perm, 700, 1)
    held = rss_kb()
    _C.release_scratch()
    freed = held - rss_kb()
    assert freed >= 1024, f"release_scratch freed {freed} KiB"
    assert torch.equal(_spmm_t_impl(dy, v, p.colptr, p.row, p.perm, 700, 1), before)
