"""SparseLinear as a drop-in nn.Linear, and sparsify."""
import copy
import io
import pickle

import pytest
import torch
from torch import nn

import sparsecore
from sparsecore import Pattern, SparseLinear, sparsify

from conftest import random_mask


def test_from_dense_mask_matches_masked_linear(gen):
    lin = nn.Linear(12, 7).double()
    mask = random_mask(7, 12, 0.3, gen, empty_rows=[2], empty_cols=[5])
    s = SparseLinear.from_dense(lin, mask=mask)
    x = torch.randn(4, 3, 12, dtype=torch.float64, generator=gen)
    ref = x @ (lin.weight * mask).T + lin.bias
    torch.testing.assert_close(s(x), ref)
    assert torch.equal(s.mask(), mask) and s.nnz == int(mask.sum())
    torch.testing.assert_close(s.to_dense()(x), ref)
    assert torch.equal(s.weight, lin.weight.detach() * mask)


def test_from_dense_density_keeps_largest(gen):
    lin = nn.Linear(20, 10)
    s = SparseLinear.from_dense(lin, density=0.25)
    assert s.nnz == 50
    kept = lin.weight.detach().abs()[s.mask()]
    dropped = lin.weight.detach().abs()[~s.mask()]
    assert kept.min() >= dropped.max()


def test_random_density_and_repr(gen):
    s = SparseLinear(64, 32, density=0.1, generator=gen)
    assert s.nnz == round(0.1 * 64 * 32) and abs(s.density - 0.1) < 1e-3
    assert "nnz=205" in repr(s) and "layout=csr" in repr(s)
    with pytest.raises(ValueError, match="exactly one"):
        SparseLinear(4, 4)
    with pytest.raises(ValueError, match="density"):
        SparseLinear(4, 4, density=1.5)
    with pytest.raises(ValueError, match="pattern has shape"):
        SparseLinear(4, 4, pattern=Pattern.from_mask(torch.ones(3, 4, dtype=torch.bool)))
    with pytest.raises(AttributeError):
        s.weight = torch.zeros(32, 64)


def test_training_step_reduces_loss(gen):
    torch.manual_seed(0)
    model = nn.Sequential(SparseLinear(10, 32, density=0.5, generator=gen), nn.ReLU(),
                          SparseLinear(32, 1, density=0.5, generator=gen))
    x = torch.randn(64, 10, generator=gen)
    y = x[:, :1] * 2 - x[:, 1:2]
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(60):
        opt.zero_grad()
        loss = ((model(x) - y) ** 2).mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.3 * losses[0]


def test_dtype_device_moves_keep_index_dtype(gen):
    s = SparseLinear(8, 6, density=0.5, generator=gen)
    d = copy.deepcopy(s).double()
    assert d.values.dtype == torch.float64 and d.col.dtype == torch.int16 and d.rowptr.dtype == torch.int32
    assert d.pattern.compact and d.pattern == s.pattern
    x = torch.randn(3, 8, dtype=torch.float64)
    torch.testing.assert_close(d(x), s(x.float()).double(), rtol=1e-5, atol=1e-6)
    f = d.to(torch.float32)
    assert f.values.dtype == torch.float32


def test_state_dict_round_trip_and_nnz_change(gen):
    a = SparseLinear(16, 9, density=0.2, generator=gen)
    b = SparseLinear(16, 9, density=0.6, generator=gen)
    assert a.nnz != b.nnz
    b.load_state_dict(a.state_dict())
    x = torch.randn(5, 16)
    assert b.nnz == a.nnz and torch.equal(b(x), a(x)) and b.pattern == a.pattern
    bad = a.state_dict()
    bad["col"] = torch.flip(bad["col"], [0]).contiguous()
    with pytest.raises(RuntimeError, match="left unchanged.*strictly increasing|left unchanged.*sorted|left unchanged"):
        b.load_state_dict(bad)


def test_pickle_deepcopy_torch_save(gen):
    s = SparseLinear(10, 4, density=0.5, generator=gen)
    x = torch.randn(2, 10)
    for clone in (copy.deepcopy(s), pickle.loads(pickle.dumps(s))):
        assert torch.equal(clone(x), s(x))
    buf = io.BytesIO()
    torch.save(s.state_dict(), buf)
    buf.seek(0)
    t = SparseLinear(10, 4, density=0.1)
    t.load_state_dict(torch.load(buf))
    assert torch.equal(t(x), s(x))


def test_sparsify_swaps_linears_and_skips(gen):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 30), nn.ReLU(), nn.Sequential(nn.Linear(30, 30), nn.ReLU()), nn.Linear(30, 5))
    dense_first = model[0].weight.detach().clone()
    sparsify(model, density=0.2, skip=["3"], generator=gen)
    assert isinstance(model[0], SparseLinear) and isinstance(model[2][0], SparseLinear)
    assert isinstance(model[3], nn.Linear)
    # the kept weights are the dense model's
    assert torch.equal(model[0].weight[model[0].mask()], dense_first[model[0].mask()])
    assert model(torch.randn(3, 20)).shape == (3, 5)
    m2 = sparsify(nn.Sequential(nn.Linear(50, 40)), epsilon=2, method="er", generator=gen)
    assert m2[0].nnz == 180
    with pytest.raises(ValueError, match="epsilon"):
        sparsify(nn.Sequential(nn.Linear(5, 5)), method="er")
    m3 = sparsify(nn.Sequential(nn.Linear(40, 40), nn.Linear(40, 10)), density=0.2, method="erk")
    total = sum(m.nnz for m in m3 if isinstance(m, SparseLinear))
    assert abs(total - 0.2 * (1600 + 400)) <= 2


def test_sparsify_magnitude(gen):
    model = nn.Sequential(nn.Linear(10, 10))
    w = model[0].weight.detach().clone()
    sparsify(model, density=0.1, method="magnitude")
    assert model[0].nnz == 10 and w.abs()[model[0].mask()].min() >= w.abs()[~model[0].mask()].max()


def test_backend_switch_errors():
    with pytest.raises(ValueError, match="backend"):
        with sparsecore.use_backend("cuda"):
            pass
    assert sparsecore.get_backend() == "auto"
