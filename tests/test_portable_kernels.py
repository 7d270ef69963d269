"""The portable copy of the CPU kernels (the one non-AVX2 and non-x86 CPUs run) against the float64 reference.

On an AVX2 machine the kernels dispatch to their AVX2 copy, so without the testing hook CI would never run the
portable one: its vectors are 16 bytes (4 fp32 / 2 fp64 lanes), so its tiles, batch chunks, horizontal sums and
tails differ from the AVX2 copy's.
"""
import pytest
import torch

from sparsecore import _C
from sparsecore.pattern import Pattern

from conftest import check_step_vs_reference, random_mask


@pytest.fixture
def portable():
    _C._force_portable_kernels(True)
    try:
        assert not _C.has_avx2()
        yield
    finally:
        _C._force_portable_kernels(False)


@pytest.fixture
def threads(request):
    old = torch.get_num_threads()
    torch.set_num_threads(request.param)
    try:
        yield request.param
    finally:
        torch.set_num_threads(old)


# batches: 1, odd, one that is a multiple of no tile width, and ones that give several batch chunks
@pytest.mark.parametrize("threads", [1, 2], indirect=True)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("batch", [1, 7, 40, 100, 131])
def test_csr_portable_kernels(portable, threads, dtype, batch, gen):
    mask = random_mask(37, 45, 0.3, gen, empty_rows=[0, 20], empty_cols=[44])
    mask[5] = False
    mask[5, 3] = True  # a row with a single entry
    w = torch.randn(*mask.shape, generator=gen, dtype=dtype) * mask
    check_step_vs_reference(Pattern.from_mask(mask), w, batch, gen)


@pytest.mark.parametrize("threads", [1, 2], indirect=True)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("bs,batch", [(16, 37), (3, 70), (4, 9)])
def test_bsr_portable_kernels(portable, threads, dtype, bs, batch, gen):
    bm = torch.rand(6, 5, generator=gen) < 0.5
    bm[1] = False
    bm[0, 0] = True
    mask = bm.repeat_interleave(bs, 0).repeat_interleave(bs, 1)
    w = torch.randn(*mask.shape, generator=gen, dtype=dtype) * mask
    check_step_vs_reference(Pattern.from_mask(mask, block_size=bs), w, batch, gen)
