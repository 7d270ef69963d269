"""The Triton kernels (CSR and BSR: SpMM, transposed SpMM, SDDMM) under the Triton interpreter, on CPU tensors.

Every result is checked against a float64 dense reference built from the same (dtype-rounded) inputs. Sizes are
small: the interpreter runs each program in Python.
"""
import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported, and before the kernels' first call

import subprocess  # noqa: E402
import sys  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")

import triton_kernels as tk  # noqa: E402
from sparsecore.pattern import Pattern  # noqa: E402

HALF = [torch.float16, torch.bfloat16]
RTOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _interpreted(fn):
    return type(fn).__name__ == "InterpretedFunction"


@pytest.fixture(scope="module", autouse=True)
def _interpreter():
    import triton_kernels.bsr as bsr
    import triton_kernels.csr as csr
    if not (_interpreted(csr._kernels()["_csr_spmm_kernel"]) and _interpreted(bsr._kernels()["_bsr_spmm_kernel"])):
        pytest.skip("the kernels were jitted for a GPU before TRITON_INTERPRET=1 was set in this process")


def close(out, ref, dtype):
    """out (dtype) against a float64 reference: relative to the output's scale, with the dtype's rounding."""
    assert out.dtype == dtype
    assert out.shape == ref.shape
    scale = max(float(ref.abs().max()), 1.0) if ref.numel() else 1.0
    rtol = RTOL[dtype]
    torch.testing.assert_close(out.double(), ref, rtol=rtol, atol=rtol * 0.1 * scale)


def rounded(t, dtype):
    """t cast to dtype (what the kernel sees) and its exact float64 value (what the reference uses)."""
    t = t.to(dtype)
    return t, t.double()


def half_inputs(p, w, batch, dtype, seed):
    """Values, x, dy and bias of a half-precision test, each as (dtype tensor, its exact float64 value), and the
    float64 dense weight the kernels see."""
    out_f, in_f = w.shape
    g = torch.Generator().manual_seed(seed)
    v, v64 = rounded(p.gather(w), dtype)
    x = rounded(torch.randn(batch, in_f, generator=g), dtype)
    dy = rounded(torch.randn(batch, out_f, generator=g), dtype)
    bias = rounded(torch.randn(out_f, generator=g), dtype)
    return v, x, dy, bias, p.to_dense(v64)


def make_csr(out_f, in_f, density, seed, empty_row=None, empty_col=None):
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(out_f, in_f, generator=g) < density
    if empty_row is not None:
        mask[empty_row] = False
    if empty_col is not None:
        mask[:, empty_col] = False
    p = Pattern.from_mask(mask)
    w = torch.randn(out_f, in_f, generator=g) * mask
    return p, w


def make_bsr(out_f, in_f, bs, density, seed, empty_brow=None, empty_bcol=None):
    g = torch.Generator().manual_seed(seed)
    bm = torch.rand(out_f // bs, in_f // bs, generator=g) < density
    bm[-1, 0] = True  # at least one block
    if empty_brow is not None:
        bm[empty_brow] = False
    if empty_bcol is not None:
        bm[:, empty_bcol] = False
    mask = bm.repeat_interleave(bs, 0).repeat_interleave(bs, 1)
    p = Pattern.from_mask(mask, block_size=bs)
    w = torch.randn(out_f, in_f, generator=g) * mask
    return p, w


# ============================================================================================= CSR
CSR_CASES = [
    # (out, in, batch, density, empty row, empty col)
    pytest.param(13, 11, 7, 0.35, 3, 4, id="odd-empty-row-col"),
    pytest.param(9, 150, 70, 0.8, None, None, id="long-rows-2-batch-tiles"),
    pytest.param(37, 21, 1, 0.3, 0, 20, id="batch1"),
]


@pytest.mark.parametrize("out_f,in_f,batch,density,er,ec", CSR_CASES)
@pytest.mark.parametrize("with_bias", [True, False])
def test_csr_fp32(out_f, in_f, batch, density, er, ec, with_bias, index_form):
    p, w = make_csr(out_f, in_f, density, seed=out_f + batch, empty_row=er, empty_col=ec)
    g = torch.Generator().manual_seed(1)
    v = p.gather(w)
    x = torch.randn(batch, in_f, generator=g)
    dy = torch.randn(batch, out_f, generator=g)
    bias = torch.randn(out_f, generator=g) if with_bias else None
    w64 = w.double()

    y = tk.csr_spmm(x, v, p.rowptr, p.col, out_f, bias)
    ref = x.double() @ w64.T + (bias.double() if with_bias else 0)
    close(y, ref, torch.float32)
    assert y.is_contiguous()
    if er is not None:  # an empty row gives the bias (or zero) exactly
        torch.testing.assert_close(y[:, er], bias[er].expand(batch) if with_bias else torch.zeros(batch))

    dx = tk.csr_spmm_t(dy, v, p.colptr, p.row, p.perm, in_f, rowptr=p.rowptr)
    close(dx, dy.double() @ w64, torch.float32)
    if ec is not None:
        assert torch.equal(dx[:, ec], torch.zeros(batch))

    dv = tk.csr_sddmm(dy, x, p.rowptr, p.col)
    close(dv, p.gather(dy.double().T @ x.double()), torch.float32)


def test_csr_single_nonzero():
    mask = torch.zeros(5, 6, dtype=torch.bool)
    mask[2, 4] = True
    p = Pattern.from_mask(mask)
    v = torch.tensor([1.5])
    x, dy = torch.randn(3, 6), torch.randn(3, 5)
    w = p.to_dense(v).double()
    close(tk.csr_spmm(x, v, p.rowptr, p.col, 5), x.double() @ w.T, torch.float32)
    close(tk.csr_spmm_t(dy, v, p.colptr, p.row, p.perm, 6, rowptr=p.rowptr), dy.double() @ w, torch.float32)
    close(tk.csr_sddmm(dy, x, p.rowptr, p.col), (dy[:, 2].double() * x[:, 4].double()).sum().reshape(1),
          torch.float32)


def test_csr_empty_pattern():
    p = Pattern.from_mask(torch.zeros(4, 3, dtype=torch.bool))
    v, x, dy, bias = torch.zeros(0), torch.randn(2, 3), torch.randn(2, 4), torch.randn(4)
    torch.testing.assert_close(tk.csr_spmm(x, v, p.rowptr, p.col, 4, bias), bias.expand(2, 4))
    assert torch.equal(tk.csr_spmm_t(dy, v, p.colptr, p.row, p.perm, 3, rowptr=p.rowptr), torch.zeros(2, 3))
    assert tk.csr_sddmm(dy, x, p.rowptr, p.col).shape == (0,)


def test_csr_non_contiguous():
    out_f, in_f, batch = 10, 12, 5
    p, w = make_csr(out_f, in_f, 0.4, seed=3)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(in_f, batch, generator=g).t()  # feature-major view
    dy = torch.randn(batch, 2 * out_f, generator=g)[:, ::2]  # strided columns
    v = torch.stack([p.gather(w), torch.randn(p.nnz, generator=g)], 1)[:, 0]  # stride 2
    bias = torch.randn(2 * out_f, generator=g)[::2]
    assert not (x.is_contiguous() or dy.is_contiguous() or v.is_contiguous() or bias.is_contiguous())
    w64 = w.double()
    close(tk.csr_spmm(x, v, p.rowptr, p.col, out_f, bias), x.double() @ w64.T + bias.double(), torch.float32)
    close(tk.csr_spmm_t(dy, v, p.colptr, p.row, p.perm, in_f, rowptr=p.rowptr), dy.double() @ w64, torch.float32)
    close(tk.csr_sddmm(dy, x, p.rowptr, p.col), p.gather(dy.double().T @ x.double()), torch.float32)


@pytest.mark.parametrize("dtype", HALF)
def test_csr_half(dtype):
    out_f, in_f, batch = 13, 19, 9
    p, w = make_csr(out_f, in_f, 0.5, seed=5, empty_row=2)
    v, (x, x64), (dy, dy64), (bias, b64), w64 = half_inputs(p, w, batch, dtype, seed=4)
    close(tk.csr_spmm(x, v, p.rowptr, p.col, out_f, bias), x64 @ w64.T + b64, dtype)
    close(tk.csr_spmm_t(dy, v, p.colptr, p.row, p.perm, in_f, rowptr=p.rowptr), dy64 @ w64, dtype)
    close(tk.csr_sddmm(dy, x, p.rowptr, p.col), p.gather(dy64.T @ x64), dtype)


# ============================================================================================= BSR
BSR_CASES = [
    # (block size, out, in, batch, density, empty block row, empty block col)
    pytest.param(16, 48, 64, 130, 0.5, 0, 3, id="bs16-2-batch-tiles"),
    pytest.param(32, 64, 96, 1, 0.6, None, 0, id="bs32-batch1"),
    pytest.param(64, 128, 128, 3, 0.5, 1, None, id="bs64"),
    pytest.param(8, 24, 40, 9, 0.5, 1, 2, id="bs8-padded"),
    pytest.param(3, 9, 12, 4, 0.6, None, None, id="bs3-padded"),
]


@pytest.mark.parametrize("bs,out_f,in_f,batch,density,er,ec", BSR_CASES)
def test_bsr_fp32(bs, out_f, in_f, batch, density, er, ec):
    p, w = make_bsr(out_f, in_f, bs, density, seed=bs, empty_brow=er, empty_bcol=ec)
    g = torch.Generator().manual_seed(7)
    v = p.gather(w)
    x = torch.randn(batch, in_f, generator=g)
    dy = torch.randn(batch, out_f, generator=g)
    bias = torch.randn(out_f, generator=g) if bs != 32 else None  # one case without bias
    w64 = w.double()

    y = tk.bsr_spmm(x, v, p.rowptr, p.col, out_f, bias)
    close(y, x.double() @ w64.T + (bias.double() if bias is not None else 0), torch.float32)
    dx = tk.bsr_spmm_t(dy, v, p.colptr, p.row, p.perm, in_f)
    close(dx, dy.double() @ w64, torch.float32)
    if ec is not None:
        assert torch.equal(dx[:, ec * bs:(ec + 1) * bs], torch.zeros(batch, bs))
    dv = tk.bsr_sddmm(dy, x, p.rowptr, p.col, bs)
    assert dv.shape == (p.nnz, bs, bs)
    close(dv, p.gather(dy.double().T @ x.double()), torch.float32)


def test_bsr_non_contiguous_and_empty():
    bs, out_f, in_f, batch = 16, 32, 48, 5
    p, w = make_bsr(out_f, in_f, bs, 0.5, seed=11)
    g = torch.Generator().manual_seed(8)
    x = torch.randn(in_f, batch, generator=g).t()
    dy = torch.randn(batch, 2 * out_f, generator=g)[:, ::2]
    v = p.gather(w).transpose(1, 2).contiguous().transpose(1, 2)  # same values, column-major blocks
    assert not (x.is_contiguous() or dy.is_contiguous() or v.is_contiguous())
    w64 = w.double()
    close(tk.bsr_spmm(x, v, p.rowptr, p.col, out_f), x.double() @ w64.T, torch.float32)
    close(tk.bsr_spmm_t(dy, v, p.colptr, p.row, p.perm, in_f), dy.double() @ w64, torch.float32)
    close(tk.bsr_sddmm(dy, x, p.rowptr, p.col, bs), p.gather(dy.double().T @ x.double()), torch.float32)

    e = Pattern.from_mask(torch.zeros(out_f, in_f, dtype=torch.bool), block_size=bs)
    bias = torch.randn(out_f)
    torch.testing.assert_close(tk.bsr_spmm(x, torch.zeros(0, bs, bs), e.rowptr, e.col, out_f, bias),
                               bias.expand(batch, out_f))
    assert tk.bsr_sddmm(dy, x, e.rowptr, e.col, bs).shape == (0, bs, bs)


@pytest.mark.parametrize("dtype", HALF)
def test_bsr_half(dtype):
    bs, out_f, in_f, batch = 16, 32, 64, 20
    p, w = make_bsr(out_f, in_f, bs, 0.6, seed=12, empty_bcol=1)
    v, (x, x64), (dy, dy64), (bias, b64), w64 = half_inputs(p, w, batch, dtype, seed=9)
    close(tk.bsr_spmm(x, v, p.rowptr, p.col, out_f, bias), x64 @ w64.T + b64, dtype)
    close(tk.bsr_spmm_t(dy, v, p.colptr, p.row, p.perm, in_f), dy64 @ w64, dtype)
    close(tk.bsr_sddmm(dy, x, p.rowptr, p.col, bs), p.gather(dy64.T @ x64), dtype)


# ============================================================================================= through the op
def test_sparse_linear_autograd_on_triton_backend(index_form):
    """The custom op with autograd, dispatched to these kernels (backend "triton" on CPU tensors)."""
    import sparsecore
    p, w = make_csr(12, 10, 0.4, seed=13)
    values = p.gather(w).requires_grad_()
    bias = torch.randn(12, requires_grad=True)
    x = torch.randn(6, 10, requires_grad=True)
    with sparsecore.use_backend("triton"):
        y = sparsecore.sparse_linear(x, values, p, bias)
        y.square().sum().backward()
    wd = w.double().requires_grad_()
    xd, bd = x.detach().double().requires_grad_(), bias.detach().double().requires_grad_()
    yd = xd @ wd.T + bd
    yd.square().sum().backward()
    close(y.detach(), yd.detach(), torch.float32)
    close(x.grad, xd.grad, torch.float32)
    close(values.grad, p.gather(wd.grad), torch.float32)
    close(bias.grad, bd.grad, torch.float32)


# ============================================================================================= bad inputs
def _csr():
    p, w = make_csr(6, 5, 0.5, seed=21)
    return p, p.gather(w), torch.randn(3, 5), torch.randn(3, 6)


def test_csr_bad_inputs():
    p, v, x, dy = _csr()
    with pytest.raises(ValueError, match="rowptr must have 6 elements"):
        tk.csr_spmm(x, v, p.rowptr, p.col, 5)
    with pytest.raises(ValueError, match="values has"):
        tk.csr_spmm(x, v[1:], p.rowptr, p.col, 6)
    with pytest.raises(ValueError, match="x must be 2-D"):
        tk.csr_spmm(x[0], v, p.rowptr, p.col, 6)
    with pytest.raises(TypeError, match="col must be an int32"):
        tk.csr_spmm(x, v, p.rowptr, p.col.long(), 6)
    with pytest.raises(TypeError, match="perm must be an int32"):
        tk.csr_spmm_t(dy, v, p.colptr, p.row, p.perm.long(), 5)
    assert p.compact  # int16 row and perm (offsets inside rows): W's rowptr is needed, and both in one form
    with pytest.raises(ValueError, match="needs W's rowptr"):
        tk.csr_spmm_t(dy, v, p.colptr, p.row, p.perm, 5)
    with pytest.raises(TypeError, match="both be int32 or both int16"):
        tk.csr_spmm_t(dy, v, p.colptr, p.row.int(), p.perm, 5, rowptr=p.rowptr)
    with pytest.raises(TypeError, match="must match"):
        tk.csr_spmm(x.half(), v, p.rowptr, p.col, 6)
    with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
        tk.csr_spmm(x.double(), v.double(), p.rowptr, p.col, 6)
    with pytest.raises(ValueError, match="bias must have"):
        tk.csr_spmm(x, v, p.rowptr, p.col, 6, torch.randn(5))
    with pytest.raises(ValueError, match="same batch size"):
        tk.csr_sddmm(dy, x[:2], p.rowptr, p.col)
    with pytest.raises(ValueError, match="one device"):
        tk.csr_spmm(x.to("meta"), v, p.rowptr, p.col, 6)
    with pytest.raises(ValueError, match="one device"):
        tk.csr_sddmm(dy, x, p.rowptr.to("meta"), p.col)
    with pytest.raises(TypeError, match="n_out must be an int"):
        tk.csr_spmm(x, v, p.rowptr, p.col, 6.0)


def test_bsr_bad_inputs():
    p, w = make_bsr(32, 48, 16, 0.5, seed=22)
    v, x, dy = p.gather(w), torch.randn(3, 48), torch.randn(3, 32)
    with pytest.raises(ValueError, match="not a multiple of the block size"):
        tk.bsr_spmm(x[:, :40], v, p.rowptr, p.col, 32)
    with pytest.raises(ValueError, match="values must have shape"):
        tk.bsr_spmm(x, v[:, :, :8], p.rowptr, p.col, 32)
    with pytest.raises(ValueError, match="rowptr must have 3 elements"):
        tk.bsr_sddmm(dy, x, p.rowptr[:-1], p.col, 16)
    with pytest.raises(TypeError, match="row must be an int32"):
        tk.bsr_spmm_t(dy, v, p.colptr, p.row.long(), p.perm, 48)
    with pytest.raises(ValueError, match="at most 128"):
        tk.bsr_sddmm(torch.randn(2, 256), torch.randn(2, 256), torch.tensor([0, 0], dtype=torch.int32),
                     torch.zeros(0, dtype=torch.int32), 256)
    with pytest.raises(ValueError, match="one device"):
        tk.bsr_spmm(x, v.to("meta"), p.rowptr, p.col, 32)


def test_import_without_triton():
    """Without triton the package imports, says so, and its kernels raise a clear error."""
    code = (
        "import sys; sys.modules['triton'] = None; sys.modules['triton.language'] = None\n"
        "import triton_kernels as tk, torch\n"
        "assert not tk.available()\n"
        "try:\n"
        "    tk.csr_spmm(torch.randn(2, 3), torch.ones(1), torch.tensor([0, 1], dtype=torch.int32),\n"
        "                torch.tensor([0], dtype=torch.int32), 1)\n"
        "except RuntimeError as e:\n"
        "    assert 'triton installed' in str(e), e\n"
        "else:\n"
        "    raise AssertionError('no error')\n"
    )
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=_no_interpreter_env(), capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr


_AOT = r"""
import sys
import torch
import triton_kernels.csr as csr

ck = csr._kernels()
try:  # compiled (not interpreted) kernels refuse CPU tensors with a clear error
    csr.csr_spmm(torch.randn(2, 3), torch.ones(1), torch.tensor([0, 1], dtype=torch.int32),
                 torch.tensor([0], dtype=torch.int32), 1)
except ValueError as e:
    assert "need CUDA tensors" in str(e), e
else:
    raise AssertionError("no error for CPU tensors")
sys.path.insert(0, "tests")
import aot_sm90 as aot
why = aot.supported()
if why or sys.argv[1:] == ["check-only"]:
    print("compiled 0", why); sys.exit(0)
# every candidate configuration of the bf16 forward and dW launches (the tensor-core path the interpreter never
# runs; dX is the forward kernel over the transpose index), the default one of a spread of the others: ~30
# compiles, ~20 s on two cores
everything = aot.launches(dtypes=(torch.bfloat16, torch.float16, torch.float32), block_sizes=(16, 32, 64, 128))
full = {"csr fwd bfloat16", "csr dw bfloat16", "bsr64 fwd bfloat16", "bsr64 dw bfloat16"}
default = {"csr dx bfloat16", "bsr16 fwd bfloat16", "bsr16 dw bfloat16", "csr fwd float32", "bsr32 fwd float32",
           "bsr32 dw float32", "csr dw float16", "bsr128 fwd float16", "bsr128 dw float16"}
n = 0
for label in sorted(full | default):
    for rec in everything[label]:
        for cfg in (rec.candidates if label in full else [rec.default]):
            r = aot.compile_sm90(rec, cfg)
            n += 1
            where = f"{label} {cfg}: {r}"
            assert r.regs > 0, where
            # pipelined loops copy asynchronously (cp.async): the loads of a later iteration are in flight
            assert r.ops["LDGSTS"] > 0, where
            if label.startswith("bsr") and "float32" not in label:  # 16-bit dots run on tensor cores
                assert r.ops["HGMMA"] + r.ops["HMMA"] > 0, where
print("compiled", n)
"""


def _no_interpreter_env():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    return env


def test_without_interpreter_cpu_error_and_compile_for_sm90():
    """Without the interpreter, CPU tensors get a clear error; and the kernels compile ahead of time for an H100
    (sm_90) without a GPU, with Triton's own argument specialization (tests/aot_sm90.py), which catches what the
    interpreter lets through (tl.dot shapes, layouts, types, tl.range pipelining): every autotune configuration
    in bfloat16, the default one in float16 and float32. Skipped where this triton lacks the internals used."""
    r = subprocess.run([sys.executable, "-c", _AOT], cwd=REPO, env=_no_interpreter_env(), capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0 and "compiled" in r.stdout, (r.stdout + r.stderr)[-3000:]
    n = int(r.stdout.split("compiled", 1)[1].split()[0])
    if n == 0:
        pytest.skip(f"checked the CPU-tensor error only: {r.stdout.strip()}")
