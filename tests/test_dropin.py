"""SparseLinear where people train: autocast, attention blocks, weight reads, double backward, construction checks.

Loading and checkpoints are in test_loading.py. Every comparison is against a float64 (or same-dtype dense)
reference built from the same weights.
"""
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sparsecore
from sparsecore import Pattern, SparseLinear, SparseMultiheadAttention, sparse_linear, sparsify

from conftest import random_mask

BF16 = torch.bfloat16


def _cpu_bf16() -> bool:
    try:
        p = Pattern.from_mask(torch.ones(2, 2, dtype=torch.bool))
        sparse_linear(torch.ones(1, 2, dtype=BF16), torch.ones(p.nnz, dtype=BF16), p)
        return True
    except TypeError:
        return False


needs_bf16 = pytest.mark.skipif(not _cpu_bf16(), reason="this build has no bfloat16 CPU kernels")


def dense_twin(model):
    """A copy of ``model`` with every SparseLinear replaced by the nn.Linear computing the same function."""
    import copy

    twin = copy.deepcopy(model)
    for name, m in list(twin.named_modules()):
        if isinstance(m, SparseLinear):
            parent = twin.get_submodule(name.rsplit(".", 1)[0]) if "." in name else twin
            setattr(parent, name.rsplit(".", 1)[-1], m.to_dense())
    return twin


# ----------------------------------------------------------------------------------------------- autocast
@needs_bf16
def test_autocast_mixed_dense_and_sparse_like_nn_linear(gen):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(24, 40), nn.ReLU(), SparseLinear(40, 33, density=0.3, generator=gen), nn.ReLU(),
                          SparseLinear(33, 7, density=0.5, generator=gen))
    twin = dense_twin(model)
    x = torch.randn(19, 24, generator=gen)
    with torch.autocast("cpu", dtype=BF16):
        y = model(x)
        y_ref = twin(x)
    assert y.dtype == BF16 and y_ref.dtype == BF16
    torch.testing.assert_close(y.float(), y_ref.float(), rtol=3e-2, atol=3e-2)
    y.float().square().sum().backward()
    y_ref.float().square().sum().backward()
    for m, r in ((model[2], twin[2]), (model[4], twin[4])):
        assert m.values.grad.dtype == torch.float32 and m.bias.grad.dtype == torch.float32
        ref = m.pattern.gather(r.weight.grad)
        assert (m.values.grad - ref).abs().max() <= 5e-2 * ref.abs().max()


@needs_bf16
def test_autocast_sparse_only_model_computes_in_bf16(gen):
    layer = SparseLinear(16, 8, density=0.5, generator=gen)
    x = torch.randn(4, 16, generator=gen)
    with torch.autocast("cpu", dtype=BF16):
        y = layer(x)
        with torch.autocast("cpu", enabled=False):
            y32 = layer(x)
    assert y.dtype == BF16 and y32.dtype == torch.float32
    ref = x.bfloat16().double() @ layer.weight.detach().bfloat16().double().T + layer.bias.detach().bfloat16().double()
    torch.testing.assert_close(y.double(), ref, rtol=1.6e-2, atol=1.6e-2)


@needs_bf16
def test_autocast_eager_and_compile_agree(gen):
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(12, 20), nn.ReLU(), SparseLinear(20, 6, density=0.4, generator=gen))
    x = torch.randn(5, 12, generator=gen)
    with torch.autocast("cpu", dtype=BF16):
        y = model(x)
    compiled = torch.compile(model, fullgraph=True)
    with torch.autocast("cpu", dtype=BF16):
        yc = compiled(x)
    assert yc.dtype == BF16
    torch.testing.assert_close(yc, y)


@needs_bf16
def test_custom_op_has_an_autocast_rule(gen):
    from sparsecore.ops import spmm

    p = Pattern.from_mask(random_mask(6, 5, 0.5, gen))
    v, x = torch.randn(p.nnz, generator=gen), torch.randn(3, 5, generator=gen)
    with torch.autocast("cpu", dtype=BF16):
        y = spmm(x, v, None, p.rowptr, p.col, p.colptr, p.row, p.perm, 6, 1)
    assert y.dtype == BF16


def test_autocast_leaves_float64_alone(gen):
    layer = SparseLinear(6, 4, density=0.5, dtype=torch.float64, generator=gen)
    x = torch.randn(3, 6, dtype=torch.float64, generator=gen)
    with torch.autocast("cpu", dtype=BF16):
        y = layer(x)
    assert y.dtype == torch.float64  # as nn.Linear: float64 is never cast
    torch.testing.assert_close(y, x @ layer.weight.detach().T + layer.bias.detach())


def test_autocast_float16_on_cpu_is_supported_or_clear(gen):
    layer = SparseLinear(6, 4, density=0.5, generator=gen)
    with torch.autocast("cpu", dtype=torch.float16):
        try:
            y = layer(torch.randn(3, 6, generator=gen))
        except TypeError as e:
            assert "float16" in str(e)
        else:
            assert y.dtype == torch.float16


# ----------------------------------------------------------------------------------------------- attention
def _encoder_layer(batch_first=True):
    torch.manual_seed(0)
    return nn.TransformerEncoderLayer(d_model=32, nhead=4, dim_feedforward=64, dropout=0.0, batch_first=batch_first)


def test_sparsify_transformer_block_leaves_out_proj_dense_and_says_so():
    layer = _encoder_layer()
    with pytest.warns(UserWarning, match=r"self_attn\.out_proj \(in MultiheadAttention\).*attention='sparse'"):
        sparsify(layer, density=0.3)
    assert type(layer.self_attn.out_proj) is not SparseLinear
    assert isinstance(layer.linear1, SparseLinear) and isinstance(layer.linear2, SparseLinear)
    # every parameter trains: one step changes all of them
    before = {n: p.detach().clone() for n, p in layer.named_parameters()}
    opt = torch.optim.SGD(layer.parameters(), lr=0.1)
    x = torch.randn(3, 7, 32)
    layer(x).square().mean().backward()
    opt.step()
    for n, p in layer.named_parameters():
        assert p.grad is not None and not torch.equal(p.detach(), before[n]), n


@pytest.mark.parametrize("batch_first", [True, False])
def test_sparsify_sparse_attention_trains_every_projection(batch_first):
    layer = _encoder_layer(batch_first)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing is left dense
        sparsify(layer, density=0.3, attention="sparse")
    assert isinstance(layer.self_attn, SparseMultiheadAttention)
    sparse = [m for m in layer.modules() if isinstance(m, SparseLinear)]
    assert len(sparse) == 6 and not any(type(m) is nn.Linear for m in layer.modules())
    x = torch.randn(3, 7, 32) if batch_first else torch.randn(7, 3, 32)
    mask = nn.Transformer.generate_square_subsequent_mask(7)
    y = layer(x, src_mask=mask, is_causal=True)
    y.square().mean().backward()
    for m in sparse:
        assert m.values.grad is not None and m.values.grad.abs().sum() > 0
    # same function as the dense block with the same (sparse) weights
    twin = _encoder_layer(batch_first)
    twin.load_state_dict(dense_twin_of_encoder(layer).state_dict())
    torch.testing.assert_close(y, twin(x, src_mask=mask, is_causal=True), rtol=1e-5, atol=1e-5)


def dense_twin_of_encoder(layer):
    import copy

    twin = copy.deepcopy(layer)
    twin.self_attn = layer.self_attn.to_dense()
    twin.linear1, twin.linear2 = layer.linear1.to_dense(), layer.linear2.to_dense()
    return twin


def test_sparse_attention_in_encoder_stack_eval_with_padding_mask():
    """nn.TransformerEncoder's fused inference path needs packed weights: sparsify turns it off, results stay exact."""
    torch.manual_seed(0)
    enc = nn.TransformerEncoder(_encoder_layer(), num_layers=2, enable_nested_tensor=True)
    ref = enc.eval()
    x = torch.randn(2, 5, 32)
    pad = torch.tensor([[False] * 5, [False, False, False, True, True]])
    sparsify(enc, density=0.5, attention="sparse")
    enc.eval()
    with torch.no_grad():
        y = enc(x, src_key_padding_mask=pad)
    dense = nn.TransformerEncoder(_encoder_layer(), num_layers=2, enable_nested_tensor=False).eval()
    for i, l in enumerate(enc.layers):
        dense.layers[i].load_state_dict(dense_twin_of_encoder(l).state_dict())
    with torch.no_grad():
        y_ref = dense(x, src_key_padding_mask=pad)
    torch.testing.assert_close(y[~pad], y_ref[~pad], rtol=1e-5, atol=1e-5)
    del ref


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("need_weights", [True, False])
@pytest.mark.parametrize("mask_kind", ["none", "bool2d", "float3d", "padding", "causal_hint", "both"])
def test_sparse_mha_matches_nn_mha(batch_first, need_weights, mask_kind, gen):
    e, h, n, l, s = 12, 3, 2, 5, 6
    torch.manual_seed(0)
    sm = SparseMultiheadAttention(e, h, batch_first=batch_first, kdim=8, vdim=10, density=0.5,
                                  dtype=torch.float64, generator=gen)
    mha = sm.to_dense()
    q = torch.randn(n, l, e, dtype=torch.float64)
    k, v = torch.randn(n, s, 8, dtype=torch.float64), torch.randn(n, s, 10, dtype=torch.float64)
    if not batch_first:
        q, k, v = q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)
    kw = {}
    if mask_kind == "bool2d":
        kw["attn_mask"] = torch.rand(l, s, generator=gen) < 0.3
        kw["attn_mask"][:, 0] = False
    elif mask_kind == "float3d":
        kw["attn_mask"] = torch.randn(n * h, l, s, generator=gen, dtype=torch.float64)
    elif mask_kind == "padding":
        kw["key_padding_mask"] = torch.tensor([[False] * s, [False] * (s - 2) + [True] * 2])
    elif mask_kind == "causal_hint":
        sq = SparseMultiheadAttention(e, h, batch_first=batch_first, density=0.5, dtype=torch.float64,
                                      generator=gen)
        mha, sm, k, v = sq.to_dense(), sq, q, q
        s = l
        kw["attn_mask"], kw["is_causal"] = nn.Transformer.generate_square_subsequent_mask(l, dtype=torch.float64), True
    elif mask_kind == "both":
        kw["attn_mask"] = torch.rand(l, s, generator=gen) < 0.3
        kw["attn_mask"][:, 0] = False
        kw["key_padding_mask"] = torch.tensor([[False] * s, [False] * (s - 1) + [True]])
    out, w = sm(q, k, v, need_weights=need_weights, **kw)
    out_ref, w_ref = mha(q, k, v, need_weights=need_weights, **kw)
    torch.testing.assert_close(out, out_ref)
    if need_weights:
        torch.testing.assert_close(w, w_ref)
    else:
        assert w is None


def test_sparse_mha_unbatched_causal_and_from_dense(gen):
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(16, 4, dtype=torch.float64)
    sm = SparseMultiheadAttention.from_dense(mha, method="magnitude", density=1.0)  # density 1: the same function
    x = torch.randn(5, 16, dtype=torch.float64)
    mask = nn.Transformer.generate_square_subsequent_mask(5, dtype=torch.float64)
    torch.testing.assert_close(sm(x, x, x, attn_mask=mask)[0], mha(x, x, x, attn_mask=mask)[0])
    # is_causal without a mask: the causal mask itself
    torch.testing.assert_close(sm(x, x, x, is_causal=True, need_weights=False)[0],
                               mha(x, x, x, attn_mask=mask, need_weights=False)[0])
    half = SparseMultiheadAttention.from_dense(mha, method="magnitude", density=0.25)
    assert abs(half.q_proj.density - 0.25) < 0.01
    with pytest.raises(ValueError, match="add_bias_kv"):
        SparseMultiheadAttention.from_dense(nn.MultiheadAttention(8, 2, add_bias_kv=True), density=0.5)
    with pytest.raises(ValueError, match="divisible"):
        SparseMultiheadAttention(10, 3, density=0.5)


class _ReadsWeight(nn.Module):
    """A user module that computes with its child's .weight (as nn.MultiheadAttention does with out_proj)."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(8, 8)
        self.other = nn.Linear(8, 8)

    def forward(self, x):
        return F.linear(self.other(x), self.proj.weight, self.proj.bias)


def test_sparsify_skips_any_parent_that_reads_weight():
    m = _ReadsWeight()
    with pytest.warns(UserWarning, match=r"proj \(in _ReadsWeight\)"):
        sparsify(m, density=0.5)
    assert type(m.proj) is nn.Linear and isinstance(m.other, SparseLinear)
    m(torch.randn(2, 8)).sum().backward()
    assert m.proj.weight.grad is not None and m.other.values.grad is not None


def test_weight_read_in_training_trains_correctly_and_warns_on_backward(gen):
    layer = SparseLinear(9, 5, density=0.4, generator=gen)
    x = torch.randn(4, 9, generator=gen)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _ = layer.weight  # inspection: no warning
    with pytest.warns(UserWarning, match="densely"):
        F.linear(x, layer.weight, layer.bias).square().sum().backward()
    g_dense = layer.values.grad.clone()
    layer.values.grad = None
    layer(x).square().sum().backward()
    torch.testing.assert_close(g_dense, layer.values.grad)
    with pytest.raises(AttributeError, match="cannot be assigned"):
        layer.weight = nn.Parameter(torch.zeros(5, 9))


def test_sparsify_argument_checks():
    model = nn.Sequential(nn.Linear(4, 4))
    with pytest.raises(ValueError, match="does not have.*'nope'"):
        sparsify(model, density=0.5, skip=["nope"])
    with pytest.raises(ValueError, match="attention"):
        sparsify(model, density=0.5, attention="fast")
    with pytest.raises(TypeError, match="real number"):
        sparsify(model, density=True)
    with pytest.raises(ValueError, match="block_size=4 goes with layout='bsr'"):
        sparsify(model, density=0.5, block_size=4)


# ----------------------------------------------------------------------------------------------- double backward
@pytest.mark.parametrize("block_size", [1, 2])
def test_gradgradcheck(block_size, gen):
    mask = random_mask(6, 8, 0.5, gen, empty_rows=[1], empty_cols=[2])
    p = Pattern.from_mask(mask, block_size=block_size)
    v = torch.randn(p.values_shape, dtype=torch.float64, generator=gen, requires_grad=True)
    b = torch.randn(6, dtype=torch.float64, generator=gen, requires_grad=True)
    x = torch.randn(3, 8, dtype=torch.float64, generator=gen, requires_grad=True)
    f = lambda x, v, b: sparse_linear(x, v, p, b)  # noqa: E731
    assert torch.autograd.gradcheck(f, (x, v, b))
    assert torch.autograd.gradgradcheck(f, (x, v, b))


@pytest.mark.parametrize("block_size", [1, 4])
def test_gradient_penalty_matches_dense(block_size, gen):
    """A WGAN-GP-style penalty: ||d loss / d x||^2 backpropagated to the weights, against the dense float64 model."""
    layer = SparseLinear(16, 12, density=0.4, layout="csr" if block_size == 1 else "bsr",
                         block_size=None if block_size == 1 else block_size, dtype=torch.float64, generator=gen)
    lin = layer.to_dense()
    x = torch.randn(5, 16, dtype=torch.float64, generator=gen, requires_grad=True)

    def penalty(f):
        out = torch.tanh(f(x)).sum()
        g, = torch.autograd.grad(out, x, create_graph=True)
        return (g.norm(dim=1) - 1).square().mean()

    penalty(layer).backward()
    penalty(lin).backward()
    torch.testing.assert_close(layer.values.grad, layer.pattern.gather(lin.weight.grad))
    torch.testing.assert_close(layer.bias.grad, lin.bias.grad)


def test_hessian_vector_product_matches_dense(gen):
    layer = SparseLinear(7, 6, density=0.5, dtype=torch.float64, generator=gen)
    x = torch.randn(4, 7, dtype=torch.float64, generator=gen)
    vec = torch.randn(layer.nnz, dtype=torch.float64, generator=gen)
    loss = torch.sigmoid(layer(x)).square().sum()
    g, = torch.autograd.grad(loss, layer.values, create_graph=True)
    hv, = torch.autograd.grad(g @ vec, layer.values)
    w = layer.weight.detach().requires_grad_()
    loss_d = torch.sigmoid(x @ w.T + layer.bias.detach()).square().sum()
    gd, = torch.autograd.grad(loss_d, w, create_graph=True)
    hvd, = torch.autograd.grad((gd * layer.pattern.to_dense(vec)).sum(), w)
    torch.testing.assert_close(hv, layer.pattern.gather(hvd))


# ----------------------------------------------------------------------------------------------- construction
@pytest.mark.parametrize("kwargs,err,match", [
    (dict(density=True), TypeError, "density must be a real number"),
    (dict(density="0.1"), TypeError, "density must be a real number"),
    (dict(density=float("nan")), ValueError, "finite"),
    (dict(density=0.0), ValueError, r"\(0, 1\]"),
    (dict(density=1.5), ValueError, r"\(0, 1\]"),
    (dict(density=0.5, in_features="10"), TypeError, "in_features must be an int"),
    (dict(density=0.5, in_features=10.7), TypeError, "in_features must be an int"),
    (dict(density=0.5, out_features=True), TypeError, "out_features must be an int"),
    (dict(density=0.5, out_features=-2), ValueError, "out_features must be >= 0"),
    (dict(density=0.5, layout="bsr", block_size=0), ValueError, "block_size must be >= 1"),
    (dict(density=0.5, block_size=8), ValueError, "goes with layout='bsr'"),
    (dict(density=0.5, layout="coo"), ValueError, "layout must be"),
    (dict(density=0.5, dtype=torch.complex64), TypeError, "floating dtype"),
    (dict(density=0.5, dtype=torch.int64), TypeError, "floating dtype"),
    (dict(density=0.5, dtype="float32"), TypeError, "torch.dtype"),
    (dict(density=0.5, bias="yes"), TypeError, "bias must be a bool"),
    (dict(density=0.5, layout="bsr", block_size=3), ValueError, "must divide"),
])
def test_construction_checks(kwargs, err, match):
    args = dict(in_features=16, out_features=8)
    args.update(kwargs)
    with pytest.raises(err, match=match):
        SparseLinear(**args)


def test_pattern_and_layout_must_agree(gen):
    csr = Pattern.from_mask(random_mask(8, 8, 0.5, gen))
    with pytest.raises(ValueError, match="contradicts"):
        SparseLinear(8, 8, pattern=csr, layout="bsr")
    with pytest.raises(ValueError, match="contradicts"):
        SparseLinear(8, 8, pattern=csr, block_size=4)
    assert SparseLinear(8, 8, pattern=csr, layout="csr").block_size == 1


def _peak_mb_of(fn):
    from sparsecore.apps.train.report import peak_rss_mb, release_free_memory, reset_peak_rss, rss_mb

    release_free_memory()
    if not reset_peak_rss():
        pytest.skip("this OS cannot reset the peak RSS")
    start = rss_mb()
    out = fn()
    return out, peak_rss_mb() - start


def _raises(err, match, fn):
    with pytest.raises(err, match=match):
        fn()


def test_int32_overflow_refused_before_allocating():
    """2**39 entries asked for: refused from the density alone, not after allocating tens of GB."""
    _, mb = _peak_mb_of(lambda: _raises(ValueError, "int32", lambda: SparseLinear(2**20, 2**20, density=0.5)))
    assert mb < 50
    _, mb = _peak_mb_of(lambda: _raises(ValueError, "int32", lambda: sparsify(nn.Linear(4, 4), density=0.5) and
                                        SparseLinear(2**16, 2**16, density=1.0, layout="bsr", block_size=1)))
    assert mb < 50


def test_wide_layer_of_few_entries_allocates_only_its_index():
    """(4, 2**24) at density 1e-6: 67 entries; the column index colptr (64 MiB) is the one per-column array."""
    layer, mb = _peak_mb_of(lambda: SparseLinear(2**24, 4, density=1e-6))
    colptr_mb = layer.colptr.numel() * 4 / 2**20
    assert layer.nnz == round(4 * 2**24 * 1e-6)
    assert mb < 1.4 * colptr_mb + 16, (mb, colptr_mb)
    x = torch.zeros(1, 2**24)
    x[0, layer.col[:3].long()] = 1.0
    assert torch.isfinite(layer(x)).all()
