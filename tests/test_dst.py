"""Tests of sparsecore.dst: the C++ structure edits against plain references, and every Updater method.

References here are deliberately naive: dense masks, full sorts, a sequential loop over the random stream. Ties are
broken by the documented seeded key ``tie(pos) = fmix64(pos + fmix64(seed ^ GOLDEN))``, re-implemented here in
numpy, so the references reproduce the C++ selections exactly.
"""
import math

import numpy as np
import pytest
import torch
from torch import nn

from sparsecore import _C
from sparsecore.dst import Updater
from sparsecore.dst import edit as E
from sparsecore.dst.scores import ActivationStats, dense_grad_chunks, similarity_chunks
from sparsecore.dst.schedule import cubic_sparsity, rigl_fraction
from sparsecore.nn import SparseLinear
from sparsecore.pattern import Pattern
from sparsecore import topology as T

M64 = (1 << 64) - 1
GOLDEN = 0x9E3779B97F4A7C15


@pytest.fixture(autouse=True)
def one_thread():
    """The models here are tiny: one thread keeps the suite fast on a busy 2-core machine (waking a second thread
    costs more than the work). Thread-count independence is tested explicitly (``threads`` parameters and
    test_results_do_not_depend_on_threads, large enough to use several threads)."""
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(prev)


# ----------------------------------------------------------------------------------------------- references
def fmix64(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.uint64).copy()
    with np.errstate(over="ignore"):
        x ^= x >> np.uint64(33)
        x *= np.uint64(0xFF51AFD7ED558CCD)
        x ^= x >> np.uint64(33)
        x *= np.uint64(0xC4CEB9FE1A85EC53)
        x ^= x >> np.uint64(33)
    return x


def tie(pos, seed) -> np.ndarray:
    smix = fmix64(np.array([(int(seed) ^ GOLDEN) & M64], dtype=np.uint64))[0]
    with np.errstate(over="ignore"):
        return fmix64(np.asarray(pos, dtype=np.int64).astype(np.uint64) + smix)


def coo(p: Pattern):
    r, c = p.coo()
    return r.numpy(), c.numpy()


def linpos(p: Pattern) -> np.ndarray:
    r, c = coo(p)
    return r * (p.shape[1] // p.block_size) + c


def ref_prune(p: Pattern, scores: np.ndarray, k: int, seed: int) -> np.ndarray:
    """Bool keep over CSR entries: drop the k smallest by (score, tie)."""
    order = np.lexsort((tie(linpos(p), seed), scores))
    keep = np.ones(p.nnz, bool)
    keep[order[:k]] = False
    return keep


def ref_grow(S: np.ndarray, occupied: np.ndarray, k: int, seed: int) -> np.ndarray:
    """Sorted linear positions of the k best empty positions by score (desc), ties by the tie key."""
    flat = S.reshape(-1)
    pos = np.flatnonzero(~occupied.reshape(-1) & np.isfinite(flat))
    order = np.lexsort((tie(pos, seed), -flat[pos]))
    return np.sort(pos[order[:k]])


def ref_random(occupied: np.ndarray, k: int, seed: int) -> np.ndarray:
    """Sorted linear positions: the first k distinct empty positions of the random stream (sequential)."""
    N = occupied.size
    occ = occupied.reshape(-1).copy()
    chosen, start = [], 0
    while len(chosen) < k:
        for p in _C.dst_random_stream(seed, start, 4096, *occupied.shape):
            if not occ[p]:
                occ[p] = True
                chosen.append(int(p))
                if len(chosen) == k:
                    break
        start += 4096
    return np.sort(np.array(chosen, dtype=np.int64))


def ref_enumerate(occupied: np.ndarray, k: int, seed: int) -> np.ndarray:
    pos = np.flatnonzero(~occupied.reshape(-1))
    return np.sort(pos[np.argsort(tie(pos, seed), kind="stable")[:k]])


def ref_regrow(occupied: np.ndarray, k: int, seed: int) -> np.ndarray:
    """Random regrowth as documented: the stream sampler when it needs at most N/4 draws (expected, +5% + 64),
    else the k empty positions with the smallest tie keys."""
    N = occupied.size
    A = N - int(occupied.sum())
    m = math.inf if k >= A else 1.05 * N * -math.log1p(-k / A) + 64
    return ref_random(occupied, k, seed) if m <= N / 4 else ref_enumerate(occupied, k, seed)


def block_mask(p: Pattern) -> np.ndarray:
    return p.block_mask().numpy()


def check_pattern(p: Pattern) -> None:
    """Valid CSR (sorted, no duplicates) with the transpose index pattern.py builds."""
    q = Pattern.from_csr(p.rowptr, p.col, p.shape, p.block_size)
    for name in ("colptr", "row", "perm"):
        assert torch.equal(getattr(q, name), getattr(p, name).cpu()), name


def values_by_pos(layer: SparseLinear, t: torch.Tensor) -> dict:
    return {int(q): t[j].clone() for j, q in enumerate(linpos(layer.pattern))}


def mlp(sizes, density=0.3, seed=0, dtype=torch.float64, layout="csr", block_size=None):
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    layers = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(SparseLinear(a, b, density=density, layout=layout, block_size=block_size, generator=g,
                                   dtype=dtype))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def easy_data(n=512, d=32, classes=4, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=dtype)
    y = x[:, :classes].argmax(1)
    return x, y


def train_steps(model, opt, updater, x, y, steps, batch=64, start=0):
    losses = []
    for s in range(start, start + steps):
        i = (s * batch) % x.shape[0]
        xb, yb = x[i:i + batch], y[i:i + batch]
        loss = nn.functional.cross_entropy(model(xb), yb)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if updater is not None:
            updater.step()
        losses.append(float(loss.detach()))
    return losses


def snapshot(layer, opt):
    st = {k: v.clone() for k, v in opt.state.get(layer.values, {}).items()
          if torch.is_tensor(v) and v.shape == layer.values.shape}
    return layer.pattern.to("cpu"), layer.values.detach().clone(), st


def check_survivors(layer, opt, before, keep_ref, new_pos_ref=None, init_check=None):
    """Survivors keep value and every state tensor bit for bit; newcomers have zero state."""
    p0, v0, st0 = before
    p1 = layer.pattern
    pos0, pos1 = linpos(p0), linpos(p1)
    idx1 = {int(q): j for j, q in enumerate(pos1)}
    st1 = {k: v for k, v in opt.state.get(layer.values, {}).items()
           if torch.is_tensor(v) and v.shape == layer.values.shape}
    assert set(st1) == set(st0)
    survivors = pos0[keep_ref]
    for j0, q in zip(np.flatnonzero(keep_ref), survivors):
        j1 = idx1[int(q)]
        assert torch.equal(layer.values.detach()[j1], v0[j0])
        for k in st0:
            assert torch.equal(st1[k][j1], st0[k][j0]), k
    new = np.setdiff1d(pos1, survivors)
    if new_pos_ref is not None:
        np.testing.assert_array_equal(new, new_pos_ref)
    newj = np.array([idx1[int(q)] for q in new], dtype=np.int64)
    for k in st1:
        assert torch.count_nonzero(st1[k][torch.from_numpy(newj)]) == 0, k
    return torch.from_numpy(newj)


# ----------------------------------------------------------------------------------------------- C++ primitives
def test_tie_keys_match_numpy():
    pos = np.array([0, 1, 2, 12345, 2**40 + 7], dtype=np.int64)
    for seed in (0, 1, 2**63 - 5):
        np.testing.assert_array_equal(_C.dst_tie_keys(pos, seed), tie(pos, seed))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("threads", [1, 2])
def test_prune_keep_matches_reference_with_ties(dtype, threads):
    rng = np.random.default_rng(0)
    p = T.uniform(60, 50, 0.3, seed=1)
    for levels in (3, 1000, None):  # heavy ties, some ties, none
        s = rng.random(p.nnz) if levels is None else rng.integers(0, levels, p.nnz) / levels
        s = s.astype(dtype)
        for k in (0, 1, 17, p.nnz // 2, p.nnz - 1, p.nnz):
            keep = _C.dst_prune_keep(s, p.rowptr.numpy(), p.col.int().numpy(), 50, k, 99 + k, threads)
            np.testing.assert_array_equal(keep.astype(bool), ref_prune(p, s, k, 99 + k))


def test_prune_keep_negative_and_inf_scores():
    p = T.uniform(20, 20, 0.5, seed=2)
    s = np.random.default_rng(1).standard_normal(p.nnz)
    s[::7] = np.inf
    s[::11] = -np.inf
    keep = _C.dst_prune_keep(s, p.rowptr.numpy(), p.col.int().numpy(), 20, 50, 5, 1)
    np.testing.assert_array_equal(keep.astype(bool), ref_prune(p, s, 50, 5))


@pytest.mark.parametrize("shape,density,zeta", [((40, 30), 0.1, 0.3), ((7, 200), 0.05, 0.5), ((64, 64), 0.3, 0.3)])
def test_random_absent_is_the_sequential_sampler(shape, density, zeta):
    p = T.uniform(*shape, density, seed=3)
    k = int(zeta * p.nnz)
    keep = _C.dst_prune_keep(np.random.default_rng(0).random(p.nnz), p.rowptr.numpy(), p.col.int().numpy(), shape[1], k, 1)
    for seed in (0, 7):
        for mask in (keep, None):
            rows, cols = E.random_absent(p, k, seed, mask)
            occ = np.zeros(shape, bool)
            r, c = coo(p)
            sel = np.ones(p.nnz, bool) if mask is None else mask.astype(bool)
            occ[r[sel], c[sel]] = True
            got = rows.astype(np.int64) * shape[1] + cols
            assert np.all(np.diff(got) > 0)
            np.testing.assert_array_equal(got, ref_random(occ, k, seed))


def test_random_absent_enumeration_path_for_dense_layers():
    p = T.uniform(30, 40, 0.9, seed=4)
    k = 100  # of 120 empty positions: the stream would need too many draws
    rows, cols = E.random_absent(p, k, 11)
    occ = block_mask(p)
    np.testing.assert_array_equal(rows.astype(np.int64) * 40 + cols, ref_enumerate(occ, k, 11))
    with pytest.raises(ValueError, match="only"):
        E.random_absent(p, 121, 1)


def test_random_regrowth_is_uniform():
    # every empty position of a small layer is drawn with the same frequency
    p = T.uniform(6, 5, 0.4, seed=5)
    occ = block_mask(p)
    counts = np.zeros(30)
    n_rep = 2000
    for s in range(n_rep):
        rows, cols = E.random_absent(p, 3, s)
        counts[rows.astype(np.int64) * 5 + cols] += 1
    free = ~occ.reshape(-1)
    assert counts[~free].sum() == 0
    expected = n_rep * 3 / free.sum()
    chi2 = ((counts[free] - expected) ** 2 / expected).sum()
    assert chi2 < 60  # 17 degrees of freedom: p < 1e-6 by chance


def test_regrow_random_equals_merge_of_random_absent():
    p = T.uniform(50, 70, 0.15, seed=6)
    keep = _C.dst_prune_keep(np.random.default_rng(2).random(p.nnz), p.rowptr.numpy(), p.col.int().numpy(), 70, 150, 3)
    for occ in (keep, None):
        a = E.regrow_random(p, keep, 150, 9, occ)
        b = E.merge(p, keep, *E.random_absent(p, 150, 9, occ))
        assert a[0] == b[0] and torch.equal(a[1], b[1]) and torch.equal(a[2], b[2])
        check_pattern(a[0])


@pytest.mark.parametrize("threads", [1, 2])
def test_topk_streaming_matches_reference(threads):
    prev = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        rng = np.random.default_rng(3)
        p = T.uniform(45, 33, 0.2, seed=7)
        occ_mask = rng.random(p.nnz) < 0.8
        S = rng.integers(0, 5, size=(45, 33)).astype(np.float32)  # many ties
        S[rng.random((45, 33)) < 0.05] = -np.inf
        S[rng.random((45, 33)) < 0.05] = np.nan
        occ = np.zeros((45, 33), bool)
        r, c = coo(p)
        occ[r[occ_mask], c[occ_mask]] = True
        for k in (1, 10, 200, 5000):
            for rows_per_chunk in (1, 7, 45):
                tk = E.TopKAbsent(p, k, 21, occ_mask.astype(np.uint8))
                for r0 in range(0, 45, rows_per_chunk):
                    tk.push(r0, torch.from_numpy(S[r0:r0 + rows_per_chunk]))
                rows, cols = tk.result()
                got = rows.astype(np.int64) * 33 + cols
                np.testing.assert_array_equal(got, ref_grow(S, occ, k, 21))
    finally:
        torch.set_num_threads(prev)


def test_results_do_not_depend_on_threads():
    # large enough for the C++ side to split the work (one thread per 2**15 elementary steps)
    p = T.uniform(700, 600, 0.4, seed=12)
    rng = np.random.default_rng(5)
    w = torch.from_numpy(rng.standard_normal(p.nnz).astype(np.float32))
    S = torch.from_numpy(rng.random((700, 600)).astype(np.float32))
    k = int(0.3 * p.nnz)
    results = []
    for threads in (1, 2):
        torch.set_num_threads(threads)
        keep = E.prune_keep(p, w.abs(), k, 3)
        a = E.regrow_random(p, keep, k, 4, keep)
        b = E.merge(p, keep, *E.random_absent(p, k, 4, keep))
        tk = E.TopKAbsent(p, k, 5, keep)
        for r0 in range(0, 700, 128):
            tk.push(r0, S[r0:r0 + 128])
        out = torch.empty(a[1].numel())
        E._gather_into(w, a[1], out)
        results.append([keep, *a[0].tensors().values(), a[1], a[2], *b[0].tensors().values(), *tk.result(), out])
    for x1, x2 in zip(*results):
        assert np.array_equal(np.asarray(x1), np.asarray(x2))
    check_pattern(a[0])


def test_merge_gather_and_errors():
    p = T.uniform(10, 12, 0.3, seed=8)
    keep = np.ones(p.nnz, np.uint8)
    keep[::3] = 0
    occ = block_mask(p).copy()
    r, c = coo(p)
    occ[r[keep == 0], c[keep == 0]] = False
    free = np.flatnonzero(~occ.reshape(-1))[:5]
    newp, gather, newpos = E.merge(p, keep, (free // 12).astype(np.int32), (free % 12).astype(np.int32))
    check_pattern(newp)
    old = linpos(p)
    now = linpos(newp)
    g = gather.numpy()
    assert np.all(now[g >= 0] == old[g[g >= 0]])
    np.testing.assert_array_equal(now[newpos.numpy()], free)
    assert (g < 0).sum() == 5
    kept = np.flatnonzero(keep)
    with pytest.raises(ValueError, match="kept"):
        E.merge(p, keep, np.array([r[kept[0]]], np.int32), np.array([c[kept[0]]], np.int32))
    with pytest.raises(ValueError, match="row-major"):
        E.merge(p, keep, np.array([5, 1], np.int32), np.array([0, 0], np.int32))


@pytest.mark.parametrize("shape,density", [((100, 5000), 0.01), ((300, 200), 0.2), ((50, 1), 0.5), ((3, 4), 0.0)])
@pytest.mark.parametrize("threads", [1, 2])
def test_transpose_equals_pattern_transpose(shape, density, threads):
    p = T.uniform(*shape, density, seed=9)
    ref = _C.transpose_index(p.rowptr.numpy(), p.col.int().numpy(), shape[1])
    got = _C.dst_transpose(p.rowptr.numpy(), p.col.int().numpy(), shape[1], threads)
    for a, b in zip(ref, got):
        np.testing.assert_array_equal(a, b)


def test_gather_kernel():
    src = torch.randn(6, 2, 2)
    g = torch.tensor([3, -1, 0, -1, 5], dtype=torch.int32)
    out = torch.empty(5, 2, 2)
    newpos = torch.tensor([1, 3])
    nv = torch.randn(2, 2, 2)
    E._gather_into(src, g, out, newpos, nv)
    assert torch.equal(out[0], src[3]) and torch.equal(out[2], src[0]) and torch.equal(out[4], src[5])
    assert torch.equal(out[1], nv[0]) and torch.equal(out[3], nv[1])
    with pytest.raises(ValueError):
        _C.dst_gather(src.reshape(-1).numpy(), np.array([30], np.int32), np.empty(1, np.float32))
    with pytest.raises(ValueError, match="exactly"):
        E._gather_into(src, g, out, torch.tensor([1]), None)
    flat = torch.randn(7)
    g1 = torch.tensor([6, -1, 2, -1, 0], dtype=torch.int32)
    o1, o2 = torch.empty(5), torch.empty(5)
    E._gather_into(flat, g1, o1)
    E._gather_into(flat, g1, o2, torch.tensor([1, 3]))
    assert torch.equal(o1, o2) and torch.equal(o1, torch.stack([flat[6], flat[6] * 0, flat[2], flat[2] * 0, flat[0]]))


# ----------------------------------------------------------------------------------------------- scores
def test_rigl_chunked_gradient_equals_dense():
    g = torch.Generator().manual_seed(0)
    x, dy = torch.randn(17, 40, generator=g), torch.randn(17, 30, generator=g)
    dense = dy.t() @ x
    for ce in (40, 41, 400, 10**6):
        parts = list(dense_grad_chunks(x, dy, chunk_elems=ce, absolute=False))
        assert all(c.numel() <= max(ce, 40) for _, c in parts)
        full = torch.cat([c for _, c in parts])
        assert [r0 for r0, _ in parts] == sorted({r0 for r0, _ in parts})
        torch.testing.assert_close(full, dense, rtol=1e-5, atol=1e-5)
    # block scores: squared norms of the gradient blocks
    bs = 5
    blocks = torch.cat([c for _, c in dense_grad_chunks(x, dy, chunk_elems=123, block_size=bs)])
    ref = dense.reshape(6, bs, 8, bs).pow(2).sum((1, 3))
    torch.testing.assert_close(blocks, ref, rtol=1e-5, atol=1e-5)


def test_similarities_exact_below_reservoir_size_and_bounded_above():
    g = torch.Generator().manual_seed(1)
    X = torch.relu(torch.randn(300, 20, generator=g, dtype=torch.float64))
    Y = torch.relu(torch.randn(300, 15, generator=g, dtype=torch.float64))
    X[:, 3] = 0  # a dead neuron: similarity 0
    st = ActivationStats(20, 15, max_samples=512, generator=torch.Generator().manual_seed(0))
    for i in range(0, 300, 64):
        st.add(X[i:i + 64], Y[i:i + 64])
    cos = torch.cat([c for _, c in similarity_chunks(st, "cosine", chunk_elems=50)])
    nx, ny = X.norm(dim=0), Y.norm(dim=0)
    ref = (Y.t() @ X) / (ny[:, None] * nx[None, :]).clamp_min(1e-300)
    ref[:, 3] = 0
    torch.testing.assert_close(cos, ref.abs())
    pc = torch.cat([c for _, c in similarity_chunks(st, "pearson", chunk_elems=50)])
    Xc, Yc = X - X.mean(0), Y - Y.mean(0)
    refp = (Yc.t() @ Xc) / (Yc.norm(dim=0)[:, None] * Xc.norm(dim=0)[None, :]).clamp_min(1e-300)
    refp[:, 3] = 0
    torch.testing.assert_close(pc, refp.abs())
    # more samples than the reservoir: bounded memory, every sample counted in the sums
    st2 = ActivationStats(20, 15, max_samples=64, generator=torch.Generator().manual_seed(0))
    for i in range(0, 300, 50):
        st2.add(X[i:i + 50], Y[i:i + 50])
    assert st2.n == 300 and st2.x.shape == (64, 20)
    torch.testing.assert_close(st2.sxx, (X * X).sum(0))
    rows = {tuple(r.tolist()) for r in X}
    assert all(tuple(r.tolist()) in rows for r in st2.x)  # reservoir rows are real samples


def test_reservoir_is_uniform():
    counts = torch.zeros(40)
    for s in range(400):
        st = ActivationStats(1, 1, max_samples=10, generator=torch.Generator().manual_seed(s))
        x = torch.arange(40, dtype=torch.float32)[:, None]
        for i in range(0, 40, 7):
            st.add(x[i:i + 7], x[i:i + 7])
        counts[st.x[:, 0].long()] += 1
    expected = 400 * 10 / 40
    chi2 = ((counts - expected) ** 2 / expected).sum()
    assert chi2 < 80  # 39 degrees of freedom


def test_schedules():
    assert rigl_fraction(0, 0.3, 100) == pytest.approx(0.3)
    assert rigl_fraction(50, 0.3, 100) == pytest.approx(0.15)
    assert rigl_fraction(100, 0.3, 100) == 0.0
    assert cubic_sparsity(0, 0.2, 0.9, 10, 110) == 0.2
    assert cubic_sparsity(60, 0.2, 0.9, 10, 110) == pytest.approx(0.9 + (0.2 - 0.9) * 0.125)
    assert cubic_sparsity(200, 0.2, 0.9, 10, 110) == 0.9


# ----------------------------------------------------------------------------------------------- SET
@pytest.mark.parametrize("opt_name", ["sgd", "adam"])
def test_set_update_exact(opt_name):
    model = mlp([32, 40, 4], density=0.3)
    opt = (torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9) if opt_name == "sgd"
           else torch.optim.Adam(model.parameters(), lr=1e-2, amsgrad=True))
    x, y = easy_data()
    u = Updater(model, opt, "set", seed=5)
    train_steps(model, opt, u, x, y, 8)
    layers = u.layers
    before = [snapshot(l, opt) for l in layers]
    param_ids = [id(l.values) for l in layers]
    refs = []
    for i, l in enumerate(layers):
        p = l.pattern
        k = round(0.3 * p.nnz)
        keep = ref_prune(p, l.values.detach().abs().numpy(), k, E.derive_seed(5, 0, i, E.PRUNE))
        occ = np.zeros(p.shape, bool)
        r, c = coo(p)
        occ[r[keep], c[keep]] = True
        refs.append((keep, ref_regrow(occ, k, E.derive_seed(5, 0, i, E.RANDOM)), p.nnz))
    assert u.epoch_end()
    for i, l in enumerate(layers):
        keep, new_ref, nnz = refs[i]
        assert id(l.values) == param_ids[i]
        assert l.pattern.nnz == nnz
        check_pattern(l.pattern)
        newj = check_survivors(l, opt, before[i], keep, new_ref)
        gen = torch.Generator().manual_seed(E.derive_seed(5, 0, i, E.INIT))
        init = torch.randn(len(newj), generator=gen, dtype=torch.float64) * 0.1
        assert torch.equal(l.values.detach()[newj], init)
    assert u.history[-1]["pruned"] == u.history[-1]["grown"]
    losses = train_steps(model, opt, u, x, y, 40, start=8)
    assert all(math.isfinite(v) for v in losses)


def test_set_new_weight_distribution():
    layer = SparseLinear(200, 200, density=0.2, dtype=torch.float32)
    opt = torch.optim.SGD(layer.parameters(), lr=0.1)
    u = Updater(layer, opt, "set", every=1)
    before = linpos(layer.pattern)
    u.update()
    new = ~np.isin(linpos(layer.pattern), before)
    v = layer.values.detach()[torch.from_numpy(new)]
    assert v.numel() > 2000
    assert abs(float(v.mean())) < 0.01 and abs(float(v.std()) - 0.1) < 0.01


def test_set_signed_prunes_each_sign_separately():
    model = mlp([32, 40, 4], density=0.3)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    x, y = easy_data()
    u = Updater(model, opt, "set", seed=2, set_signed=True, zeta=0.25)
    train_steps(model, opt, u, x, y, 4)
    l = u.layers[0]
    before = snapshot(l, opt)
    w = l.values.detach().numpy()
    p = l.pattern
    posm = w >= 0
    inf = np.inf
    keep_p = ref_prune(p, np.where(posm, w, inf), round(0.25 * posm.sum()), E.derive_seed(2, 0, 0, E.PRUNE))
    keep_n = ref_prune(p, np.where(posm, inf, -w), round(0.25 * (~posm).sum()), E.derive_seed(2, 0, 0, E.PRUNE_NEG))
    u.update()
    check_survivors(l, opt, before, keep_p & keep_n)
    assert l.pattern.nnz == p.nnz


def test_set_skips_last_epoch_and_step_zero():
    model = mlp([32, 16, 4])
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    u = Updater(model, opt, "set", total_epochs=3)
    assert not u.epoch_end()  # no training step yet: nothing to do (and no epoch counted as trained)
    x, y = easy_data()
    u2 = Updater(model, opt, "set", total_epochs=2)
    train_steps(model, opt, u2, x, y, 2)
    assert u2.epoch_end()       # after epoch 1
    train_steps(model, opt, u2, x, y, 2)
    assert not u2.epoch_end()   # after the last epoch: SET's reference does not rewire
    u3 = Updater(model, opt, "set", steps_per_epoch=3, total_steps=9)
    did = [u3.step() for _ in range(9)]
    assert did == [False, False, True, False, False, True, False, False, False]
    assert not u3.epoch_end()


# ----------------------------------------------------------------------------------------------- RigL
def test_rigl_update_exact_and_schedule():
    model = mlp([32, 40, 4], density=0.3)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    x, y = easy_data()
    u = Updater(model, opt, "rigl", every=10, total_steps=40, seed=3)
    grads = {}

    def capture(i):
        def fwd(m, inp, out):
            grads.setdefault(i, {})["x"] = inp[0].detach()
            out.register_hook(lambda g: grads[i].__setitem__("dy", g.detach()))
        return fwd

    handles = [l.register_forward_hook(capture(i)) for i, l in enumerate(u.layers)]
    train_steps(model, opt, u, x, y, 9)
    assert u._armed  # the next step is an update step
    # step 10 by hand to compute the reference between its backward and the update
    xb, yb = x[9 * 64 % 512:][:64], y[9 * 64 % 512:][:64]
    loss = nn.functional.cross_entropy(model(xb), yb)
    opt.zero_grad()
    loss.backward()
    opt.step()
    refs, before = [], []
    for i, l in enumerate(u.layers):
        p = l.pattern
        k = round(rigl_fraction(10, 0.3, 30) * p.nnz)
        keep = ref_prune(p, l.values.detach().abs().numpy(), k, E.derive_seed(3, 0, i, E.PRUNE))
        G = (grads[i]["dy"].t() @ grads[i]["x"]).abs().numpy()
        occ = np.zeros(p.shape, bool)
        r, c = coo(p)
        occ[r[keep], c[keep]] = True
        refs.append((keep, ref_grow(G, occ, k, E.derive_seed(3, 0, i, E.GROW)), p.nnz, k))
        before.append(snapshot(l, opt))
    assert u.step()
    for i, l in enumerate(u.layers):
        keep, new_ref, nnz, k = refs[i]
        assert l.pattern.nnz == nnz and k > 0
        check_pattern(l.pattern)
        newj = check_survivors(l, opt, before[i], keep, new_ref)
        assert torch.count_nonzero(l.values.detach()[newj]) == 0  # RigL's new weights are zero
    for h in handles:
        h.remove()
    # alpha_t decays; no update at or after 75% of training
    train_steps(model, opt, u, x, y, 30, start=10)
    steps = sorted({h["step"] for h in u.history})
    assert steps == [10, 20]
    assert u.history[-1]["pruned"] == round(rigl_fraction(20, 0.3, 30) * u.layers[-1].nnz)


def test_rigl_manual_update_needs_a_batch():
    model = mlp([32, 16, 4])
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    u = Updater(model, opt, "rigl", total_steps=1000)
    with pytest.raises(RuntimeError, match="arm"):
        u.update()
    x, y = easy_data()
    u.arm()
    train_steps(model, opt, None, x, y, 1)
    u.update()
    assert u.n_updates == 1


# ----------------------------------------------------------------------------------------------- CTRE / G2G
class Recorder:
    """Every training-mode input and output activation of each layer since the last reset."""

    def __init__(self, layers, acts):
        self.x = [[] for _ in layers]
        self.y = [[] for _ in layers]
        self.h = [l.register_forward_hook(self._hook(i, acts[i])) for i, l in enumerate(layers)]

    def _hook(self, i, act):
        def f(m, inp, out):
            if m.training:
                self.x[i].append(inp[0].detach().clone())
                self.y[i].append(act(out.detach()))
        return f

    def reset(self):
        for v in self.x + self.y:
            v.clear()

    def matrices(self, i):
        return torch.cat(self.x[i]), torch.cat(self.y[i])


def ref_similarity(X, Y, kind):
    if kind == "pearson":
        X, Y = X - X.mean(0), Y - Y.mean(0)
    nx, ny = X.norm(dim=0), Y.norm(dim=0)
    S = (Y.t() @ X) / (ny[:, None] * nx[None, :])
    S[~torch.isfinite(S)] = 0
    S[:, nx == 0] = 0
    S[ny == 0, :] = 0
    return S.abs().numpy()


@pytest.mark.parametrize("method,variant", [("ctre", "cte"), ("ctre", "ctre_sim"), ("g2g", None)])
def test_similarity_regrowth_exact(method, variant):
    model = mlp([32, 40, 4], density=0.3)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True)
    x, y = easy_data()
    kw = {"variant": variant} if variant else {}
    u = Updater(model, opt, method, seed=4, **kw)
    rec = Recorder(u.layers, [torch.relu, lambda o: torch.softmax(o, -1)])
    train_steps(model, opt, u, x, y, 6)
    zeta = 0.2 if method == "ctre" else 0.3
    refs, before = [], []
    for i, l in enumerate(u.layers):
        p = l.pattern
        k = round(zeta * p.nnz)
        keep = ref_prune(p, l.values.detach().abs().numpy(), k, E.derive_seed(4, 0, i, E.PRUNE))
        X, Y = rec.matrices(i)
        S = ref_similarity(X, Y, "cosine" if method == "ctre" else "pearson")
        occ = np.zeros(p.shape, bool)
        r, c = coo(p)
        occ[r[keep], c[keep]] = True
        new = ref_grow(S, occ, k, E.derive_seed(4, 0, i, E.GROW))
        if variant == "ctre_sim":
            pruned = linpos(p)[~keep]
            again = np.isin(new, pruned)
            stay = new[~again]
            occ2 = block_mask(p).copy().reshape(-1)
            occ2[stay] = True
            rnd = ref_regrow(occ2.reshape(p.shape), int(again.sum()), E.derive_seed(4, 0, i, E.RANDOM))
            assert not np.isin(rnd, pruned).any()
            new = np.sort(np.concatenate([stay, rnd]))
        # data without ties at the boundary: the reference's order is unambiguous
        refs.append((keep, new, p.nnz))
        before.append(snapshot(l, opt))
    assert u.epoch_end()
    for i, l in enumerate(u.layers):
        keep, new_ref, nnz = refs[i]
        assert l.pattern.nnz == nnz
        check_pattern(l.pattern)
        newj = check_survivors(l, opt, before[i], keep, new_ref)
        v = l.values.detach()[newj]
        if method == "ctre":
            b = math.sqrt(6 / l.in_features)
            assert v.abs().max() <= b and v.std() > b / 4  # U(-b, b)
        else:
            assert torch.count_nonzero(v) == 0
    losses = train_steps(model, opt, u, x, y, 30, start=6)
    assert all(math.isfinite(v) for v in losses)


def test_window_statistics_hold_the_last_rows_exactly():
    g = torch.Generator().manual_seed(2)
    X = torch.relu(torch.randn(300, 20, generator=g, dtype=torch.float64))
    Y = torch.relu(torch.randn(300, 15, generator=g, dtype=torch.float64))
    st = ActivationStats(20, 15, max_samples=128, mode="window")
    for i in range(0, 300, 64):
        st.add(X[i:i + 64], Y[i:i + 64])
    assert st.n == 300 and st.m == 128
    assert {tuple(r.tolist()) for r in st.x} == {tuple(r.tolist()) for r in X[-128:]}  # exactly the last 128
    cos = torch.cat([c for _, c in similarity_chunks(st, "cosine", chunk_elems=50)])
    torch.testing.assert_close(cos, torch.from_numpy(ref_similarity(X[-128:], Y[-128:], "cosine")))
    pc = torch.cat([c for _, c in similarity_chunks(st, "pearson", chunk_elems=50)])
    torch.testing.assert_close(pc, torch.from_numpy(ref_similarity(X[-128:], Y[-128:], "pearson")))
    big = ActivationStats(20, 15, max_samples=50, mode="window")
    big.add(X, Y)  # one batch larger than the window
    assert {tuple(r.tolist()) for r in big.x} == {tuple(r.tolist()) for r in X[-50:]}


@pytest.mark.parametrize("method", ["ctre", "g2g"])
def test_window_records_only_the_last_steps_and_picks_match_exact_scores(method):
    """steps_per_epoch 8, batch 16, max_samples 48: statistics come from the last 3 steps of each epoch only, and
    the regrowth is the exact top-k of the scores over those 48 samples."""
    model = mlp([32, 40, 4], density=0.3)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True)
    x, y = easy_data()
    u = Updater(model, opt, method, seed=4, steps_per_epoch=8, total_epochs=3, max_samples=48)
    rec = Recorder(u.layers, [torch.relu, lambda o: torch.softmax(o, -1)])
    calls = [0]
    orig = ActivationStats.add
    ActivationStats.add = lambda self, a, b: (calls.__setitem__(0, calls[0] + 1), orig(self, a, b))[1]
    try:
        train_steps(model, opt, u, x, y, 7, batch=16)
        assert calls[0] == 2 * len(u.layers)  # steps 6 and 7 of 8
        zeta = 0.2 if method == "ctre" else 0.3
        refs = []
        update = u.update

        def snapshot_then_update():  # the pruning reference needs the values right before the update
            for i, l in enumerate(u.layers):
                p = l.pattern
                k = round(zeta * p.nnz)
                keep = ref_prune(p, l.values.detach().abs().numpy(), k, E.derive_seed(4, 0, i, E.PRUNE))
                refs.append((p, keep, k))
            update()

        u.update = snapshot_then_update
        train_steps(model, opt, u, x, y, 1, batch=16, start=7)  # the epoch's last step, recorded too
    finally:
        ActivationStats.add = orig
    assert calls[0] == 3 * len(u.layers) and u.n_updates == 1
    for i, l in enumerate(u.layers):
        p, keep, k = refs[i]
        X, Y = rec.matrices(i)
        S = ref_similarity(X[-48:], Y[-48:], "cosine" if method == "ctre" else "pearson")
        occ = np.zeros(p.shape, bool)
        r, c = coo(p)
        occ[r[keep], c[keep]] = True
        new = ref_grow(S, occ, k, E.derive_seed(4, 0, i, E.GROW))
        got = set(linpos(l.pattern).tolist()) - set(linpos(p)[keep].tolist())
        assert got == set(new.tolist())


def test_ctre_sim_replaces_regrown_pruned_connections():
    # a layer whose best cosine scores sit exactly at its weakest connections
    layer = SparseLinear(6, 6, bias=False, pattern=Pattern.from_mask(torch.eye(6, dtype=torch.bool)),
                         dtype=torch.float64)
    with torch.no_grad():
        layer.values.copy_(torch.tensor([0.01, 0.02, 1.0, 1.0, 1.0, 1.0], dtype=torch.float64))
    model = nn.Sequential(layer)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    u = Updater(model, opt, "ctre", zeta=2 / 6, variant="ctre_sim", activation="identity", seed=0)
    x = torch.eye(6, dtype=torch.float64)
    model(x)  # output j = w_j * x_j: cosine 1 on the diagonal, 0 elsewhere
    u.t = 1
    u.update()
    pos = linpos(layer.pattern)
    assert layer.pattern.nnz == 6
    assert not np.isin([0, 7], pos).any()  # (0,0) and (1,1) were pruned and not taken back
    l2 = SparseLinear(6, 6, bias=False, pattern=Pattern.from_mask(torch.eye(6, dtype=torch.bool)), dtype=torch.float64)
    u2 = Updater(nn.Sequential(l2), None, "ctre", zeta=2 / 6, activation="identity")
    with torch.no_grad():
        l2.values.copy_(torch.tensor([0.01, 0.02, 1.0, 1.0, 1.0, 1.0], dtype=torch.float64))
    u2.model(x)
    u2.t = 1
    u2.update()
    assert np.isin([0, 7], linpos(l2.pattern)).all()  # cte takes them back (as new connections)


def test_ctre_seq_switches_to_random_after_patience():
    model = mlp([32, 16, 4])
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    x, y = easy_data()
    u = Updater(model, opt, "ctre", variant="ctre_seq", patience=3, seed=1)
    for acc in (0.5, 0.6, 0.6, 0.55):
        u.report_validation(acc)
    assert u.phase == "cosine"
    u.report_validation(0.6)
    assert u.phase == "random"
    train_steps(model, opt, u, x, y, 3)
    assert all(s.n == 0 for s in u._stats)  # no statistics gathered in the random phase
    l = u.layers[0]
    p = l.pattern
    k = round(0.2 * p.nnz)
    keep = ref_prune(p, l.values.detach().abs().numpy(), k, E.derive_seed(1, 0, 0, E.PRUNE))
    occ = np.zeros(p.shape, bool)
    r, c = coo(p)
    occ[r[keep], c[keep]] = True
    new_ref = ref_regrow(occ, k, E.derive_seed(1, 0, 0, E.RANDOM))
    before = snapshot(l, opt)
    assert u.epoch_end()
    check_survivors(l, opt, before, keep, new_ref)


def test_similarity_methods_need_statistics():
    model = mlp([32, 16, 4])
    u = Updater(model, None, "ctre")
    with pytest.raises(RuntimeError, match="statistics"):
        u.update()
    assert not u.epoch_end()  # before any step: never (the reference's step-0 defect)


def test_g2g_within_ensembles_keeps_links():
    g = 4
    p = T.ensembles(40, 32, groups=g, links=2, inner_density=0.5, seed=3)
    l1 = SparseLinear(32, 40, pattern=p, dtype=torch.float64)
    model = nn.Sequential(l1, nn.ReLU(), SparseLinear(40, 4, density=0.5, dtype=torch.float64))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    x, y = easy_data()
    u = Updater(model, opt, "g2g", within_ensembles=True, groups=[g, None] if False else g, layers=[l1])
    linked = torch.zeros(g, g, dtype=torch.bool)
    r, c = l1.pattern.coo()
    linked[r // 10, c // 8] = True
    for _ in range(3):
        train_steps(model, opt, u, x, y, 4)
        assert u.epoch_end()
        r, c = l1.pattern.coo()
        assert linked[r // 10, c // 8].all()
        assert l1.pattern.nnz == p.nnz
    with pytest.raises(ValueError, match="divide"):
        Updater(model, opt, "g2g", within_ensembles=True, groups=3, layers=[l1])


# ----------------------------------------------------------------------------------------------- GMP / ETSM
@pytest.mark.parametrize("method", ["gmp", "etsm"])
def test_gradual_pruning_follows_cubic_schedule(method):
    model = mlp([32, 40, 30, 4], density=1.0)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    x, y = easy_data()
    u = Updater(model, opt, method, every=5, target_density=0.2, start=5, end=35, seed=1)
    layers = u.layers
    first_values = layers[0].values
    seen = []
    for s in range(1, 46):
        params_before = [l.values for l in layers]
        train_steps(model, opt, None, x, y, 1, start=s)
        before = [snapshot(l, opt) for l in layers]
        did = u.step()
        if did:
            seen.append(s)
        for i, l in enumerate(layers):
            total = l.in_features * l.out_features
            pruned = method == "gmp" or i > 0
            d = (1 - cubic_sparsity(max(s if s in seen else max([0] + seen), 0), 0.0, 0.8, 5, 35)) if pruned else 1.0
            assert l.pattern.nnz == round(d * total)
            check_pattern(l.pattern)
            if did and pruned and l.values is not params_before[i]:
                # replaced in the module and the optimizer; survivors keep weights and Adam state
                ids = {id(p) for g in opt.param_groups for p in g["params"]}
                assert id(l.values) in ids and id(params_before[i]) not in ids
                assert params_before[i] not in opt.state
                keep = np.isin(linpos(before[i][0]), linpos(l.pattern))
                check_survivors(l, opt, before[i], keep)
                assert torch.is_tensor(opt.state[l.values]["step"])
    assert seen == [10, 15, 20, 25, 30, 35]
    assert all(l.pattern.nnz == round(0.2 * l.in_features * l.out_features) for l in layers[1:])
    if method == "etsm":
        assert layers[0].values is first_values and layers[0].density == 1.0
    losses = train_steps(model, opt, u, x, y, 20, start=50)
    assert all(math.isfinite(v) for v in losses)


# ----------------------------------------------------------------------------------------------- BSR
@pytest.mark.parametrize("method", ["set", "rigl", "ctre"])
def test_bsr_rewires_blocks(method):
    bs = 4
    model = mlp([32, 48, 8], density=0.3, layout="bsr", block_size=bs, dtype=torch.float32)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    x, y = easy_data(classes=8, dtype=torch.float32)
    kw = {"total_steps": 100, "every": 4} if method == "rigl" else {}
    u = Updater(model, opt, method, seed=6, **kw)
    train_steps(model, opt, u, x, y, 3)
    if method == "rigl":
        train_steps(model, opt, None, x, y, 1, start=3)  # the update step's training, then its update
    l = u.layers[0]
    p = l.pattern
    zeta = {"set": 0.3, "rigl": rigl_fraction(4, 0.3, 75), "ctre": 0.2}[method]
    k = round(zeta * p.nnz)
    keep = ref_prune(p, l.values.detach().pow(2).sum((1, 2)).numpy(), k, E.derive_seed(6, 0, 0, E.PRUNE))
    before = snapshot(l, opt)
    assert u.step() if method == "rigl" else u.epoch_end()
    assert l.pattern.nnz == p.nnz and l.values.shape == (p.nnz, bs, bs)
    check_pattern(l.pattern)
    newj = check_survivors(l, opt, before, keep)
    assert len(newj) == k  # whole blocks pruned and regrown
    losses = train_steps(model, opt, u, x, y, 10, start=4)
    assert all(math.isfinite(v) for v in losses)


# ----------------------------------------------------------------------------------------------- training & state
@pytest.mark.parametrize("method,kw", [
    ("static", {}), ("set", {}), ("rigl", {"total_steps": 200, "every": 10}), ("ctre", {}),
    ("ctre", {"variant": "ctre_sim"}), ("ctre", {"variant": "ctre_seq", "patience": 1}), ("g2g", {}),
    ("gmp", {"target_density": 0.15, "total_steps": 200, "every": 10}),
    ("etsm", {"target_density": 0.15, "total_steps": 200, "every": 10}),
])
def test_training_keeps_working(method, kw):
    torch.manual_seed(0)
    model = mlp([32, 64, 4], density=0.4, dtype=torch.float32)
    opt = torch.optim.AdamW(model.parameters(), lr=5e-3)
    x, y = easy_data(n=1024, dtype=torch.float32)
    u = Updater(model, opt, method, seed=1, **kw)
    losses = []
    for epoch in range(8):
        losses += train_steps(model, opt, u, x, y, 16, start=epoch * 16)
        u.epoch_end()
        u.report_validation(0.5)
    assert all(math.isfinite(v) for v in losses)
    assert np.mean(losses[-16:]) < 0.8 * np.mean(losses[:16])
    if method != "static":
        assert u.n_updates > 0
    for l in u.layers:
        check_pattern(l.pattern)


@pytest.mark.parametrize("method,kw", [("set", {}), ("rigl", {"total_steps": 100, "every": 3}), ("ctre", {}),
                                       ("g2g", {"max_samples": 40}), ("gmp", {"target_density": 0.1, "total_steps": 60,
                                                                               "every": 3})])
def test_state_dict_resumes_exactly(method, kw):
    x, y = easy_data(dtype=torch.float32)

    def run(stop=None, resume=None):
        model = mlp([32, 24, 4], density=0.4, dtype=torch.float32)
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        u = Updater(model, opt, method, seed=7, **kw)
        start = 0
        if resume is not None:
            msd, osd, usd, start = resume
            model.load_state_dict(msd)
            # parameters may have been replaced (gmp): rebuild the optimizer on the loaded model
            opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
            opt.load_state_dict(osd)
            u = Updater(model, opt, method, seed=7, **kw)
            u.load_state_dict(usd)
        for epoch in range(start, 4):
            if stop is not None and epoch == stop:
                return (model.state_dict(), opt.state_dict(), u.state_dict(), epoch)
            train_steps(model, opt, u, x, y, 5, start=epoch * 5)
            u.epoch_end()
        return model

    full = run()
    ck = run(stop=2)
    ck = ({k: v.clone() for k, v in ck[0].items()}, ck[1], ck[2], ck[3])
    resumed = run(resume=ck)
    for (k, a), (_, b) in zip(full.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), k


def test_options_are_checked():
    model = mlp([8, 4])
    with pytest.raises(TypeError, match="unknown"):
        Updater(model, None, "set", alpha=0.1)
    with pytest.raises(ValueError, match="method"):
        Updater(model, None, "nope")
    with pytest.raises(ValueError, match="total_steps"):
        Updater(model, None, "rigl")
    with pytest.raises(ValueError, match="target_density"):
        Updater(model, None, "gmp", total_steps=10)
    with pytest.raises(ValueError, match="variant"):
        Updater(model, None, "ctre", variant="x")
    u = Updater(model, None, "static")
    assert not any(u.step() for _ in range(5)) and not u.epoch_end()


def test_rigl_without_annealing_on_a_per_epoch_schedule():
    """CTRE's comparison runs RigL once per epoch with a constant fraction: every update regrows zeta * nnz."""
    model = mlp([32, 40, 4], density=0.3)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    x, y = easy_data()
    u = Updater(model, opt, "rigl", zeta=0.2, per_epoch=True, steps_per_epoch=4, total_steps=40, anneal=False,
                stop_fraction=1.0, seed=1)
    train_steps(model, opt, u, x, y, 12)
    assert u.n_updates == 3
    for rec in u.history:
        assert rec["grown"] == rec["pruned"] == round(0.2 * rec["nnz"])


def test_epoch_length_lets_an_epoch_end_schedule_record_only_the_window():
    model = mlp([32, 40, 4], density=0.3)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    x, y = easy_data()
    u = Updater(model, opt, "ctre", seed=1, epoch_length=8, total_epochs=3, max_samples=32)  # window: 2 steps of 16
    calls = []
    orig = ActivationStats.add
    ActivationStats.add = lambda self, a, b: (calls.append(u.t), orig(self, a, b))[1]
    try:
        for epoch in range(3):
            train_steps(model, opt, u, x, y, 8, batch=16, start=8 * epoch)
            u.epoch_end()
    finally:
        ActivationStats.add = orig
    assert u.n_updates == 2
    assert sorted(set(calls)) == [6, 7, 14, 15]  # steps 7-8 and 15-16 (t counts finished steps); none in the last
    # an epoch shorter than promised leaves the window empty: a clear error, not an update from nothing
    u2 = Updater(mlp([32, 40, 4], density=0.3), None, "ctre", epoch_length=50, max_samples=32)
    train_steps(u2.model, torch.optim.SGD(u2.model.parameters(), lr=0.05), u2, x, y, 8, batch=16)
    with pytest.raises(RuntimeError, match="epoch_length=50"):
        u2.epoch_end()
