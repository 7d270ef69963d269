"""How the Triton kernels are launched, under the interpreter on CPU tensors: every autotune configuration
against the float64 reference, the autotuner itself, the BSR SDDMM's batch split, the device guard, the TF32
query, and the compile of every configuration for sm_90 (no GPU needed; see tests/aot_sm90.py)."""
import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported, and before the kernels' first call

import subprocess  # noqa: E402
import sys  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")

import triton_kernels as tk  # noqa: E402
from triton_kernels import _common as C  # noqa: E402
from triton_kernels import bsr, csr  # noqa: E402

from test_triton_kernels import close, make_bsr, make_csr, rounded  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module", autouse=True)
def _interpreter():
    if not (C.is_interpreted(csr._kernels()["_csr_spmm_kernel"])
            and C.is_interpreted(bsr._kernels()["_bsr_spmm_kernel"])):
        pytest.skip("the kernels were jitted for a GPU before TRITON_INTERPRET=1 was set in this process")


def _cfg_id(cfg):
    return "-".join(f"{k.replace('BLOCK_', '').replace('num_', '')[0:5]}{v}" for k, v in cfg.items())


def _csr_inputs(dtype, seed=0):
    # rows of ~75 nonzeros (several BLOCK_K chunks), 13 rows (not a multiple of BLOCK_R), a batch of 70 (a
    # partial tile for every BLOCK_B), an empty row and an empty column
    p, w = make_csr(13, 150, 0.5, seed=seed, empty_row=4, empty_col=7)
    g = torch.Generator().manual_seed(seed + 1)
    v, v64 = rounded(p.gather(w), dtype)
    x, x64 = rounded(torch.randn(70, 150, generator=g), dtype)
    dy, dy64 = rounded(torch.randn(70, 13, generator=g), dtype)
    b, b64 = rounded(torch.randn(13, generator=g), dtype)
    return p, v, x, dy, b, p.to_dense(v64), x64, dy64, b64


# ============================================================================================= every configuration
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("cfg", csr.SPMM_CONFIGS, ids=_cfg_id)
def test_every_csr_spmm_config(cfg, dtype):
    p, v, x, dy, b, w64, x64, dy64, b64 = _csr_inputs(dtype)
    close(csr._spmm_launch(x, v, p.rowptr, p.col, None, b, 13, config=cfg), x64 @ w64.T + b64, dtype)
    close(csr._spmm_launch(dy, v, p.colptr, p.row, p.perm, None, 150, config=cfg, perm_ptr=p.rowptr), dy64 @ w64,
          dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("cfg", csr.SDDMM_CONFIGS, ids=_cfg_id)
def test_every_csr_sddmm_config(cfg, dtype):
    p, v, x, dy, b, w64, x64, dy64, b64 = _csr_inputs(dtype)
    close(csr._sddmm_launch(dy, x, p.rowptr, p.col, config=cfg), p.gather(dy64.T @ x64), dtype)


def _bsr_inputs(dtype, bs=16, batch=130, seed=3):
    p, w = make_bsr(48, 64, bs, 0.5, seed=seed, empty_brow=1, empty_bcol=2)
    g = torch.Generator().manual_seed(seed)
    v, v64 = rounded(p.gather(w), dtype)
    x, x64 = rounded(torch.randn(batch, 64, generator=g), dtype)
    dy, dy64 = rounded(torch.randn(batch, 48, generator=g), dtype)
    b, b64 = rounded(torch.randn(48, generator=g), dtype)
    return p, v, x, dy, b, p.to_dense(v64), x64, dy64, b64


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("cfg", bsr.SPMM_CONFIGS, ids=_cfg_id)
def test_every_bsr_spmm_config(cfg, dtype):
    p, v, x, dy, b, w64, x64, dy64, b64 = _bsr_inputs(dtype)
    close(bsr._spmm_launch(x, v, p.rowptr, p.col, None, b, 48, 16, transpose=False, config=cfg),
          x64 @ w64.T + b64, dtype)
    close(bsr._spmm_launch(dy, v, p.colptr, p.row, p.perm, None, 64, 16, transpose=True, config=cfg),
          dy64 @ w64, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("cfg", bsr.SDDMM_CONFIGS, ids=_cfg_id)
def test_every_bsr_sddmm_config(cfg, dtype):
    p, v, x, dy, b, w64, x64, dy64, b64 = _bsr_inputs(dtype)
    close(bsr._sddmm_launch(dy, x, p.rowptr, p.col, 16, config=cfg), p.gather(dy64.T @ x64), dtype)


def test_default_configs_cover_every_shape():
    """The configurations used without autotuning are well formed for any batch and row length."""
    for batch in (1, 7, 64, 1000, 100000):
        for avg in (0, 0.3, 5, 80, 5000):
            c = csr._default_spmm(batch, avg)
            assert c["BLOCK_R"] * c["BLOCK_K"] * c["BLOCK_B"] <= 8192 and c["BLOCK_R"] >= 1
            assert all(c[k] & (c[k] - 1) == 0 for k in ("BLOCK_R", "BLOCK_K", "BLOCK_B"))
        for bs_p in (16, 32, 64, 128):
            for dt in (torch.float32, torch.bfloat16):
                for kernel in ("spmm", "sddmm"):
                    c = bsr._default(kernel, batch, bs_p, dt)
                    elem = 4 if dt == torch.float32 else 2
                    assert c["num_stages"] * bsr._stage_bytes(kernel, c["BLOCK_B"], bs_p, elem) <= bsr.SMEM_BUDGET


def test_pruning_keeps_at_least_one_config():
    """For every block size and dtype some autotune configuration fits (else the default one runs)."""
    for bs_p in (16, 32, 64, 128):
        for elem in (2, 4):
            for kernel, cfgs in (("spmm", bsr.SPMM_CONFIGS), ("sddmm", bsr.SDDMM_CONFIGS)):
                kept = [c for c in cfgs if bsr._fits(kernel, c, bs_p, elem)]
                if bs_p <= 64 and elem == 2:
                    assert kept, (kernel, bs_p, elem)
    # the configuration ptxas showed spilling (float32, bs 64, 128-row tile, 4 warps) is dropped
    assert not bsr._fits("spmm", dict(BLOCK_B=128, num_warps=4, num_stages=3), 64, 4)


# ============================================================================================= autotuning
def test_autotune_under_the_interpreter(monkeypatch):
    """SPARSECORE_TRITON_AUTOTUNE=1: the triton.autotune path (configs timed by wall clock here) gives the same
    results, and remembers its choice per key."""
    monkeypatch.setenv(C.AUTOTUNE_ENV, "1")
    p, v, x, dy, b, w64, x64, dy64, b64 = _csr_inputs(torch.float32, seed=5)
    close(tk.csr_spmm(x, v, p.rowptr, p.col, 13, b), x64 @ w64.T + b64, torch.float32)
    close(tk.csr_sddmm(dy, x, p.rowptr, p.col), p.gather(dy64.T @ x64), torch.float32)
    pb, vb, xb, dyb, bb, wb64, xb64, dyb64, bb64 = _bsr_inputs(torch.float32, batch=20)
    close(tk.bsr_spmm(xb, vb, pb.rowptr, pb.col, 48, bb), xb64 @ wb64.T + bb64, torch.float32)
    close(tk.bsr_sddmm(dyb, xb, pb.rowptr, pb.col, 16), pb.gather(dyb64.T @ xb64), torch.float32)
    chosen = C.tuned_configs(csr._kernels())
    assert set(chosen) == {"_csr_spmm_kernel", "_csr_sddmm_kernel"}
    assert "BLOCK_B" in next(iter(chosen["_csr_spmm_kernel"].values()))
    assert set(C.tuned_configs(bsr._kernels())) == {"_bsr_spmm_kernel", "_bsr_sddmm_kernel"}


def test_autotune_switch(monkeypatch):
    k = csr._kernels()["_csr_spmm_kernel"]
    monkeypatch.delenv(C.AUTOTUNE_ENV, raising=False)
    assert not C.autotune_enabled(k)  # interpreted: off unless asked
    monkeypatch.setenv(C.AUTOTUNE_ENV, "1")
    assert C.autotune_enabled(k)
    monkeypatch.setenv(C.AUTOTUNE_ENV, "yes")
    with pytest.raises(ValueError, match="must be 0 or 1"):
        C.autotune_enabled(k)


def test_autotune_keys_prune_the_batch_tiles():
    """Each key times only tiles that suit its batch: at most 4 configurations are compiled for one shape."""
    for key_b in (16, 32, 64, 4096):
        for key_len in (1, 8, 80):
            args = {"KEY_B": key_b, "KEY_LEN": key_len}
            kept = [c for c in csr.SPMM_CONFIGS if csr._keep_spmm(c, args)]
            assert 1 <= len(kept) <= 4, (key_b, key_len)
            assert all(c["BLOCK_B"] <= max(16, key_b) for c in kept) if key_b < 64 else \
                all(c["BLOCK_B"] >= 64 for c in kept)
        assert 1 <= sum(csr._keep_sddmm(c, {"KEY_B": key_b}) for c in csr.SDDMM_CONFIGS) <= 4
        x = torch.empty(0, dtype=torch.bfloat16)
        for bs_p in (16, 32, 64, 128):
            for kernel, cfgs in (("spmm", bsr.SPMM_CONFIGS), ("sddmm", bsr.SDDMM_CONFIGS)):
                n = sum(bsr._keep(kernel)(c, {"X": x, "BS_P": bs_p, "KEY_B": key_b}) for c in cfgs)
                assert n <= 4 and (n >= 1 or bs_p == 128), (kernel, bs_p, key_b)


# ============================================================================================= BSR SDDMM split
def test_sddmm_split_heuristic():
    assert bsr._sddmm_split(nnzb=10_000, batch=4096, n_sm=132) == 1  # enough blocks
    assert bsr._sddmm_split(nnzb=164, batch=4096, n_sm=132) == 4  # 1%-dense 8192^2, bs 64: 656 programs
    assert bsr._sddmm_split(nnzb=41, batch=4096, n_sm=132) == 13
    assert bsr._sddmm_split(nnzb=1, batch=4096, n_sm=132) == 16  # at least SPLIT_MIN_ROWS rows per slice
    assert bsr._sddmm_split(nnzb=1, batch=100, n_sm=132) == 1
    assert bsr._sddmm_split(nnzb=1, batch=10 ** 6, n_sm=132) == bsr.MAX_SPLIT


@pytest.mark.parametrize("split", [2, 3, 9])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sddmm_split_matches(split, dtype):
    """Slices of whole batch tiles, float32 partial sums; a slice past the batch contributes zeros (9 slices of a
    130-row batch leave some empty)."""
    p, v, x, dy, b, w64, x64, dy64, b64 = _bsr_inputs(dtype)
    out = bsr._sddmm_launch(dy, x, p.rowptr, p.col, 16, split=split,
                            config=dict(BLOCK_B=16, num_warps=4, num_stages=2))
    close(out, p.gather(dy64.T @ x64), dtype)


def test_sddmm_split_is_used_at_low_density(monkeypatch):
    """Few blocks (the interpreter counts C.INTERPRETER_SMS multiprocessors) and a long batch: the public
    function splits, and the result is the same."""
    monkeypatch.setattr(bsr, "SPLIT_MIN_ROWS", 32)
    p, v, x, dy, b, w64, x64, dy64, b64 = _bsr_inputs(torch.float32)
    assert bsr._sddmm_split(p.nnz, 130, C.sm_count(x.device)) > 1
    seen = []
    real = C.launch

    def spy(kernels, name, grid, *a, **kw):
        seen.append(grid({"BLOCK_B": 16}))
        return real(kernels, name, grid, *a, **kw)

    monkeypatch.setattr(C, "launch", spy)
    close(tk.bsr_sddmm(dy, x, p.rowptr, p.col, 16), p.gather(dy64.T @ x64), torch.float32)
    assert seen and seen[0][1] > 1


# ============================================================================================= device and precision
def test_every_launch_goes_through_the_device_guard(monkeypatch):
    guarded = []
    real = C.device_guard

    def spy(device):
        guarded.append(device)
        return real(device)

    monkeypatch.setattr(C, "device_guard", spy)
    p, v, x, dy, b, w64, x64, dy64, b64 = _csr_inputs(torch.float32)
    tk.csr_spmm(x, v, p.rowptr, p.col, 13, b)
    tk.csr_spmm_t(dy, v, p.colptr, p.row, p.perm, 150, rowptr=p.rowptr)
    tk.csr_sddmm(dy, x, p.rowptr, p.col)
    pb, vb, xb, dyb, bb, *_ = _bsr_inputs(torch.float32, batch=5)
    tk.bsr_spmm(xb, vb, pb.rowptr, pb.col, 48, bb)
    tk.bsr_spmm_t(dyb, vb, pb.colptr, pb.row, pb.perm, 64)
    tk.bsr_sddmm(dyb, xb, pb.rowptr, pb.col, 16)
    assert guarded == [torch.device("cpu")] * 6


def test_device_guard_selects_the_tensors_device():
    g = C.device_guard(torch.device("cuda", 1))  # built without entering: needs no GPU
    assert isinstance(g, torch.cuda.device) and g.idx == 1
    with C.device_guard(torch.device("cpu")):
        pass


_PRECISION = r'''
import json, torch
from triton_kernels import _common as C

def state():
    try:
        legacy = torch.get_float32_matmul_precision()
    except RuntimeError:
        legacy = "raises"
    return [C.dot_precision(torch.float32), torch.backends.cuda.matmul.fp32_precision, legacy]

out = [state()]
torch.backends.fp32_precision = "tf32"  # the new API, at the root: the legacy getter raises from here on
out.append(state())
torch.backends.cuda.matmul.fp32_precision = "ieee"
out.append(state())
torch.set_float32_matmul_precision("high")  # legacy, mixed with the new
out.append(state())
out.append([C.dot_precision(torch.bfloat16)])
print(json.dumps(out))
'''


def test_fp32_precision_query_never_raises():
    """dot_precision follows torch's matmul setting through both APIs, also where torch's legacy getter raises
    because they were mixed (torch >= 2.9)."""
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run([sys.executable, "-c", _PRECISION], cwd=REPO, env=env, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    import json
    states = json.loads(r.stdout.strip().splitlines()[-1])
    assert states[-1] == [None]  # 16-bit dots: Triton's default
    assert states[0] == ["ieee", "none", "highest"]
    assert states[1][:2] == ["tf32", "tf32"]
    assert states[2][:2] == ["ieee", "ieee"]
    assert states[3][0] == ("tf32" if states[3][1] == "tf32" else "ieee")
    assert any(s[2] == "raises" for s in states[:4]), states  # the case this guards against did occur


def test_feature_major_view_is_free():
    x = torch.randn(30, 7).t().contiguous().t()  # (7, 30) storage, seen as (30, 7)
    assert csr._feature_major(x).data_ptr() == x.data_ptr()


def test_backward_transposes_dy_once_for_csr(monkeypatch):
    """sparsecore's backward gives both Triton CSR backward kernels one feature-major dy."""
    import sparsecore
    from sparsecore import ops
    p, w = make_csr(12, 10, 0.4, seed=13)
    values = p.gather(w).requires_grad_()
    x = torch.randn(6, 10, requires_grad=True)
    seen = []
    for name in ("_spmm_launch", "_sddmm_launch"):
        real = getattr(csr, name)

        def spy(dy, *a, _real=real, **kw):
            seen.append(dy.t().is_contiguous())
            return _real(dy, *a, **kw)
        monkeypatch.setattr(csr, name, spy)
    with sparsecore.use_backend("triton"):
        sparsecore.sparse_linear(x, values, p).backward(torch.randn(6, 12))
    assert seen == [False, True, True]  # forward: x row-major; dX and dW: the feature-major dy
    assert ops._grad_layout(torch.randn(3, 4), 16).is_contiguous()  # BSR reads dy row-major


# ============================================================================================= the GPU tests' own parts
def test_torch_index_matches_pattern():
    """tests/torch_index.py (the GPU tests' pattern builder, no sparsecore._C) agrees with sparsecore.Pattern."""
    from torch_index import csr_index

    from sparsecore import Pattern
    g = torch.Generator().manual_seed(4)
    for shape, d in (((17, 23), 0.3), ((5, 40), 0.0), ((1, 1), 1.0), ((64, 8), 0.9)):
        mask = torch.rand(*shape, generator=g) < d
        p = Pattern.from_mask(mask)
        # the int32 form of the (compact) pattern: CSR positions for perm
        for a, b in zip(csr_index(mask), (p.rowptr, p.col, p.colptr, p.row, p.csr_positions())):
            assert a.dtype == torch.int32 and torch.equal(a, b.int())


def test_cuda_module_rehearsal_on_cpu():
    """A slice of tests/test_cuda.py in its CPU rehearsal (interpreter, sizes / 16): the GPU tests' reference,
    NaN fill and helpers work before a GPU run is spent on them. The whole rehearsal takes minutes; run it with
    SPARSECORE_CUDA_TESTS_ON=cpu python -m pytest --noconftest tests/test_cuda.py."""
    env = dict(os.environ, SPARSECORE_CUDA_TESTS_ON="cpu", PYTHONPATH=REPO + os.pathsep +
               os.environ.get("PYTHONPATH", ""))
    sel = ("(kernels_vs_float64 and (bsr16 or bsr32)) or (every_config and bsr32-sddmm-0) "
           "or (smoke_bsr and bs32-bf16) or (edge_cases and bsr32-bf16)")
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "--noconftest", "-p", "no:cacheprovider",
                        "tests/test_cuda.py", "-k", sel], cwd=REPO, env=env, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    assert " passed" in r.stdout and "failed" not in r.stdout, r.stdout[-2000:]
