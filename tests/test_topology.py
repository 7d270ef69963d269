"""Tests of sparsecore.topology: exact counts, validity, reproducibility, uniformity, TSM geometry, G2G structure."""
import math
import time
from collections import deque
from fractions import Fraction

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sparsecore.pattern import Pattern
from sparsecore import topology as T
from sparsecore.topology._common import distinct_rows

PROPS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# ----------------------------------------------------------------------------------------------- helpers
def coo(p: Pattern):
    """(rows, cols) int64 in CSR order (numpy row expansion: cheaper than Pattern.coo for many tiny patterns)."""
    rowptr = p.rowptr.numpy().astype(np.int64)
    rows = np.repeat(np.arange(rowptr.size - 1, dtype=np.int64), np.diff(rowptr))
    return torch.from_numpy(rows), p.col.to(torch.int64)


def check_valid(p: Pattern, shape, nnz=None, block_size=1):
    """In-range, duplicate-free, right shape / block size / count; returns (rows, cols) int64."""
    assert isinstance(p, Pattern)
    assert p.shape == tuple(shape)
    assert p.block_size == block_size
    r, c = coo(p)
    nr, nc = shape[0] // block_size, shape[1] // block_size
    if r.numel():
        assert 0 <= int(r.min()) and int(r.max()) < nr
        assert 0 <= int(c.min()) and int(c.max()) < nc
    assert torch.unique(r * max(nc, 1) + c).numel() == r.numel(), "duplicate connections"
    if nnz is not None:
        assert p.nnz == nnz
    return r, c


def chi2_ok(counts: torch.Tensor, expected: float) -> bool:
    """Loose chi-square check: statistic within mean + 6 sd of a chi2 with len-1 degrees of freedom."""
    df = counts.numel() - 1
    stat = float(((counts.double() - expected) ** 2 / expected).sum())
    return stat < df + 6 * math.sqrt(2 * df)


# ----------------------------------------------------------------------------------------------- sampling core
@pytest.mark.parametrize("n,k", [(10, 0), (10, 3), (10, 5), (10, 6), (10, 9), (10, 10), (1, 1), (1000, 17),
                                 (1000, 999), (2**40, 50)])
def test_distinct_rows_exact_distinct_in_range(n, k):
    g = torch.Generator().manual_seed(1)
    s = distinct_rows(7, n, k, g)
    assert s.shape == (7, k) and s.dtype == torch.int64
    for row in s:
        assert torch.unique(row).numel() == k
        if k:
            assert 0 <= int(row.min()) and int(row.max()) < n


@pytest.mark.parametrize("n,k", [(5, 2), (5, 3), (6, 1), (6, 5)])  # both regimes: rejection and complement
def test_distinct_rows_uniform_over_subsets(n, k):
    g = torch.Generator().manual_seed(123)
    trials = 30000
    s = torch.sort(distinct_rows(trials, n, k, g), dim=1).values
    code = (s * torch.tensor([n**i for i in range(k)])).sum(1)
    _, counts = torch.unique(code, return_counts=True)
    n_subsets = math.comb(n, k)
    assert counts.numel() == n_subsets
    assert chi2_ok(counts, trials / n_subsets)


def test_distinct_rows_redraw_path(monkeypatch):
    import sparsecore.topology._common as common
    monkeypatch.setattr(common, "_draws_for", lambda n, k: k)  # k draws: most rows miss k distinct, redrawn
    s = common.distinct_rows(3000, 6, 2, torch.Generator().manual_seed(0))
    assert bool((s[:, 0] != s[:, 1]).all())
    s = torch.sort(s, dim=1).values
    _, counts = torch.unique(s[:, 0] * 6 + s[:, 1], return_counts=True)
    assert counts.numel() == 15 and chi2_ok(counts, 3000 / 15)


def test_distinct_rows_rejects_bad_counts():
    with pytest.raises(ValueError):
        distinct_rows(1, 3, 4, None)


@pytest.mark.parametrize("n,k", [(10, 0), (10, 3), (10, 6), (10, 10), (1000, 17), (100_000, 20_000), (2**40, 50),
                                 (5_000_000, 400_000)])
def test_sorted_subset_is_distinct_rows_sorted(n, k, monkeypatch):
    """The random patterns' sampler: the same subset as distinct_rows from the same draws, sorted; also through
    its fallback for ties at the k-th key (forced) and after a redraw (too few distinct draws, forced)."""
    import sparsecore.topology._common as common

    def want(seed):
        return np.sort(distinct_rows(1, n, k, torch.Generator().manual_seed(seed))[0].numpy())

    got = common.sorted_subset(n, k, torch.Generator().manual_seed(3))
    assert got.dtype == np.int64 and np.array_equal(got, want(3))
    if 0 < k and 2 * k <= n:
        with monkeypatch.context() as m:
            m.setattr(common, "_kth_smallest", lambda keys, k: 2.0)  # every key "ties": distinct_rows' own path
            assert np.array_equal(common.sorted_subset(n, k, torch.Generator().manual_seed(4)), want(4))
    if 0 < k and 2 * k <= n <= 10:
        with monkeypatch.context() as m:
            m.setattr(common, "_draws_for", lambda n_, k_: k_)  # k draws: tries short of k distinct are redrawn
            for seed in range(6, 12):
                assert np.array_equal(common.sorted_subset(n, k, torch.Generator().manual_seed(seed)), want(seed))


def test_kth_smallest_of_keys():
    from sparsecore.topology._common import _kth_smallest

    rng = np.random.default_rng(0)
    keys = rng.random(300_000)
    keys[rng.random(300_000) < 0.1] = 2.0
    for k in (1, 7, 1000, 150_000, int((keys < 2).sum())):
        assert _kth_smallest(keys, k, bins=256, chunk=1000) == np.sort(keys)[k - 1]


# ----------------------------------------------------------------------------------------------- uniform / ER
@pytest.mark.parametrize("out,in_,d", [(50, 40, 0.0), (50, 40, 0.013), (50, 40, 0.3), (50, 40, 0.5),
                                       (50, 40, 0.77), (50, 40, 1.0), (1, 1, 1.0), (0, 7, 0.5), (7, 0, 0.5),
                                       (3000, 2000, 0.001)])
def test_uniform_exact_count(out, in_, d):
    p = T.uniform(out, in_, d, seed=0)
    check_valid(p, (out, in_), round(d * out * in_))


def test_uniform_reproducible_and_seed_dependent():
    a, b, c = T.uniform(64, 80, 0.2, seed=5), T.uniform(64, 80, 0.2, seed=5), T.uniform(64, 80, 0.2, seed=6)
    assert a == b and a != c
    g1, g2 = torch.Generator().manual_seed(9), torch.Generator().manual_seed(9)
    assert T.uniform(64, 80, 0.2, generator=g1) == T.uniform(64, 80, 0.2, generator=g2)
    assert T.uniform(64, 80, 0.2, seed=torch.Generator().manual_seed(9)) == T.uniform(
        64, 80, 0.2, generator=torch.Generator().manual_seed(9))
    torch.manual_seed(3)
    x = T.uniform(64, 80, 0.7)
    torch.manual_seed(3)
    assert T.uniform(64, 80, 0.7) == x


@pytest.mark.parametrize("d", [0.05, 0.3, 0.8])
def test_uniform_row_and_column_counts_statistics(d):
    out, in_ = 400, 500
    p = T.uniform(out, in_, d, seed=11)
    n_total, k = out * in_, round(d * out * in_)
    for axis_len, other in ((out, in_), (in_, out)):
        counts = (p.rowptr[1:] - p.rowptr[:-1]) if axis_len == out else (p.colptr[1:] - p.colptr[:-1])
        counts = counts.double()
        assert abs(float(counts.mean()) - k / axis_len) < 1e-9
        # each line's count is hypergeometric: draws k of n_total, `other` successes
        var = k * (other / n_total) * (1 - other / n_total) * (n_total - k) / (n_total - 1)
        assert 0.6 * var < float(counts.var()) < 1.5 * var


def test_uniform_every_position_equally_likely():
    occ = torch.zeros(16, dtype=torch.int64)
    for s in range(300):
        r, c = coo(T.uniform(4, 4, 0.25, seed=1000 + s))
        occ.index_add_(0, r * 4 + c, torch.ones_like(r))
    assert int(occ.sum()) == 300 * 4
    assert chi2_ok(occ, 300 * 4 / 16)


def test_erdos_renyi_count_density_and_cap():
    for out, in_, eps in [(100, 300, 1.0), (1000, 784, 20.0), (10, 10, 0.26), (5, 7, 0.0)]:
        p = T.erdos_renyi(out, in_, eps, seed=0)
        k = min(round(eps * (in_ + out)), out * in_)
        check_valid(p, (out, in_), k)
        assert T.er_count(out, in_, eps) == k
        assert T.er_density(out, in_, eps) == pytest.approx(min(1.0, eps * (in_ + out) / (in_ * out)))
    # more than out*in asked: capped (dense), not an error
    p = T.erdos_renyi(4, 6, 100.0, seed=0)
    check_valid(p, (4, 6), 24)
    assert T.er_density(4, 6, 100.0) == 1.0
    assert T.er_density(0, 6, 1.0) == 0.0
    assert T.erdos_renyi(30, 40, 2.0, seed=1) == T.erdos_renyi(30, 40, 2.0, seed=1)
    assert T.erdos_renyi(30, 40, 2.0, seed=1) != T.erdos_renyi(30, 40, 2.0, seed=2)


# ----------------------------------------------------------------------------------------------- ERK
def _n(s):
    return math.prod(s)


@pytest.mark.parametrize("shapes,density", [
    ([(1000, 784), (1000, 1000), (1000, 1000), (10, 1000)], 0.1),
    ([(1000, 784), (1000, 1000), (10, 1000)], 0.5),
    ([(4, 4), (1000, 1000)], 0.5),
    ([(8, 8), (16, 8), (4096, 4096)], 0.02),
    ([(64, 3, 3, 3), (128, 64, 3, 3), (10, 128)], 0.2),
    ([(300, 200)], 0.3),
])
def test_erk_total_matches_target(shapes, density):
    ds = T.erk_densities(shapes, density)
    assert len(ds) == len(shapes) and all(0.0 <= d <= 1.0 for d in ds)
    total = sum(_n(s) for s in shapes)
    assert sum(d * _n(s) for d, s in zip(ds, shapes)) == pytest.approx(density * total, rel=1e-9)
    raw = [sum(s) / _n(s) for s in shapes]
    free = [i for i, d in enumerate(ds) if d < 1.0]
    dense = [i for i, d in enumerate(ds) if d == 1.0]
    # the non-dense layers are ER-proportional with one global factor; dense ones score higher
    if free:
        eps = ds[free[0]] / raw[free[0]]
        for i in free:
            assert ds[i] == pytest.approx(eps * raw[i], rel=1e-9)
        for i in dense:
            assert raw[i] >= max(raw[j] for j in free) * (1 - 1e-12)


def test_erk_sets_small_layers_dense_and_edge_cases():
    ds = T.erk_densities([(4, 4), (1000, 1000)], 0.5)
    assert ds[0] == 1.0 and ds[1] < 0.5
    assert T.erk_densities([(10, 20), (30, 40)], 1.0) == [1.0, 1.0]
    assert T.erk_densities([(10, 20), (30, 40)], 0.0) == [0.0, 0.0]
    assert T.erk_densities([], 0.3) == []
    # linear layers: ERK equals ER up to a global factor
    shapes = [(1000, 784), (1000, 1000), (500, 1000)]
    ds = T.erk_densities(shapes, 0.05)
    ers = [T.er_density(o, i, 1.0) for o, i in shapes]
    assert [d / e for d, e in zip(ds, ers)] == pytest.approx([ds[0] / ers[0]] * 3)
    pats = T.erk(shapes, 0.05, seed=0)
    assert [p.nnz for p in pats] == [round(d * o * i) for d, (o, i) in zip(ds, shapes)]
    with pytest.raises(ValueError):
        T.erk_densities([(10, 0)], 0.5)
    with pytest.raises(ValueError):
        T.erk_densities([(10,)], 0.5)
    with pytest.raises(ValueError):
        T.erk_densities([(10, 10)], 1.5)


# ----------------------------------------------------------------------------------------------- random blocks
def test_random_blocks():
    p = T.random_blocks(64, 96, 0.3, 8, seed=0)
    check_valid(p, (64, 96), round(0.3 * 8 * 12), block_size=8)
    assert p.n_weights == p.nnz * 64
    assert p == T.random_blocks(64, 96, 0.3, 8, seed=0) and p != T.random_blocks(64, 96, 0.3, 8, seed=1)
    check_valid(T.random_blocks(16, 16, 1.0, 4, seed=0), (16, 16), 16, block_size=4)
    with pytest.raises(ValueError, match="block_size 7"):
        T.random_blocks(64, 96, 0.3, 7)


# ----------------------------------------------------------------------------------------------- validation
@pytest.mark.parametrize("call,exc", [
    (lambda: T.uniform(-1, 4, 0.5), ValueError),
    (lambda: T.uniform(4, -1, 0.5), ValueError),
    (lambda: T.uniform(4, 4, 1.5), ValueError),
    (lambda: T.uniform(4, 4, -0.1), ValueError),
    (lambda: T.uniform(4, 4, float("nan")), ValueError),
    (lambda: T.uniform(4.0, 4, 0.5), TypeError),
    (lambda: T.uniform(True, 4, 0.5), TypeError),
    (lambda: T.uniform(4, 4, "0.5"), TypeError),
    (lambda: T.uniform(4, 4, 0.5, seed=1, generator=torch.Generator()), ValueError),
    (lambda: T.uniform(4, 4, 0.5, seed=1.5), TypeError),
    (lambda: T.uniform(4, 4, 0.5, generator=3), TypeError),
    (lambda: T.erdos_renyi(4, 4, -1.0), ValueError),
    (lambda: T.erdos_renyi(4, 4, float("inf")), ValueError),
    (lambda: T.random_blocks(8, 8, 0.5, 0), ValueError),
    (lambda: T.random_blocks(8, 8, 2.0, 2), ValueError),
    (lambda: T.topographic(10, 12, (3, 4), fan_out=11), ValueError),
    (lambda: T.topographic(10, 12, (3, 4), fan_out=0), ValueError),
    (lambda: T.topographic(10, 13, (3, 4)), ValueError),
    (lambda: T.topographic(10, 24, (2, 3, 2, 2)), ValueError),
    (lambda: T.topographic(10, 12, "ab"), TypeError),
    (lambda: T.topographic(0, 12, (12,)), ValueError),
    (lambda: T.ensembles(12, 12, 5, 1), ValueError),
    (lambda: T.ensembles(12, 12, 4, 5), ValueError),
    (lambda: T.ensembles(12, 12, 4, 0), ValueError),
    (lambda: T.ensembles(12, 12, 4, 2, linking="star"), ValueError),
    (lambda: T.ensembles(12, 12, 4, 2, inner_density=1.2), ValueError),
    (lambda: T.ensembles(12, 12, 4, 2, block_size=2), ValueError),
    (lambda: T.ensemble_of(10, 3), ValueError),
    (lambda: T.linked_ensembles(3, 4), ValueError),
])
def test_argument_validation(call, exc):
    with pytest.raises(exc):
        call()


def test_error_messages_name_the_sizes():
    with pytest.raises(ValueError, match=r"groups=5 .*out=12 and in_=20"):
        T.ensembles(12, 20, 5, 1)
    with pytest.raises(ValueError, match=r"block_size=4 .*out/groups=6 and in_/groups=10"):
        T.ensembles(12, 20, 2, 1, block_size=4)
    with pytest.raises(ValueError, match=r"fan_out=11 > out=10"):
        T.topographic(10, 12, (3, 4), fan_out=11)


# ----------------------------------------------------------------------------------------------- TSM
def brute_targets(out, input_shape, fan_out, gh, gw):
    """(HW, k) nearest neurons by exact rational distances, ties -> lower index."""
    if len(input_shape) == 1:
        H, W = input_shape[0], 1
    else:
        H, W = input_shape[0], input_shape[1]
    res = []
    for h in range(H):
        for w in range(W):
            y, x = Fraction(2 * h + 1, 2 * H), Fraction(2 * w + 1, 2 * W)
            d = []
            for a in range(gh):
                for b in range(gw):
                    dy, dx = y - Fraction(2 * a + 1, 2 * gh), x - Fraction(2 * b + 1, 2 * gw)
                    d.append((dy * dy + dx * dx, a * gw + b))
            d.sort()
            res.append([j for _, j in d[:fan_out]])
    return torch.tensor(res, dtype=torch.int64)


def targets_from_pattern(p: Pattern, n_pixels: int, channels: int, channels_first: bool):
    """Sorted target neurons of every input feature: (in, fan_out)."""
    r, c = coo(p)
    order = torch.argsort(c * p.shape[0] + r)
    rows = r[order].view(p.shape[1], -1)
    return rows


def grid_of(out, input_shape):
    g = T.topographic_grid(out, input_shape)
    return (g[0], 1) if len(g) == 1 else g


def check_grid_optimal(out, H, W, gh, gw):
    assert gh * gw == out
    err = lambda a, b: max(Fraction(a * W, b * H), Fraction(b * H, a * W))
    for a in range(1, out + 1):
        if out % a == 0:
            assert err(gh, gw) <= err(a, out // a)


def connected_4(cells):
    cells = set(cells)
    if not cells:
        return True
    start = next(iter(cells))
    seen, todo = {start}, deque([start])
    while todo:
        h, w = todo.popleft()
        for nb in ((h + 1, w), (h - 1, w), (h, w + 1), (h, w - 1)):
            if nb in cells and nb not in seen:
                seen.add(nb)
                todo.append(nb)
    return len(seen) == len(cells)


def receptive_fields(out, input_shape, fan_out):
    """Pixels (h, w) of each neuron's receptive field, from topographic_targets."""
    W = input_shape[1] if len(input_shape) > 1 else 1
    fields = [[] for _ in range(out)]
    for q, row in enumerate(T.topographic_targets(out, input_shape, fan_out).tolist()):
        for j in row:
            fields[j].append((q // W, q % W))
    return fields


def is_rectangle(cells):
    if not cells:
        return True
    hs, ws = {h for h, _ in cells}, {w for _, w in cells}
    return len(cells) == (max(hs) - min(hs) + 1) * (max(ws) - min(ws) + 1)


def check_topographic(out, input_shape, fan_out, channels_first=False, contiguous=True):
    if len(input_shape) == 3:
        H, W, C = input_shape if not channels_first else (input_shape[1], input_shape[2], input_shape[0])
    elif len(input_shape) == 2:
        (H, W), C = input_shape, 1
    else:
        H, W, C = input_shape[0], 1, 1
    in_ = H * W * C
    p = T.topographic(out, in_, input_shape, fan_out=fan_out, channels_first=channels_first)
    check_valid(p, (out, in_), fan_out * in_)
    gh, gw = grid_of(out, input_shape if not channels_first else (H, W, C))
    if len(input_shape) > 1:
        check_grid_optimal(out, H, W, gh, gw)
    else:
        assert (gh, gw) == (out, 1)
    # every feature's targets are exactly the brute-force nearest neurons
    rows = targets_from_pattern(p, H * W, C, channels_first)                  # (in, k) sorted
    brute = torch.sort(brute_targets(out, (H, W) if len(input_shape) > 1 else (H,), fan_out, gh, gw), 1).values
    feat_pixel = (torch.arange(in_) % (H * W)) if channels_first else (torch.arange(in_) // C)
    assert torch.equal(rows, brute[feat_pixel])
    # topographic_targets agrees, nearest first
    tt = T.topographic_targets(out, input_shape, fan_out, channels_first=channels_first)
    assert torch.equal(torch.sort(tt, 1).values, brute)
    # all channels of a pixel share targets
    per_pixel = rows.view(C, H * W, fan_out).transpose(0, 1) if channels_first else rows.view(H * W, C, fan_out)
    assert bool((per_pixel == per_pixel[:, :1, :]).all())
    # receptive fields on the pixel grid: rectangles for fan_out 1, intervals in 1-D, else contiguous where
    # asked (see the topographic module docstring: not guaranteed near borders for fan_out > 1)
    r, c = coo(p)
    pixel = c % (H * W) if channels_first else c // C
    fields = [[] for _ in range(out)]
    for j, q in set(zip(r.tolist(), pixel.tolist())):
        fields[j].append((q // W, q % W))
    for j, cells in enumerate(fields):
        if fan_out == 1 or W == 1 or H == 1:
            assert is_rectangle(cells), f"neuron {j} receptive field {sorted(cells)} is not a rectangle"
        if contiguous:
            assert connected_4(cells), f"neuron {j} receptive field not contiguous"
    return p


@pytest.mark.parametrize("out,input_shape,fan_out", [
    (16, (4, 4), 1), (4, (4, 4), 2), (12, (6, 8), 3), (25, (10, 10), 4), (7, (5, 9), 2), (100, (7, 7), 1),
    (10, (28,), 1), (5, (10,), 2), (30, (7,), 3), (6, (3, 4, 2), 2), (9, (6, 6, 3), 4), (40, (28, 28), 1),
])
def test_topographic_matches_brute_force(out, input_shape, fan_out):
    check_topographic(out, input_shape, fan_out)


def test_topographic_channels_first():
    a = check_topographic(6, (2, 3, 4), 2, channels_first=True)       # (C, H, W)
    # the same map as channels-last, features permuted
    b = T.topographic(6, 24, (3, 4, 2), fan_out=2)
    perm = torch.arange(24).view(3, 4, 2).permute(2, 0, 1).reshape(-1)  # cf feature -> cl feature
    assert torch.equal(a.mask(), b.mask()[:, perm])


def test_topographic_known_layouts():
    assert T.topographic_grid(1000, (28, 28)) == (25, 40)
    assert T.topographic_grid(1000, (28, 28, 1)) == (25, 40)
    assert T.topographic_grid(1000, (784,)) == (1000,)
    assert T.topographic_grid(12, (2, 3)) == (3, 4)
    assert T.topographic_grid(12, (3, 2)) == (4, 3)
    # identity when the grid equals the image, and nnz independent of the hidden width
    p = T.topographic(16, 16, (4, 4))
    assert torch.equal(p.mask(), torch.eye(16, dtype=torch.bool))
    for hidden in (10, 100, 1000):
        assert T.topographic(hidden, 784, (28, 28)).nnz == 784
    # 1-D, fan_out 1: a monotone (convergent) map
    r, c = coo(T.topographic(10, 100, (100,)))
    tgt = r[torch.argsort(c)]
    assert torch.equal(tgt, torch.arange(100) // 10)
    # seed accepted, no effect
    assert T.topographic(40, 784, (28, 28), seed=1) == T.topographic(40, 784, (28, 28), seed=2)


@PROPS
@given(H=st.integers(1, 7), W=st.integers(1, 7), C=st.integers(1, 3), out=st.integers(1, 30),
       data=st.data())
def test_topographic_property(H, W, C, out, data):
    fan_out = data.draw(st.integers(1, min(out, 6)))
    shape = data.draw(st.sampled_from([(H, W, C), (H, W), (H * W,)]))
    check_topographic(out, shape, fan_out, contiguous=fan_out == 1 or len(shape) == 1)


@pytest.mark.parametrize("out", [100, 1000])
def test_topographic_mnist_like_fields_contiguous(out):
    for fan_out in range(1, 9):
        for j, cells in enumerate(receptive_fields(out, (28, 28), fan_out)):
            assert connected_4(cells), (fan_out, j)


def test_topographic_border_case_nearest_wins_over_contiguity():
    # documented limit: nearest neurons are the rule; a corner-region spike may skip a pixel column
    fields = receptive_fields(39, (2, 7), 12)
    assert sorted(fields[18]) == [(0, 0), (0, 2), (0, 3), (1, 0), (1, 2), (1, 3)]
    assert not connected_4(fields[18])


# ----------------------------------------------------------------------------------------------- G2G
def check_ensembles(out, in_, groups, links, inner_density=1.0, linking="ring", block_size=1, seed=0):
    p = T.ensembles(out, in_, groups, links, inner_density=inner_density, linking=linking,
                    block_size=block_size, seed=seed)
    bs = block_size
    bo, bi = out // groups // bs, in_ // groups // bs
    per_pair = round(inner_density * bo * bi)
    r, c = check_valid(p, (out, in_), groups * links * per_pair, block_size=bs)
    lk = T.linked_ensembles(groups, links, linking=linking, seed=seed)
    assert lk.shape == (groups * links, 2)
    linked = {(int(a), int(b)) for a, b in lk}
    assert len(linked) == groups * links
    for g in range(groups):  # itself plus links-1 distinct others
        ins = {b for a, b in linked if a == g}
        assert g in ins and len(ins) == links
        if linking == "ring":
            assert ins == {(g + i) % groups for i in range(links)}
    # connections only within linked pairs, exact count per pair
    eo = T.ensemble_of(out, groups)[r * bs]
    ei = T.ensemble_of(in_, groups)[c * bs]
    pair_counts = torch.zeros(groups, groups, dtype=torch.int64)
    pair_counts.index_put_((eo, ei), torch.ones_like(eo), accumulate=True)
    for a in range(groups):
        for b in range(groups):
            assert int(pair_counts[a, b]) == (per_pair if (a, b) in linked else 0)
    assert p.density == pytest.approx(links / groups * per_pair / (bo * bi))
    if abs(inner_density * bo * bi - per_pair) < 1e-9:  # no rounding: the formula exactly
        assert p.density == pytest.approx(links / groups * inner_density)
    return p


@pytest.mark.parametrize("args", [
    dict(out=16, in_=16, groups=4, links=1),
    dict(out=16, in_=16, groups=4, links=2),
    dict(out=24, in_=36, groups=6, links=3, linking="random"),
    dict(out=24, in_=36, groups=6, links=6, linking="random"),
    dict(out=40, in_=20, groups=5, links=2, inner_density=0.3),
    dict(out=40, in_=20, groups=5, links=2, inner_density=0.7, linking="random"),
    dict(out=64, in_=128, groups=4, links=2, block_size=8),
    dict(out=64, in_=128, groups=4, links=3, block_size=8, inner_density=0.5, linking="random"),
    dict(out=1000, in_=784, groups=4, links=1),
])
def test_ensembles_structure(args):
    check_ensembles(**args)


def test_ensembles_headline_density_and_helpers():
    p = T.ensembles(1000, 1000, 4, 1, seed=0)
    assert p.density == pytest.approx(0.25)
    assert torch.equal(T.ensemble_of(12, 3), torch.tensor([0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2]))
    assert torch.equal(T.linked_ensembles(4, 2), torch.tensor([[0, 0], [0, 1], [1, 1], [1, 2],
                                                                 [2, 2], [2, 3], [3, 0], [3, 3]]))
    # random linking and inner sampling are reproducible and seed dependent
    a = T.ensembles(60, 60, 6, 2, linking="random", inner_density=0.5, seed=3)
    assert a == T.ensembles(60, 60, 6, 2, linking="random", inner_density=0.5, seed=3)
    assert a != T.ensembles(60, 60, 6, 2, linking="random", inner_density=0.5, seed=4)


@pytest.mark.parametrize("linking", ["ring", "random"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ensembles_bsr_equals_csr_expanded(linking, seed):
    csr = T.ensembles(48, 96, 3, 2, linking=linking, seed=seed)
    bsr = T.ensembles(48, 96, 3, 2, linking=linking, block_size=8, seed=seed)
    assert bsr.block_size == 8 and csr.block_size == 1
    assert torch.equal(bsr.mask(), csr.mask())
    assert bsr.n_weights == csr.nnz


def test_ensembles_bsr_inner_density_counts_blocks():
    p = T.ensembles(64, 64, 2, 1, inner_density=0.25, block_size=4, seed=0)
    assert p.nnz == 2 * round(0.25 * 8 * 8) and p.n_weights == p.nnz * 16


@PROPS
@given(groups=st.integers(1, 5), so=st.integers(1, 6), si=st.integers(1, 6), data=st.data())
def test_ensembles_property(groups, so, si, data):
    links = data.draw(st.integers(1, groups))
    bs = data.draw(st.sampled_from([b for b in (1, 2, 3) if so % b == 0 and si % b == 0]))
    inner = data.draw(st.sampled_from([1.0, 0.5, 0.1, 0.0, 0.8]))
    linking = data.draw(st.sampled_from(["ring", "random"]))
    seed = data.draw(st.integers(0, 2**32))
    check_ensembles(groups * so, groups * si, groups, links, inner, linking, bs, seed)


# ----------------------------------------------------------------------------------------------- properties
@PROPS
@given(out=st.integers(0, 40), in_=st.integers(0, 40), d=st.floats(0, 1), seed=st.integers(0, 2**63 - 1))
def test_uniform_property(out, in_, d, seed):
    p = T.uniform(out, in_, d, seed=seed)
    check_valid(p, (out, in_), round(d * out * in_))
    assert p == T.uniform(out, in_, d, seed=seed)


@PROPS
@given(out=st.integers(0, 40), in_=st.integers(0, 40), eps=st.floats(0, 50), seed=st.integers(0, 1000))
def test_erdos_renyi_property(out, in_, eps, seed):
    p = T.erdos_renyi(out, in_, eps, seed=seed)
    check_valid(p, (out, in_), min(round(eps * (in_ + out)), out * in_))


@PROPS
@given(nb_r=st.integers(0, 8), nb_c=st.integers(0, 8), bs=st.integers(1, 4), d=st.floats(0, 1),
       seed=st.integers(0, 1000))
def test_random_blocks_property(nb_r, nb_c, bs, d, seed):
    p = T.random_blocks(nb_r * bs, nb_c * bs, d, bs, seed=seed)
    check_valid(p, (nb_r * bs, nb_c * bs), round(d * nb_r * nb_c), block_size=bs)


@PROPS
@given(shapes=st.lists(st.tuples(st.integers(1, 300), st.integers(1, 300)), min_size=1, max_size=5),
       d=st.floats(0, 1))
def test_erk_property(shapes, d):
    ds = T.erk_densities(shapes, d)
    total = sum(o * i for o, i in shapes)
    assert all(0 <= x <= 1 for x in ds)
    assert sum(x * o * i for x, (o, i) in zip(ds, shapes)) == pytest.approx(d * total, rel=1e-9, abs=1e-9)


# ----------------------------------------------------------------------------------------------- large (no timing asserts)
def test_large_layer_generation_prints_time():
    t0 = time.perf_counter()
    p = T.uniform(4096, 4096, 0.1, seed=0)
    dt = time.perf_counter() - t0
    assert p.nnz == round(0.1 * 4096 * 4096)
    print(f"\nuniform 4096x4096 @ 10%: {dt:.3f} s (threads={torch.get_num_threads()})")


@pytest.mark.parametrize("out,in_,k,bs", [(37, 45, 500, 1), (1, 9, 3, 1), (40, 1, 10, 1), (6, 8, 48, 1),
                                          (300, 200, 31000, 1), (16, 24, 5, 8)])
def test_random_pattern_is_the_csr_of_its_draws(out, in_, k, bs):
    """The builder takes the CSR straight from the sorted flat draws (no (row, col) pairs, no sort order): the
    pattern equals Pattern.from_indices of the same draws, transpose index included, and is valid."""
    from sparsecore.pattern import Pattern
    from sparsecore.topology._common import distinct_rows
    from sparsecore.topology.unstructured import _random_pattern

    n_r, n_c = out // bs if bs > 1 else out, in_ // bs if bs > 1 else in_
    flat = distinct_rows(1, n_r * n_c, k, torch.Generator().manual_seed(5))[0]
    ref = Pattern.from_indices(flat // n_c, flat % n_c, (n_r * bs, n_c * bs), bs)
    got = _random_pattern(n_r, n_c, k, bs, torch.Generator().manual_seed(5))
    assert got.nnz == k
    for name, t in ref.tensors().items():
        assert torch.equal(getattr(got, name), t), name
