import contextlib
import os
import sys

import pytest
import torch

from sparsecore import _C, sparse_linear

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


def load_bench_script(name: str):
    """The module of ``bench/<name>.py`` (the bench scripts are not a package), registered in sys.modules under
    ``name`` (dataclasses look their module up there)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "bench", name + ".py"))
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


def random_mask(out_f, in_f, density, gen, empty_rows=(), empty_cols=()):
    """A bool (out, in) mask with the given rows and columns forced empty."""
    m = torch.rand(out_f, in_f, generator=gen) < density
    for r in empty_rows:
        m[r] = False
    for c in empty_cols:
        m[:, c] = False
    return m


# The instruction-set caps of the CPU kernels, narrowest first: each selects a compiled copy ("avx512bf16" is the
# AVX-512 copy plus the bf16 kernels' AVX512-BF16 code).
ISAS = ["generic", "avx2", "avx512", "avx512bf16"]


def isa_supported(isa):
    return ISAS.index(isa) <= ISAS.index(_C.cpu_isa())


@pytest.fixture(params=ISAS)
def isa(request):
    """Run the test with the CPU kernels capped at each instruction set the CPU supports (others are skipped);
    the cap in force before (the default, or $SPARSECORE_MAX_ISA) is restored afterwards."""
    if not isa_supported(request.param):
        pytest.skip(f"this CPU does not support {request.param} (widest: {_C.cpu_isa()})")
    old = _C.kernel_isa()
    _C._set_max_isa(request.param)
    try:
        assert _C.kernel_isa() == request.param
        yield request.param
    finally:
        _C._set_max_isa(old)


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(1234)


@contextlib.contextmanager
def torch_threads(n: int):
    """torch's intra-op thread count set to n inside the block, restored after."""
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield n
    finally:
        torch.set_num_threads(old)


@pytest.fixture
def threads(request):
    """torch's thread count for the test, from ``parametrize("threads", [...], indirect=True)``; restored after."""
    with torch_threads(request.param) as n:
        yield n


@pytest.fixture(params=["compact", "int32"])
def index_form(request, monkeypatch):
    """Run the test with the patterns it builds in each index form: compact (int16 col, row and perm offsets, what
    every test-sized CSR pattern gets) and int32 (what layers wider than 32768 get), by lowering the limit."""
    import sparsecore.pattern

    if request.param == "int32":
        monkeypatch.setattr(sparsecore.pattern, "COMPACT_MAX_DIM", 0)
    return request.param


def reference(x, w, b, dy):
    x64, w64 = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    b64 = None if b is None else b.detach().double().requires_grad_()
    y = x64 @ w64.T + (0 if b64 is None else b64)
    y.backward(dy.double())
    return y, x64.grad, w64.grad, (None if b64 is None else b64.grad)


def tol(dtype):
    return dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-10)


def check_step_vs_reference(p, w, batch, gen):
    """One forward + backward of sparse_linear with pattern p and dense weights w (zero off the pattern), against
    the float64 dense reference: output and the gradients of the input, the values and the bias."""
    out_f, in_f = w.shape
    dtype = w.dtype
    values = p.gather(w).requires_grad_()
    bias = torch.randn(out_f, generator=gen, dtype=dtype, requires_grad=True)
    x = torch.randn(batch, in_f, generator=gen, dtype=dtype, requires_grad=True)
    dy = torch.randn(batch, out_f, generator=gen, dtype=dtype)
    y = sparse_linear(x, values, p, bias)
    y.backward(dy)
    y_ref, dx_ref, dw_ref, db_ref = reference(x, w, bias, dy)
    t = tol(dtype)
    torch.testing.assert_close(y.double(), y_ref.detach(), **t)
    torch.testing.assert_close(x.grad.double(), dx_ref, **t)
    torch.testing.assert_close(values.grad.double(), p.gather(dw_ref), **t)
    torch.testing.assert_close(bias.grad.double(), db_ref, **t)
    assert y.dtype == dtype and values.grad.shape == values.shape


@pytest.fixture(autouse=True)
def _threads_even_for_small_kernels():
    """Small kernels run on one thread (below _C's minimum work per thread); the tests' sizes are small, so they
    lift that minimum, or the multi-threaded work splits would never run here."""
    _C._set_min_work_per_thread(0)
    yield
    _C._set_min_work_per_thread(-1)
