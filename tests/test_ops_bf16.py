"""The bfloat16 CPU kernels (CSR and BSR: forward, dX, dW, bias) against a float64 dense reference.

The reference is computed in float64 from the same bf16 inputs (bf16 -> float64 is exact), so what separates the
kernels from it is their fp32 accumulation and the one bf16 rounding of each output. `assert_bf16_close` checks
every element against that error bound: a kernel that drops a term, reads a wrong weight, rounds twice or truncates
instead of rounding to nearest fails it (test_the_bound_rejects_truncation shows that it can fail). Where the
fp32 result is exact (one product per output), the kernels must match torch's own rounding bit for bit.
"""
import contextlib

import pytest
import torch

from sparsecore import SparseLinear, _C, sparse_linear
from sparsecore.ops import sddmm, spmm, spmm_t
from sparsecore.pattern import Pattern

from conftest import ISAS, isa_supported, random_mask, torch_threads

BF16 = torch.bfloat16
U32 = 2.0 ** -24  # unit roundoff of fp32 (the accumulation)
U16 = 2.0 ** -8   # unit roundoff of bf16 (the output): |round(s) - s| <= U16 |s|


@pytest.fixture(params=[1, 2], ids=["1thread", "2threads"])
def threads(request):
    with torch_threads(request.param) as n:
        yield n


@contextlib.contextmanager
def tuned(set_hook, value):
    """Run the block with a kernel tuning hook of sparsecore._C set to value, then back to automatic (0)."""
    set_hook(value)
    try:
        yield
    finally:
        set_hook(0)


def bf16_randn(*shape, gen):
    return torch.randn(*shape, generator=gen).to(BF16)


def error_bound(ref, scale, terms):
    """Largest |kernel - ref| allowed elementwise: a sum of `terms` products (exact in fp32) and addends taken in
    fp32, in any order (at most terms - 1 roundings on any term's path: gamma_n * sum of |terms|, with `scale` that
    sum), then rounded once to bf16. A tiny absolute term covers denormal results."""
    n = terms + 1
    gamma = n * U32 / (1 - n * U32)
    acc = gamma * scale
    return U16 * (ref.abs() + acc) + acc + 2.0 ** -133


def assert_bf16_close(got, ref, scale, terms, what):
    assert got.dtype == BF16, f"{what}: dtype {got.dtype}"
    assert got.shape == ref.shape, f"{what}: shape {tuple(got.shape)} != {tuple(ref.shape)}"
    err = (got.double() - ref).abs()
    bound = error_bound(ref, scale, terms)
    bad = ~(err <= bound)  # NaN counts as bad
    if bad.any():
        i = int(torch.nonzero(bad.reshape(-1))[0])
        raise AssertionError(f"{what}: {int(bad.sum())} of {bad.numel()} elements outside the bound, e.g. flat index "
                             f"{i}: got {got.reshape(-1)[i].item()}, reference {ref.reshape(-1)[i].item()}, "
                             f"bound {bound.reshape(-1)[i].item():.3g}")


def check_bf16_step(p, w, batch, gen, bias=True):
    """One forward + backward of sparse_linear in bf16 with pattern p and dense bf16 weights w (zero off the
    pattern), against the float64 reference from the same bf16 numbers: y, dx, dW at the pattern, db."""
    out_f, in_f = w.shape
    assert w.dtype == BF16
    values = p.gather(w).requires_grad_()
    b = bf16_randn(out_f, gen=gen).requires_grad_() if bias else None
    x = bf16_randn(batch, in_f, gen=gen).requires_grad_()
    dy = bf16_randn(batch, out_f, gen=gen)
    y = sparse_linear(x, values, p, b)
    y.backward(dy)
    x64, w64, dy64 = x.detach().double(), w.double(), dy.double()
    b64 = b.detach().double() if bias else torch.zeros(out_f, dtype=torch.float64)
    mask = p.mask()
    row_terms, col_terms = int(mask.sum(1).max()) if mask.numel() else 0, int(mask.sum(0).max()) if mask.numel() else 0
    assert_bf16_close(y, x64 @ w64.T + b64, x64.abs() @ w64.abs().T + b64.abs(), row_terms + 1, "y")
    assert_bf16_close(x.grad, dy64 @ w64, dy64.abs() @ w64.abs(), col_terms, "dx")
    assert_bf16_close(values.grad, p.gather(dy64.T @ x64), p.gather(dy64.abs().T @ x64.abs()), batch, "dW")
    if bias:
        assert_bf16_close(b.grad, dy64.sum(0), dy64.abs().sum(0), batch, "db")
    return y, x.grad, values.grad


def csr_case(out_f, in_f, density, gen, empty_rows=(), empty_cols=(), single_row=None):
    mask = random_mask(out_f, in_f, density, gen, empty_rows=empty_rows, empty_cols=empty_cols)
    if single_row is not None:  # a row with a single entry
        mask[single_row] = False
        mask[single_row, in_f // 2] = True
    w = (torch.randn(out_f, in_f, generator=gen) * mask).to(BF16)
    return Pattern.from_mask(mask), w


def bsr_case(out_f, in_f, bs, density, gen):
    bm = torch.rand(out_f // bs, in_f // bs, generator=gen) < density
    if bm.shape[0] > 1:
        bm[0] = False  # an empty block row
    if bm.shape[1] > 1:
        bm[:, -1] = False  # an empty block column
    bm[-1, 0] = True
    mask = bm.repeat_interleave(bs, 0).repeat_interleave(bs, 1)
    w = (torch.randn(out_f, in_f, generator=gen) * mask).to(BF16)
    return Pattern.from_mask(mask, block_size=bs), w


def test_the_bound_rejects_truncation(gen):
    """The tolerance is tight enough to fail a kernel that truncates instead of rounding to nearest: rounding the
    exact products down (toward zero) breaks it in many places, rounding them to nearest in none."""
    ref = torch.randn(4096, generator=gen, dtype=torch.float64).float().double()  # exact in fp32
    scale = ref.abs()  # one term each: no accumulation error
    nearest = ref.to(BF16)
    truncated = (ref.float().view(torch.int32) & ~0xFFFF).view(torch.float32).to(BF16)
    assert ((nearest.double() - ref).abs() <= error_bound(ref, scale, 1)).all()
    assert ((truncated.double() - ref).abs() > error_bound(ref, scale, 1)).sum() > 100


# ------------------------------------------------------------------------------------------ CSR
@pytest.mark.parametrize("batch", [1, 3, 17, 33, 131])
def test_csr_step_per_isa(isa, threads, batch, gen):
    """Every ISA copy, 1 and 2 threads, batches that run every tile width (1, 3: one narrow tile; 17, 33: full
    tiles plus a remainder; 131: chunks of two widths, so dW accumulates across chunks in fp32)."""
    p, w = csr_case(37, 45, 0.3, gen, empty_rows=[0, 20], empty_cols=[44], single_row=5)
    check_bf16_step(p, w, batch, gen)


@pytest.mark.parametrize("shape", [(1, 1), (1, 9), (9, 1), (16, 32), (33, 65), (64, 200), (131, 17)])
def test_csr_shapes(shape, threads, gen):
    out_f, in_f = shape
    p, w = csr_case(out_f, in_f, 0.35, gen, empty_rows=[0] if out_f > 2 else (),
                    empty_cols=[in_f - 1] if in_f > 2 else ())
    if p.nnz == 0:
        p, w = csr_case(out_f, in_f, 1.0, gen)
    check_bf16_step(p, w, 19, gen)


@pytest.mark.parametrize("nv", [1, 2, 3, 4, 5, 8])
def test_every_tile_width(isa, nv, gen):
    """The tuning hook forces each tile width (nv vectors per tile row), so every unrolling of the SpMM loops and
    every form of the SDDMM's dot products (AVX512-BF16: half a vector, one, two, four per tile row) runs; bf16 has
    no tiles of 3 and 5 vectors, and the hook runs those as 4 and 8."""
    p, w = csr_case(29, 41, 0.3, gen, empty_rows=[2], empty_cols=[5])
    with tuned(_C._set_tile_vectors, nv):
        check_bf16_step(p, w, 70, gen)


def test_single_nonzero(isa, gen):
    mask = torch.zeros(11, 7, dtype=torch.bool)
    mask[4, 2] = True
    w = (torch.randn(11, 7, generator=gen) * mask).to(BF16)
    check_bf16_step(Pattern.from_mask(mask), w, 33, gen)


@pytest.mark.parametrize("split", [1, 2])
@pytest.mark.parametrize("sddmm_tiles", [1, 2])
@pytest.mark.parametrize("block_bytes", [256, 0])
def test_work_splits(split, sddmm_tiles, block_bytes, threads, gen):
    """SpMM by rows of each tile or by whole tiles; SDDMM tiles shared or per thread, with small column blocks
    (short and empty segments) or the default. Batch 70: full tiles and a tail."""
    p, w = csr_case(61, 150, 0.4, gen, empty_rows=[0, 30], empty_cols=[7], single_row=9)
    with tuned(_C._set_spmm_split, split), tuned(_C._set_sddmm_tiles, sddmm_tiles), \
            tuned(_C._set_sddmm_block_bytes, block_bytes):
        check_bf16_step(p, w, 70, gen)


def test_values_gather_pass(isa, gen):
    """Above 1 MiB of bf16 values (nnz > 2^19), dX gathers values[perm] in a pass of its own before the tiles."""
    p, w = csr_case(800, 800, 0.9, gen, empty_rows=[1], empty_cols=[3])
    assert p.nnz * 2 > 2 ** 20
    check_bf16_step(p, w, 5, gen)


def test_no_bias_and_3d_input(gen):
    p, w = csr_case(20, 30, 0.3, gen, empty_rows=[3])
    check_bf16_step(p, w, 9, gen, bias=False)
    x = bf16_randn(2, 5, 30, gen=gen)
    y = sparse_linear(x, p.gather(w), p)
    assert y.shape == (2, 5, 20) and y.dtype == BF16
    ref = x.double() @ w.double().T
    assert_bf16_close(y, ref, x.double().abs() @ w.double().abs().T, 30, "y (3-D)")


def test_non_contiguous_inputs(gen):
    """x, values and bias as strided views: sparse_linear copies x and values contiguous, the kernel copies the
    bias; the results are those of contiguous inputs, bit for bit."""
    p, w = csr_case(10, 12, 0.5, gen)
    values = p.gather(w)
    bias = bf16_randn(10, gen=gen)
    x = bf16_randn(12, 2, 9, gen=gen).permute(1, 2, 0)  # (2, 9, 12)
    wide_v = torch.zeros(2 * p.nnz, dtype=BF16)
    wide_v[::2] = values
    wide_b = torch.zeros(20, dtype=BF16)
    wide_b[::2] = bias
    assert not x.is_contiguous() and not wide_v[::2].is_contiguous() and not wide_b[::2].is_contiguous()
    y = sparse_linear(x, wide_v[::2], p, wide_b[::2])
    assert torch.equal(y, sparse_linear(x.contiguous(), values, p, bias))
    ref = x.double() @ w.double().T + bias.double()
    assert_bf16_close(y, ref, x.double().abs() @ w.double().abs().T + bias.double().abs(), 13, "y")


# ------------------------------------------------------------------------------------------ BSR
@pytest.mark.parametrize("bs,out_f,in_f,batch", [(16, 48, 32, 5), (32, 64, 96, 37), (4, 12, 20, 131),
                                                 (3, 9, 6, 17), (12, 24, 36, 33), (2, 6, 10, 1), (64, 128, 192, 40),
                                                 (8, 40, 24, 20)])
def test_bsr_step(isa, threads, bs, out_f, in_f, batch, gen):
    """Block sizes that are multiples of the vector widths (and of two: the dW kernel's paired vectors) and ones
    that are not, at batches that fill no whole tile, or several."""
    p, w = bsr_case(out_f, in_f, bs, 0.5, gen)
    check_bf16_step(p, w, batch, gen)


def test_bsr_single_block(gen):
    bm = torch.zeros(3, 4, dtype=torch.bool)
    bm[1, 2] = True
    mask = bm.repeat_interleave(8, 0).repeat_interleave(8, 1)
    w = (torch.randn(24, 32, generator=gen) * mask).to(BF16)
    check_bf16_step(Pattern.from_mask(mask, block_size=8), w, 17, gen)


# ------------------------------------------------------------------------------------------ rounding
def exact_products(n, gen, denormal=True):
    """(a, b): bf16 vectors whose products a*b are exact in fp32 and cover the cases of rounding to bf16: random
    products (about half round up), both kinds of exact ties (the kept part odd: rounds up; even: stays), a
    product that rounds past the largest bf16 to inf, and (with `denormal`) one in the denormals."""
    a = bf16_randn(n, gen=gen)
    b = bf16_randn(n, gen=gen)
    one_ulp = 1 + 2.0 ** -7
    special = [(one_ulp, 1.5),                  # 1.5 + 2^-7 + 2^-8: a tie, kept part odd -> rounds up
               (1 + 2.0 ** -4, 1 + 2.0 ** -4),  # 1.125 + 2^-8: a tie, kept part even -> stays 1.125
               (-one_ulp, 1.5),                 # the first tie, negative
               # (181/128)^2 2^127 = (2 - 7/16384) 2^127: finite in fp32, above the largest bf16 (2 - 2^-7) 2^127
               # by more than half an ulp -> inf
               (181 / 128 * 2.0 ** 63, 181 / 128 * 2.0 ** 64)]
    if denormal:
        special.append((2.0 ** -70, 1.5 * 2.0 ** -60))  # 1.5 2^-130: a denormal, exact in fp32 and in bf16
    for i, (u, v) in enumerate(special):
        a[i], b[i] = u, v
    prod = a.float() * b.float()
    assert torch.equal(prod.double(), a.double() * b.double())  # exact in fp32
    return a, b


def assert_rounds_like_torch(got, exact32, what):
    """got (bf16) must be torch's round-to-nearest-even of the exact fp32 results, bit for bit, and differ from
    their truncation where that differs (so the check can tell the two apart)."""
    want = exact32.to(BF16)
    truncated = (exact32.view(torch.int32) >> 16).to(torch.int16)
    assert torch.equal(got.view(torch.int16), want.view(torch.int16)), f"{what}: not rounded to nearest even"
    differs = truncated != want.view(torch.int16)
    assert differs.sum() > differs.numel() // 4, f"{what}: too few products where truncation would differ"


def test_rounding_is_nearest_even_csr(isa, gen):
    """A diagonal W (one product per output, no bias) makes y, dx and dW (batch 1) exact in fp32: the kernels must
    then give torch's rounding of those products. Truncation would differ in about half of them."""
    n = 300
    p = Pattern.from_mask(torch.eye(n, dtype=torch.bool))
    w, x = exact_products(n, gen)
    x = x.reshape(1, n)
    y = spmm(x, w, None, p.rowptr, p.col, p.colptr, p.row, p.perm, n, 1)
    assert_rounds_like_torch(y, x.float() * w.float(), "spmm")
    dx = spmm_t(x, w, p.rowptr, p.col, p.colptr, p.row, p.perm, n, 1)
    assert_rounds_like_torch(dx, x.float() * w.float(), "spmm_t")
    # SDDMM: no denormal (vdpbf16ps flushes denormals, a documented difference of < 2^-126)
    dy, xs = exact_products(n, gen, denormal=False)
    dw = sddmm(dy.reshape(1, n), xs.reshape(1, n), p.rowptr, p.col, p.colptr, p.row, p.perm, 1)
    assert_rounds_like_torch(dw, dy.float() * xs.float(), "sddmm")


def test_rounding_is_nearest_even_bsr(isa, gen):
    """BSR with diagonal blocks that hold only their diagonal: every output is one product plus exact zeros."""
    n, bs = 256, 4
    p = Pattern.from_mask(torch.eye(n // bs, dtype=torch.bool).repeat_interleave(bs, 0).repeat_interleave(bs, 1),
                          block_size=bs)
    d, x = exact_products(n, gen)
    values = torch.diag_embed(d.reshape(-1, bs))  # (n/bs, bs, bs) diagonal blocks
    x = x.reshape(1, n)
    y = spmm(x, values, None, p.rowptr, p.col, p.colptr, p.row, p.perm, n, bs)
    assert_rounds_like_torch(y, x.float() * d.float(), "bsr_spmm")
    dx = spmm_t(x, values, p.rowptr, p.col, p.colptr, p.row, p.perm, n, bs)
    assert_rounds_like_torch(dx, x.float() * d.float(), "bsr_spmm_t")
    dy, xs = exact_products(n, gen)
    dw = sddmm(dy.reshape(1, n), xs.reshape(1, n), p.rowptr, p.col, p.colptr, p.row, p.perm, bs)
    want = dy.float().reshape(-1, bs, 1) * xs.float().reshape(-1, 1, bs)  # each block's outer product
    assert_rounds_like_torch(dw.reshape(-1), want.reshape(-1), "bsr_sddmm")


def test_nan_propagates(gen):
    p, w = csr_case(8, 6, 1.0, gen)
    x = bf16_randn(3, 6, gen=gen)
    x[1, 2] = float("nan")
    y = sparse_linear(x, p.gather(w), p)
    assert torch.isnan(y[1]).all() and torch.isfinite(y[[0, 2]]).all()
    dw = sddmm(bf16_randn(3, 8, gen=gen), x, p.rowptr, p.col, p.colptr, p.row, p.perm, 1)
    assert torch.isnan(p.to_dense(dw)[:, 2]).all() and torch.isfinite(p.to_dense(dw)[:, [0, 1, 3, 4, 5]]).all()


# ------------------------------------------------------------------------------------------ which code runs
def cpu_flags():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return None


def test_avx512bf16_path_runs_where_the_cpu_has_it(gen):
    """On a CPU with AVX512-BF16 (the kernel's /proc/cpuinfo says so, independently of the extension's own
    detection), the default cap runs the bf16 SDDMM's AVX512-BF16 copy."""
    flags = cpu_flags()
    if flags is None:
        pytest.skip("no /proc/cpuinfo")
    has = {"avx512f", "avx512vl", "avx512dq", "avx512bw", "avx512_bf16"} <= flags
    assert (_C.cpu_isa() == "avx512bf16") == has
    if not has:
        pytest.skip("this CPU has no AVX512-BF16")
    old = _C.kernel_isa()
    _C._set_max_isa("avx512bf16")  # the default cap, whatever $SPARSECORE_MAX_ISA says
    try:
        assert _C.kernel_isa() == "avx512bf16"
        p, w = csr_case(40, 50, 0.3, gen)
        check_bf16_step(p, w, 64, gen)
        assert _C._bf16_copies_run()["sddmm"] == "avx512bf16"
    finally:
        _C._set_max_isa(old)


def test_each_cap_runs_its_copy(isa, gen):
    """Under each cap every bf16 kernel reports the copy it ran: the SpMMs stop at AVX-512 (no BF16 instruction
    pays there), and so do the BSR kernels; the CSR SDDMM uses AVX512-BF16 under its cap."""
    check_bf16_step(*csr_case(20, 24, 0.4, gen), 40, gen)
    check_bf16_step(*bsr_case(16, 24, 4, 0.5, gen), 40, gen)
    capped = lambda top: ISAS[min(ISAS.index(isa), ISAS.index(top))]
    assert _C._bf16_copies_run() == {"spmm": capped("avx512"), "spmm_t": capped("avx512"), "sddmm": isa,
                                     "bsr_spmm": capped("avx512"), "bsr_spmm_t": capped("avx512"),
                                     "bsr_sddmm": capped("avx512")}


# ------------------------------------------------------------------------------------------ layer and ops
def test_sparse_linear_layer_training_step(threads, gen):
    """SparseLinear.to(bfloat16): a training step (zero_grad, forward, backward, SGD step) twice, gradients
    against the reference; the pattern keeps its int16 (compact) indices."""
    torch.manual_seed(0)
    layer = SparseLinear(96, 80, density=0.2, generator=gen).to(BF16)
    assert layer.values.dtype == BF16 and layer.bias.dtype == BF16 and layer.col.dtype == torch.int16
    opt = torch.optim.SGD(layer.parameters(), lr=0.1)
    for _ in range(2):
        w = layer.weight  # bf16 (out, in), for the reference only
        x = bf16_randn(45, 96, gen=gen).requires_grad_()
        dy = bf16_randn(45, 80, gen=gen)
        opt.zero_grad(set_to_none=True)
        y = layer(x)
        y.backward(dy)
        x64, w64, dy64, b64 = x.detach().double(), w.double(), dy.double(), layer.bias.detach().double()
        rows, cols = int(layer.mask().sum(1).max()), int(layer.mask().sum(0).max())
        assert_bf16_close(y, x64 @ w64.T + b64, x64.abs() @ w64.abs().T + b64.abs(), rows + 1, "y")
        assert_bf16_close(x.grad, dy64 @ w64, dy64.abs() @ w64.abs(), cols, "dx")
        p = layer.pattern
        assert_bf16_close(layer.values.grad, p.gather(dy64.T @ x64), p.gather(dy64.abs().T @ x64.abs()), 45, "dW")
        assert_bf16_close(layer.bias.grad, dy64.sum(0), dy64.abs().sum(0), 45, "db")
        before = layer.values.detach().clone()
        opt.step()
        assert not torch.equal(before, layer.values.detach())


def test_custom_ops_match_the_eager_path(gen):
    """The custom ops (what torch.compile calls) and the eager autograd.Function give the same bits in bf16."""
    p, w = csr_case(30, 40, 0.3, gen, empty_rows=[1])
    values = p.gather(w).requires_grad_()
    bias = bf16_randn(30, gen=gen).requires_grad_()
    x = bf16_randn(21, 40, gen=gen).requires_grad_()
    dy = bf16_randn(21, 30, gen=gen)
    y = sparse_linear(x, values, p, bias)
    y.backward(dy)
    eager = (y.detach(), x.grad, values.grad, bias.grad)
    x2, v2, b2 = (t.detach().clone().requires_grad_() for t in (x, values, bias))
    y2 = spmm(x2, v2, b2, p.rowptr, p.col, p.colptr, p.row, p.perm, 30, 1)
    y2.backward(dy)
    for a, b in zip(eager, (y2.detach(), x2.grad, v2.grad, b2.grad)):
        assert a.dtype == BF16 and torch.equal(a, b)


def test_opcheck_bf16(gen):
    p, w = csr_case(6, 5, 0.5, gen)
    v = p.gather(w).requires_grad_()
    x = bf16_randn(3, 5, gen=gen).requires_grad_()
    b = bf16_randn(6, gen=gen).requires_grad_()
    torch.library.opcheck(spmm, (x, v, b, p.rowptr, p.col, p.colptr, p.row, p.perm, 6, 1))
    dy = bf16_randn(3, 6, gen=gen)
    torch.library.opcheck(spmm_t, (dy, v.detach(), p.rowptr, p.col, p.colptr, p.row, p.perm, 5, 1))
    torch.library.opcheck(sddmm, (dy, x.detach(), p.rowptr, p.col, p.colptr, p.row, p.perm, 1))


def test_zero_batch_writes_zero_gradients(gen):
    """An empty batch: y is (0, out) and dW is exactly zero (the kernel must write it: the output arrays here start
    as NaN)."""
    p, w = csr_case(5, 4, 0.5, gen)
    out = torch.full((p.nnz,), float("nan"), dtype=BF16)
    empty = lambda n: torch.empty(0, n, dtype=BF16).view(torch.int16).numpy()
    _C.sddmm_bf16(empty(5), empty(4), p.rowptr.numpy(), p.col.int().numpy(), out.view(torch.int16).numpy(), 1)
    assert torch.equal(out, torch.zeros_like(out))
    pb, wb = bsr_case(8, 8, 4, 1.0, gen)
    outb = torch.full(pb.values_shape, float("nan"), dtype=BF16)
    _C.bsr_sddmm_bf16(empty(8), empty(8), pb.rowptr.numpy(), pb.col.int().numpy(), outb.view(torch.int16).numpy(), 1)
    assert torch.equal(outb, torch.zeros_like(outb))
    values = p.gather(w).requires_grad_()
    y = sparse_linear(torch.zeros(0, 4, dtype=BF16, requires_grad=True), values, p)
    assert y.shape == (0, 5) and y.dtype == BF16


def test_bad_dtypes_are_clear_errors(gen):
    p, w = csr_case(5, 4, 0.5, gen)
    v = p.gather(w)
    with pytest.raises(TypeError, match="one dtype, got input torch.bfloat16, weights torch.float32"):
        sparse_linear(bf16_randn(2, 4, gen=gen), v.float(), p)
    with pytest.raises(TypeError, match="bias torch.float32"):
        sparse_linear(bf16_randn(2, 4, gen=gen), v, p, torch.randn(5))
    with pytest.raises(TypeError, match="float16: on the CPU use bfloat16"):
        sparse_linear(torch.randn(2, 4).half(), v.half(), p)
    # the raw kernels: a float32 bias must not be read as bf16 words
    x16 = bf16_randn(2, 4, gen=gen).view(torch.int16).numpy()
    out = torch.empty(2, 5, dtype=BF16).view(torch.int16).numpy()
    with pytest.raises(ValueError, match="bias has the wrong dtype"):
        _C.spmm_bf16(x16, p.rowptr.numpy(), p.col.int().numpy(), v.view(torch.int16).numpy(), None,
                     torch.randn(5).numpy(), out, 1)
    with pytest.raises(TypeError):  # fp32 values into the bf16 kernel
        _C.spmm_bf16(x16, p.rowptr.numpy(), p.col.int().numpy(), v.float().numpy(), None, None, out, 1)
