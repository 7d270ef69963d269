"""The Triton kernels compiled for a CUDA GPU, not the interpreter: every kernel (CSR, BSR 16/32/64; forward, dX,
dW; float32/bfloat16/float16) and every autotune configuration against a float64 reference at realistic sizes,
autocast, SparseLinear training steps against a dense masked float64 model, CUDA graphs, streams and devices.
Skipped without a CUDA device.

It must run in a process where TRITON_INTERPRET is unset when the kernels are first called, so:

* ``bench/gpu_check.py`` runs it on its own: ``python -m pytest --noconftest tests/test_cuda.py`` (the
  ``smoke`` tests first, one kernel family per process; ``autocast`` separately);
* in a whole-suite run (the interpreter tests set TRITON_INTERPRET=1 at import), every test here skips except
  ``test_in_a_clean_process``, which reruns this module in a subprocess without it.

Rehearsal without a GPU: ``SPARSECORE_CUDA_TESTS_ON=cpu`` runs this module on CPU tensors under the interpreter
at sizes divided by 16 (the CUDA-only tests skip), to check the tests themselves before a GPU run is spent::

    SPARSECORE_CUDA_TESTS_ON=cpu python -m pytest -q --noconftest tests/test_cuda.py

Unwritten outputs show: each test runs with ``torch.use_deterministic_algorithms(True, warn_only=True)``, under
which ``torch.empty`` fills float tensors with NaN (the kernels allocate their outputs with it). The kernel-level
tests build their patterns in plain torch (tests/torch_index.py), so they run even if ``sparsecore._C`` did not
build; the layer tests need it.
"""
import os
import subprocess
import sys

os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS under deterministic mode, before CUDA init
REHEARSAL = os.environ.get("SPARSECORE_CUDA_TESTS_ON", "") == "cpu"
if REHEARSAL:
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

TESTS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(TESTS)
for p in (ROOT, TESTS):
    if p not in sys.path:
        sys.path.insert(0, p)

from torch_index import csr_index  # noqa: E402

CUDA = torch.cuda.is_available()
DEV = "cpu" if REHEARSAL else "cuda"
SCALE = 16 if REHEARSAL else 1  # sizes are divided by this in a CPU rehearsal
pytestmark = [
    pytest.mark.skipif(not (CUDA or REHEARSAL), reason="needs a CUDA device (torch.cuda.is_available() is False)"),
    # deterministic mode (for the NaN fill) warns about torch ops of the reference code; not the point here
    pytest.mark.filterwarnings("ignore::UserWarning"),
]

F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16
DTYPES = [F32, BF16, F16]
# relative to the output's scale (max |ref|): float32 accumulation of ~3000 terms; one final 16-bit rounding
RTOL = {F32: 1e-5, BF16: 1.6e-2, F16: 2e-3}
LAYOUTS = ["csr", "bsr16", "bsr32", "bsr64"]


def _interpreted() -> bool:
    import triton_kernels.csr as csr
    from triton_kernels import _common as C
    return C.is_interpreted(csr._kernels()["_csr_spmm_kernel"])


def S(n: int, multiple: int = 1) -> int:
    """A size n, divided by SCALE in a rehearsal (and kept a multiple of ``multiple``, at least one)."""
    return max(multiple, n // SCALE // multiple * multiple)


needs_cuda = pytest.mark.skipif(REHEARSAL, reason="CUDA only (streams, graphs, devices): not in a CPU rehearsal")


@needs_cuda
def test_in_a_clean_process():
    """Whole-suite run on a GPU machine: the kernels are interpreted in this process, so run this module again
    in one where TRITON_INTERPRET is unset."""
    if not os.environ.get("TRITON_INTERPRET"):
        pytest.skip("TRITON_INTERPRET is unset: the tests of this module run here directly")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "--noconftest", "-p", "no:cacheprovider",
                        os.path.join(TESTS, "test_cuda.py")], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=1800)
    assert r.returncode == 0, (r.stdout + r.stderr)[-6000:]


@pytest.fixture(autouse=True)
def _compiled_and_nan_filled(request):
    if request.node.name == "test_in_a_clean_process":
        yield
        return
    if REHEARSAL:
        if not _interpreted():
            pytest.skip("the kernels were compiled in this process: a rehearsal needs the interpreter")
    elif os.environ.get("TRITON_INTERPRET") or _interpreted():
        pytest.skip("TRITON_INTERPRET is set in this process (test_in_a_clean_process reruns this module)")
    was, warn = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    fill = torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(was, warn_only=warn)
        torch.utils.deterministic.fill_uninitialized_memory = fill
    if CUDA and not REHEARSAL:
        torch.cuda.synchronize()  # a fault in this test surfaces in this test


@pytest.fixture
def no_autotune(monkeypatch):
    """One heuristic configuration per launch (test_every_config covers the others; the smoke tests autotune)."""
    monkeypatch.setenv("SPARSECORE_TRITON_AUTOTUNE", "0")


# ============================================================================================= helpers
def close(out, ref, dtype, what=""):
    """out (dtype) against a float64 reference, relative to the reference's scale; no NaN (unwritten) allowed."""
    assert out.dtype == dtype, what
    assert out.shape == ref.shape, what
    assert not torch.isnan(out).any(), f"{what}: NaN in the output (unwritten elements?)"
    scale = max(float(ref.abs().max()), 1.0) if ref.numel() else 1.0
    err = float((out.double() - ref).abs().max()) / scale if ref.numel() else 0.0
    assert err <= RTOL[dtype], f"{what}: max error {err:.3g} of the scale {scale:.3g} > {RTOL[dtype]:.1g}"


class Case:
    """A random weight (csr or bsr<bs>) with inputs, each rounded to ``dtype``, and their exact float64 values.

    The pattern is random at ``density`` (at least one block), or the (block) mask ``bm`` as given, empty too.
    """

    def __init__(self, layout, out_f, in_f, batch, density, dtype, seed=0, empty_row=None, empty_col=None,
                 bm=None):
        g = torch.Generator(device=DEV).manual_seed(seed)
        self.bs = 1 if layout == "csr" else int(layout[3:])
        bs = self.bs
        if bm is None:
            bm = torch.rand(out_f // bs, in_f // bs, generator=g, device=DEV) < density
            if empty_row is not None:  # (modulo: the rehearsal's smaller grids)
                bm[empty_row % bm.shape[0]] = False
            if empty_col is not None:
                bm[:, empty_col % bm.shape[1]] = False
            if not bm.any():
                bm[-1, -1] = True
        self.rowptr, self.col, self.colptr, self.row, self.perm = csr_index(bm.to(DEV))
        self.mask = bm.to(DEV).repeat_interleave(bs, 0).repeat_interleave(bs, 1)
        w = torch.randn(out_f, in_f, generator=g, device=DEV) * self.mask

        def rnd(t):
            t = t.to(dtype)
            return t, t.double()

        self.w = w.to(dtype).double()  # the weight the kernels see
        self.values = self.gather(w.to(dtype))
        self.x, self.x64 = rnd(torch.randn(batch, in_f, generator=g, device=DEV))
        self.dy, self.dy64 = rnd(torch.randn(batch, out_f, generator=g, device=DEV))
        self.b, self.b64 = rnd(torch.randn(out_f, generator=g, device=DEV))
        self.dtype, self.out_f, self.in_f = dtype, out_f, in_f

    def gather(self, dense):
        """Values of a dense (out, in) tensor at the pattern, in CSR order: (nnz,) or (nnzb, bs, bs)."""
        bs = self.bs
        r = torch.repeat_interleave(torch.arange(self.rowptr.numel() - 1, device=DEV),
                                    (self.rowptr[1:] - self.rowptr[:-1]).long())
        c = self.col.long()
        if bs == 1:
            return dense[r, c]
        blocks = dense.reshape(dense.shape[0] // bs, bs, dense.shape[1] // bs, bs).permute(0, 2, 1, 3)
        return blocks[r, c].contiguous()

    def fwd(self, x=None, values=None, bias=True):
        import triton_kernels as tk
        x = self.x if x is None else x
        v = self.values if values is None else values
        b = self.b if bias else None
        if self.bs == 1:
            return tk.csr_spmm(x, v, self.rowptr, self.col, self.out_f, b)
        return tk.bsr_spmm(x, v, self.rowptr, self.col, self.out_f, b)

    def dx(self, dy=None, values=None):
        import triton_kernels as tk
        dy = self.dy if dy is None else dy
        v = self.values if values is None else values
        if self.bs == 1:
            return tk.csr_spmm_t(dy, v, self.colptr, self.row, self.perm, self.in_f, rowptr=self.rowptr)
        return tk.bsr_spmm_t(dy, v, self.colptr, self.row, self.perm, self.in_f)

    def dw(self, dy=None, x=None):
        import triton_kernels as tk
        dy = self.dy if dy is None else dy
        x = self.x if x is None else x
        if self.bs == 1:
            return tk.csr_sddmm(dy, x, self.rowptr, self.col)
        return tk.bsr_sddmm(dy, x, self.rowptr, self.col, self.bs)

    def check_all(self, what):
        close(self.fwd(), self.x64 @ self.w.T + self.b64, self.dtype, f"{what} forward")
        close(self.fwd(bias=False), self.x64 @ self.w.T, self.dtype, f"{what} forward without bias")
        close(self.dx(), self.dy64 @ self.w, self.dtype, f"{what} dX")
        close(self.dw(), self.gather(self.dy64.T @ self.x64), self.dtype, f"{what} dW")


def _shape(layout):
    """Realistic, not round: CSR 2000x3000 at 5%, BSR 2048x3072 at 20% (multiples of 64); batch 1000."""
    if layout == "csr":
        return dict(out_f=S(2000), in_f=S(3000), batch=S(1000), density=0.05)
    return dict(out_f=S(2048, 64), in_f=S(3072, 64), batch=S(1000), density=0.2)


# ============================================================================================= smoke (own processes)
@pytest.mark.parametrize("dtype", [BF16, F32], ids=["bf16", "fp32"])
def test_smoke_csr(dtype):
    """Bench-sized CSR kernels (4096x4096 at 1%, batch 4096), autotuned as in the benchmark."""
    n = S(4096)
    Case("csr", n, n, n, 0.01 * SCALE, dtype, seed=1, empty_row=5, empty_col=9).check_all("csr smoke")


@pytest.mark.parametrize("layout,dtype", [("bsr16", BF16), ("bsr32", BF16), ("bsr64", BF16), ("bsr32", F32)],
                         ids=["bs16-bf16", "bs32-bf16", "bs64-bf16", "bs32-fp32"])
def test_smoke_bsr(layout, dtype):
    """Bench-sized BSR kernels (4096x4096 at 10% and 1%: the SDDMM splits at 1%), autotuned."""
    n = S(4096, 64)
    for density in (0.1, 0.01):
        Case(layout, n, n, S(4096), density, dtype, seed=2, empty_row=1, empty_col=2).check_all(
            f"{layout} smoke d={density}")


# ============================================================================================= every kernel
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_kernels_vs_float64(layout, dtype, no_autotune):
    """Forward (with and without bias), dX and dW; an empty row and column of blocks; a 1000-row batch."""
    Case(layout, **_shape(layout), dtype=dtype, seed=3, empty_row=7, empty_col=11).check_all(f"{layout} {dtype}")


@pytest.mark.parametrize("dtype", [F32, BF16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_edge_cases(layout, dtype, no_autotune):
    bs = 1 if layout == "csr" else int(layout[3:])
    # batch 1 and an odd batch of 4097 (partial tiles everywhere)
    for batch in (1, S(4097) | 1):
        Case(layout, 4 * 64, 6 * 64, batch, 0.3, dtype, seed=4).check_all(f"{layout} batch {batch}")
    # a single nonzero (block)
    bm = torch.zeros(256 // bs, 384 // bs, dtype=torch.bool)
    bm[2, 3] = True
    Case(layout, 256, 384, 33, 0.0, dtype, seed=5, bm=bm).check_all(f"{layout} one nonzero")
    # a long row: one full row (of blocks) across 8192 inputs (many chunks), the others at 2%
    n = S(8192, 64)
    bm = torch.rand(128 // bs, n // bs, generator=torch.Generator().manual_seed(6)) < 0.02
    bm[0] = True
    Case(layout, 128, n, 70, 0.0, dtype, seed=6, bm=bm).check_all(f"{layout} long row")
    # non-contiguous inputs: a feature-major x, a strided dy, strided values
    c = Case(layout, 512, 768, S(200), 0.2, dtype, seed=7)
    x = c.x.t().contiguous().t()
    dy = torch.zeros(S(200), 2 * 512, dtype=dtype, device=DEV)
    dy[:, ::2] = c.dy
    dy = dy[:, ::2]
    v = torch.stack([c.values, torch.full_like(c.values, float("nan"))], dim=-1)[..., 0]
    assert not (x.is_contiguous() or dy.is_contiguous() or v.is_contiguous())
    close(c.fwd(x=x, values=v), c.x64 @ c.w.T + c.b64, dtype, f"{layout} non-contiguous forward")
    close(c.dx(dy=dy, values=v), c.dy64 @ c.w, dtype, f"{layout} non-contiguous dX")
    close(c.dw(dy=dy, x=x), c.gather(c.dy64.T @ c.x64), dtype, f"{layout} non-contiguous dW")
    # an empty pattern: the bias, zeros
    c = Case(layout, 256, 384, 9, 0.0, dtype, seed=8, bm=torch.zeros(256 // bs, 384 // bs, dtype=torch.bool))
    assert c.col.numel() == 0
    torch.testing.assert_close(c.fwd(), c.b.expand(9, 256))
    assert torch.equal(c.dx(), torch.zeros(9, 384, dtype=dtype, device=DEV))
    assert c.dw().shape[0] == 0


def _every_config():
    from triton_kernels import bsr, csr
    out = [pytest.param("csr", "spmm", cfg, id=f"csr-spmm-{i}") for i, cfg in enumerate(csr.SPMM_CONFIGS)]
    out += [pytest.param("csr", "sddmm", cfg, id=f"csr-sddmm-{i}") for i, cfg in enumerate(csr.SDDMM_CONFIGS)]
    for layout in ("bsr16", "bsr32", "bsr64"):
        out += [pytest.param(layout, "spmm", cfg, id=f"{layout}-spmm-{i}") for i, cfg in enumerate(bsr.SPMM_CONFIGS)]
        out += [pytest.param(layout, "sddmm", cfg, id=f"{layout}-sddmm-{i}")
                for i, cfg in enumerate(bsr.SDDMM_CONFIGS)]
    return out


@pytest.mark.parametrize("layout,kernel,cfg", _every_config())
def test_every_config(layout, kernel, cfg):
    """Each configuration the autotuner may pick, forced, in bfloat16 (tensor cores for BSR) on an odd shape:
    a 1000-row batch, rows of different lengths, an empty row and column."""
    from triton_kernels import bsr, csr
    c = Case(layout, **_shape(layout), dtype=BF16, seed=9, empty_row=2, empty_col=3)
    if layout == "csr" and kernel == "spmm":
        close(csr._spmm_launch(c.x, c.values, c.rowptr, c.col, None, c.b, c.out_f, config=cfg),
              c.x64 @ c.w.T + c.b64, BF16, "forward")
        close(csr._spmm_launch(c.dy, c.values, c.colptr, c.row, c.perm, None, c.in_f, config=cfg, perm_ptr=c.rowptr if c.perm.dtype == torch.int16 else None),
              c.dy64 @ c.w, BF16, "dX")
    elif layout == "csr":
        close(csr._sddmm_launch(c.dy, c.x, c.rowptr, c.col, config=cfg), c.gather(c.dy64.T @ c.x64), BF16, "dW")
    elif kernel == "spmm":
        if not bsr._fits("spmm", cfg, c.bs, 2):
            pytest.skip("pruned for this block size (does not fit)")
        close(bsr._spmm_launch(c.x, c.values, c.rowptr, c.col, None, c.b, c.out_f, c.bs, False, config=cfg),
              c.x64 @ c.w.T + c.b64, BF16, "forward")
        close(bsr._spmm_launch(c.dy, c.values, c.colptr, c.row, c.perm, None, c.in_f, c.bs, True, config=cfg),
              c.dy64 @ c.w, BF16, "dX")
    else:
        if not bsr._fits("sddmm", cfg, c.bs, 2):
            pytest.skip("pruned for this block size (does not fit)")
        for split in (1, 3):
            close(bsr._sddmm_launch(c.dy, c.x, c.rowptr, c.col, c.bs, config=cfg, split=split),
                  c.gather(c.dy64.T @ c.x64), BF16, f"dW split {split}")


def test_tf32_setting(no_autotune):
    """float32 BSR with TF32 allowed through torch's new API (where the legacy getter would raise): tensor-core
    TF32 accuracy, no error."""
    matmul = torch.backends.cuda.matmul
    old = getattr(matmul, "fp32_precision", None)
    if old is None:
        pytest.skip("this torch has no fp32_precision API")
    try:
        matmul.fp32_precision = "tf32"
        c = Case("bsr32", **_shape("bsr32"), dtype=F32, seed=10)
        ref = c.x64 @ c.w.T + c.b64
        y = c.fwd()
        err = float((y.double() - ref).abs().max() / ref.abs().max())
        assert 1e-9 < err < 5e-3, err  # TF32 (10-bit mantissa), not IEEE, and not wrong
    finally:
        matmul.fp32_precision = old


# ============================================================================================= streams, graphs, devices
@needs_cuda
def test_current_stream_is_used(no_autotune):
    c = Case("csr", **_shape("csr"), dtype=BF16, seed=11)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        y = c.fwd()
    s.synchronize()
    close(y, c.x64 @ c.w.T + c.b64, BF16, "forward on a side stream")


@needs_cuda
@pytest.mark.parametrize("layout", ["csr", "bsr32", "bsr64"])
def test_cuda_graph_replay(layout):
    """A whole step (forward, dX, dW) captured in a CUDA graph after warm-up (autotuning done) replays right on
    new inputs: the benchmark times graphs this way."""
    c = Case(layout, **_shape(layout), dtype=BF16, seed=12)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            c.fwd(), c.dx(), c.dw()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        y, dx, dw = c.fwd(), c.dx(), c.dw()
    x2 = torch.randn_like(c.x64).to(BF16)
    dy2 = torch.randn_like(c.dy64).to(BF16)
    c.x.copy_(x2)
    c.dy.copy_(dy2)
    g.replay()
    torch.cuda.synchronize()
    x64, dy64 = x2.double(), dy2.double()
    close(y, x64 @ c.w.T + c.b64, BF16, "graph forward")
    close(dx, dy64 @ c.w, BF16, "graph dX")
    close(dw, c.gather(dy64.T @ x64), BF16, "graph dW")


@needs_cuda
def test_second_device(no_autotune):
    """Tensors on cuda:1 while cuda:0 is current: the launch runs on the tensors' device (the device guard)."""
    if torch.cuda.device_count() < 2:
        pytest.skip("one CUDA device")
    with torch.cuda.device(1):
        c = Case("bsr32", **_shape("bsr32"), dtype=BF16, seed=13)
    assert c.x.device.index == 1 and torch.cuda.current_device() == 0
    c.check_all("on cuda:1")


# ============================================================================================= SparseLinear
def _sparsecore():
    try:
        import sparsecore
    except ImportError as e:  # the C++ extension did not build for this Python
        pytest.fail(f"import sparsecore failed (is sparsecore._C built for this Python?): {e}")
    return sparsecore


def _mlp(dtype=F32, seed=0):
    sc = _sparsecore()
    g = torch.Generator().manual_seed(seed)
    return torch.nn.Sequential(
        sc.SparseLinear(256, 512, density=0.2, layout="csr", generator=g),
        torch.nn.ReLU(),
        sc.SparseLinear(512, 512, density=0.25, layout="bsr", block_size=32, generator=g),
        torch.nn.ReLU(),
        sc.SparseLinear(512, 64, density=0.5, layout="bsr", block_size=64, generator=g),
        torch.nn.ReLU(),
        sc.SparseLinear(64, 16, density=0.5, layout="csr", generator=g),
    ).to(DEV, dtype)


def _dense_twin(model):
    """float64 dense copies of the layers' weights, masks and biases."""
    twin = []
    for m in model:
        if hasattr(m, "values"):
            w = m.weight.double().clone().requires_grad_()
            twin.append((w, m.mask().to(w.device, torch.float64), m.bias.detach().double().clone().requires_grad_()))
    return twin


def _dense_forward(twin, x):
    for i, (w, mask, b) in enumerate(twin):
        x = x @ (w * mask).T + b
        if i < len(twin) - 1:
            x = torch.relu(x)
    return x


def test_training_steps_match_dense_masked_float64():
    """Five SGD steps (momentum) of an MLP of SparseLinear layers (CSR, BSR-32, BSR-64) in float32 on CUDA: the
    loss falls at every step and follows the dense masked float64 model's, and so do the weights."""
    torch.manual_seed(0)
    model = _mlp(F32)
    twin = _dense_twin(model)
    x = torch.randn(S(1024), 256, device=DEV)
    target = torch.randn(S(1024), 16, device=DEV)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    ref_opt = torch.optim.SGD([t for w, _, b in twin for t in (w, b)], lr=0.05, momentum=0.9)
    losses, ref_losses = [], []
    for _ in range(5):
        with _sparsecore().use_backend("triton"):  # on CUDA tensors what "auto" picks; on CPU, the interpreter
            out = model(x)
        loss = torch.nn.functional.mse_loss(out, target)
        with _sparsecore().use_backend("triton"):
            loss.backward()
        opt.step()
        opt.zero_grad()
        ref = torch.nn.functional.mse_loss(_dense_forward(twin, x.double()), target.double())
        ref.backward()
        ref_opt.step()
        ref_opt.zero_grad()
        losses.append(float(loss))
        ref_losses.append(float(ref))
    assert all(b < a for a, b in zip(losses, losses[1:])), losses  # falls at every step
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref_losses), rtol=1e-4, atol=0)
    layers = [m for m in model if hasattr(m, "values")]
    for m, (w, mask, b) in zip(layers, twin):
        torch.testing.assert_close(m.values.detach().double(), m.pattern.gather(w.detach()), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(m.bias.detach().double(), b.detach(), rtol=1e-4, atol=1e-5)


# ============================================================================================= autocast
@pytest.mark.parametrize("layout", ["csr", "bsr32"])
def test_autocast_bf16(layout):
    """``with torch.autocast("cuda", dtype=torch.bfloat16): y = layer(x)`` computes in bfloat16 and returns it;
    the gradients come back in the parameters' (and the input's) dtype, float32."""
    sc = _sparsecore()
    g = torch.Generator().manual_seed(1)
    layer = sc.SparseLinear(512, 256, density=0.1, layout=layout[:3], block_size=int(layout[3:] or 1),
                            generator=g).to(DEV)
    x = torch.randn(S(300), 512, device=DEV, requires_grad=True)
    with torch.autocast(DEV, dtype=torch.bfloat16), sc.use_backend("triton"):
        y = layer(x)
    assert y.dtype == BF16, f"autocast bf16 returned {y.dtype}"
    dy = torch.randn(S(300), 256, device=DEV).to(BF16)
    with sc.use_backend("triton"):
        y.backward(dy)
    assert layer.values.grad is not None and layer.values.grad.dtype == layer.values.dtype == F32
    assert x.grad.dtype == F32 and layer.bias.grad.dtype == F32
    # reference: the operands autocast computes on (rounded to bfloat16), in float64
    xr = x.detach().to(BF16).double()
    wr = layer.pattern.to_dense(layer.values.detach().to(BF16).double())
    br = layer.bias.detach().to(BF16).double()
    close(y, xr @ wr.T + br, BF16, "autocast forward")
    dy64 = dy.double()
    close(layer.values.grad.to(BF16), layer.pattern.gather(dy64.T @ xr), BF16, "autocast dW")
    close(x.grad.to(BF16), dy64 @ wr, BF16, "autocast dX")
    close(layer.bias.grad.to(BF16), dy64.sum(0), BF16, "autocast db")


def test_autocast_training_step_bf16():
    """Five autocast-bf16 steps of the MLP: the loss falls and stays near the float64 dense model's."""
    torch.manual_seed(0)
    model = _mlp(F32, seed=3)
    twin = _dense_twin(model)
    x = torch.randn(S(1024), 256, device=DEV)
    target = torch.randn(S(1024), 16, device=DEV)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    ref_opt = torch.optim.SGD([t for w, _, b in twin for t in (w, b)], lr=0.05, momentum=0.9)
    losses, ref_losses = [], []
    sc = _sparsecore()
    for _ in range(5):
        with torch.autocast(DEV, dtype=torch.bfloat16), sc.use_backend("triton"):
            out = model(x)
        assert out.dtype == BF16
        loss = torch.nn.functional.mse_loss(out.float(), target)
        with sc.use_backend("triton"):
            loss.backward()
        opt.step()
        opt.zero_grad()
        ref = torch.nn.functional.mse_loss(_dense_forward(twin, x.double()), target.double())
        ref.backward()
        ref_opt.step()
        ref_opt.zero_grad()
        losses.append(float(loss))
        ref_losses.append(float(ref))
    assert losses[-1] < losses[0], losses
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref_losses), rtol=3e-2, atol=0)
