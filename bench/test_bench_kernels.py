"""pytest-benchmark micro-benchmarks of the CPU kernels against dense, dense*mask and torch.sparse CSR.

Run:  python -m pytest bench/test_bench_kernels.py --benchmark-only --benchmark-group-by=param:density
Shapes default to 2048x2048, batch 128 (set SPARSECORE_BENCH_SIZE / SPARSECORE_BENCH_BATCH to change);
compare the groups' means: each group holds every implementation at one density, taken in one run.
"""
import os
import warnings

import pytest
import torch
from torch import nn

from sparsecore import SparseLinear
from sparsecore.ops import sddmm, spmm_t
from sparsecore.topology import random_blocks, uniform

SIZE = int(os.environ.get("SPARSECORE_BENCH_SIZE", 2048))
BATCH = int(os.environ.get("SPARSECORE_BENCH_BATCH", 128))
DENSITIES = [0.5, 0.1, 0.05, 0.01]


@pytest.fixture(scope="module")
def data():
    g = torch.Generator().manual_seed(0)
    return torch.randn(BATCH, SIZE, generator=g), torch.randn(BATCH, SIZE, generator=g)


def _step(layer_fn, x, dy):
    x.grad = None
    layer_fn(x).backward(dy)


@pytest.mark.parametrize("density", DENSITIES)
@pytest.mark.parametrize("impl", ["dense", "dense*mask", "torch.sparse", "sparsecore-csr", "sparsecore-bsr32"])
@pytest.mark.parametrize("phase", ["forward", "step"])
def test_layer(benchmark, data, impl, density, phase):
    x0, dy = data
    x = x0.clone().requires_grad_(phase == "step")
    if impl == "dense":
        f = nn.Linear(SIZE, SIZE)
    elif impl == "dense*mask":
        lin = nn.Linear(SIZE, SIZE)
        m = uniform(SIZE, SIZE, density, seed=0).mask().float()
        f = lambda x: nn.functional.linear(x, lin.weight * m, lin.bias)  # noqa: E731
    elif impl == "torch.sparse":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            w = (torch.randn(SIZE, SIZE) * uniform(SIZE, SIZE, density, seed=0).mask()).to_sparse_csr()
        w.requires_grad_()
        f = lambda x: torch.sparse.mm(w, x.T).T  # noqa: E731
    elif impl == "sparsecore-csr":
        f = SparseLinear(SIZE, SIZE, pattern=uniform(SIZE, SIZE, density, seed=0))
    else:
        f = SparseLinear(SIZE, SIZE, pattern=random_blocks(SIZE, SIZE, density, 32, seed=0))
    if phase == "forward":
        with torch.no_grad():
            benchmark(f, x)
    else:
        benchmark(_step, f, x, dy)


@pytest.mark.parametrize("density", DENSITIES)
@pytest.mark.parametrize("kernel", ["dX", "dW"])
def test_backward_kernels(benchmark, data, density, kernel):
    x, dy = data
    layer = SparseLinear(SIZE, SIZE, pattern=uniform(SIZE, SIZE, density, seed=0))
    p, v = layer.pattern, layer.values.detach()
    if kernel == "dX":
        benchmark(spmm_t, dy, v, p.rowptr, p.col, p.colptr, p.row, p.perm, SIZE, 1)
    else:
        benchmark(sddmm, dy, x, p.rowptr, p.col, p.colptr, p.row, p.perm, 1)
