"""Block-sparse (BSR) layers on the C++ CPU kernels against the float64 dense reference."""
import pytest
import torch

from sparsecore import SparseLinear, sparse_linear
from sparsecore.pattern import Pattern

from conftest import check_step_vs_reference


def bsr_case(out_f, in_f, bs, density, gen, dtype, empty_block_row=True):
    bm = torch.rand(out_f // bs, in_f // bs, generator=gen) < density
    if empty_block_row and bm.shape[0] > 1:
        bm[0] = False
    if bm.sum() == 0:
        bm[-1, -1] = True
    mask = bm.repeat_interleave(bs, 0).repeat_interleave(bs, 1)
    p = Pattern.from_mask(mask, block_size=bs)
    w = torch.randn(out_f, in_f, generator=gen, dtype=dtype) * mask
    return p, w


# block sizes: multiples of the vector widths (16, 32, 64), and ones that are not (2, 3, 12)
@pytest.mark.parametrize("bs,out_f,in_f,batch", [(16, 48, 32, 5), (32, 64, 96, 37), (64, 128, 64, 3),
                                                 (2, 6, 10, 9), (3, 9, 6, 17), (12, 24, 36, 70)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("threads", [1, 2])
def test_bsr_forward_backward(bs, out_f, in_f, batch, dtype, threads, gen):
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        p, w = bsr_case(out_f, in_f, bs, 0.5, gen, dtype)
        check_step_vs_reference(p, w, batch, gen)
    finally:
        torch.set_num_threads(old)


def test_bsr_gradcheck(gen):
    p, w = bsr_case(6, 4, 2, 0.6, gen, torch.float64)
    v = p.gather(w).requires_grad_()
    x = torch.randn(3, 4, dtype=torch.float64, generator=gen, requires_grad=True)
    b = torch.randn(6, dtype=torch.float64, generator=gen, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, v, b: sparse_linear(x, v, p, b), (x, v, b))


def test_bsr_layer_trains_and_round_trips(gen):
    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 32)
    bm = torch.rand(2, 4, generator=gen) < 0.5
    bm[0, 0] = True
    mask = bm.repeat_interleave(16, 0).repeat_interleave(16, 1)
    layer = SparseLinear.from_dense(lin, mask=mask, layout="bsr", block_size=16)
    assert layer.values.shape == (int(bm.sum()), 16, 16) and "bsr, block_size=16" in repr(layer)
    x = torch.randn(8, 64)
    torch.testing.assert_close(layer(x), x @ (lin.weight * mask).T.detach() + lin.bias.detach())
    torch.testing.assert_close(layer.to_dense()(x), layer(x))
    rand = SparseLinear(64, 32, density=0.5, layout="bsr", block_size=16, generator=gen)
    assert rand.values.shape[1:] == (16, 16) and rand.nnz == 4 * 256
    opt = torch.optim.SGD(layer.parameters(), lr=0.1)
    target = torch.randn(8, 32)
    losses = []
    for _ in range(20):
        opt.zero_grad()
        loss = ((layer(x) - target) ** 2).mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    by_density = SparseLinear.from_dense(lin, density=0.5, layout="bsr", block_size=16)
    assert by_density.values.shape == (4, 16, 16)
