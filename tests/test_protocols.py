"""The seed papers' protocols (sparsecore.apps.protocols, bench e2e --protocol / --seeds) and the CTRE audit items of
docs/REPRODUCTION.md: each reference behaviour we match has a test here that fails when it stops matching."""
import json
import math

import numpy as np
import pytest
import torch
from torch import nn

from sparsecore.apps import protocols as P
from sparsecore.apps.e2e import aggregate, build_parser, explicit_fields, format_summary, main
from sparsecore.apps.models import build_model, make_updater
from sparsecore.apps.train import TrainConfig
from sparsecore.apps.train.loop import make_sgd
from sparsecore.dst import Updater
from sparsecore.dst import edit as E
from sparsecore.nn import SparseLinear
from sparsecore.pattern import Pattern
from sparsecore import topology as T


@pytest.fixture(autouse=True)
def one_thread():
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(prev)


# ------------------------------------------------------------------------------------------ protocol resolution
def test_ctre_protocol_settings_are_the_references():
    r = P.resolve("ctre", "mat:Isolet", {})
    s = r["settings"]
    assert (s["hidden"], s["batch_size"], s["lr"], s["momentum"], s["nesterov"], s["weight_decay"]) == \
        ((1000, 1000, 1000), 100, 0.01, 0.9, True, 1e-4)
    assert (s["decay_biases"], s["shuffle"], s["drop_last"], s["normalize"], s["epochs"]) == \
        (False, False, True, "minmax", 500)
    assert s["model_options"] == {"init": "glorot"}
    rows = {x["label"]: x for x in r["rows"]}
    assert set(rows) == {"ctre", "set", "rigl", "static"}
    assert all(x["epsilon"] == 1.0 and x["model_options"] == {"init": "glorot"} for x in rows.values())
    assert rows["ctre"]["dst_options"] == {"zeta": 0.2, "regrow_pruned": "keep", "variant": "ctre_sim",
                                           "stats": "full", "init": "kaiming_uniform"}
    rigl = rows["rigl"]["dst_options"]
    assert (rigl["per_epoch"], rigl["anneal"], rigl["stop_fraction"], rigl["zeta"], rigl["init"]) == \
        (True, False, 1.0, 0.2, "zero")
    assert rows["set"]["dst_options"]["init"] == "kaiming_uniform"   # the reference's grow_init for SET too
    assert P.resolve("ctre", "mat:madelon", {})["settings"]["normalize"] == "feature"  # madelon: StandardScaler


def test_explicit_values_override_the_protocol_and_are_listed():
    r = P.resolve("ctre", "builtin", {"lr": 0.05, "epochs": 3, "batch_size": 100})
    assert r["settings"]["lr"] == 0.05 and r["settings"]["epochs"] == 3
    assert r["overridden"] == ["epochs", "lr"]          # batch_size equals the protocol's: not an override


def test_protocol_rows_selected_by_methods_and_errors():
    assert [x["label"] for x in P.resolve("ctre", "builtin", {}, ["ctre", "dense"])["rows"]] == ["ctre"]
    with pytest.raises(ValueError, match="no row"):
        P.resolve("ctre", "builtin", {}, ["g2g"])
    with pytest.raises(ValueError, match="unknown protocol"):
        P.resolve("nope", "builtin", {})
    assert P.protocol_names() == ["ctre", "g2g", "tsm"]


def test_protocol_is_a_copy():
    P.protocol("ctre")["settings"]["lr"] = 1.0
    assert P.PROTOCOLS["ctre"]["settings"]["lr"] == 0.01


def test_explicit_fields_only_what_was_given():
    p = build_parser()
    got = explicit_fields(p, ["--protocol", "ctre", "--lr", "0.02", "--no-shuffle", "--hidden", "8,8"])
    assert got["lr"] == 0.02 and got["shuffle"] is False and got["hidden"] == (8, 8)
    assert "batch_size" not in got and "threads" not in got and "normalize" not in got
    assert "lr" not in explicit_fields(p, ["--protocol", "ctre"])   # the e2e default lr 0.05 is not explicit


# ------------------------------------------------------------------------------------------ --seeds aggregation
def _fake(seed, acc_ctre, acc_dense, hist):
    def rep(m, acc):
        return {"test_accuracy": acc, "final_test_accuracy": acc - 0.01, "best_epoch": 2, "density": 0.5, "nnz": 10,
                "args": {"method": m, "seed": seed},
                "history": [{"val_accuracy": v, "test_accuracy": v} for v in hist]}
    return {"methods": ["dense", "ctre"], "runs": {"dense": rep("dense", acc_dense), "ctre": rep("ctre", acc_ctre)},
            "table": [{"method": "dense", "median_epoch_seconds": 1.0}, {"method": "ctre", "median_epoch_seconds": 0.5}]}


def test_aggregate_mean_std_and_curves():
    rows = aggregate([_fake(0, 0.6, 0.7, [0.1, 0.2]), _fake(1, 0.8, 0.7, [0.3, 0.4, 0.5])])
    c = next(r for r in rows if r["method"] == "ctre")
    assert c["n"] == 2 and c["seeds"] == [0, 1]
    assert c["test_accuracy"]["mean"] == pytest.approx(0.7)
    assert c["test_accuracy"]["std"] == pytest.approx(math.sqrt(0.02))   # sample std
    assert c["final_test_accuracy"]["mean"] == pytest.approx(0.69)
    assert c["curves"]["test_accuracy"]["mean"] == pytest.approx([0.2, 0.3, 0.5])  # epoch 3: one seed
    d = next(r for r in rows if r["method"] == "dense")
    assert d["test_accuracy"]["std"] == 0.0
    assert "0.7000 +- 0.1414" in format_summary(rows)


def test_protocol_ctre_end_to_end_with_seeds(tmp_path, capsys):
    out = tmp_path / "o"
    rc = main(["--protocol", "ctre", "--epochs", "2", "--seeds", "2", "--hidden", "32,32", "--out", str(out),
               "--no-plot", "--quiet"])
    assert rc == 0
    s = json.loads((out / "summary.json").read_text())
    assert s["protocol"]["name"] == "ctre" and s["protocol"]["overridden"] == ["epochs", "hidden"]
    assert [r["method"] for r in s["table"]] == ["dense", "ctre", "set", "rigl", "static"]
    assert all(r["n"] == 2 and len(r["curves"]["val_accuracy"]["mean"]) == 2 for r in s["table"])
    assert s["settings"]["shuffle"] is False and s["settings"]["decay_biases"] is False
    r0 = json.loads((out / "seed_0" / "results.json").read_text())
    assert r0["runs"]["ctre"]["args"]["dst_options"]["stats"] == "full"
    assert r0["runs"]["rigl"]["topology_updates"] == 1            # per epoch, not after the last one
    assert json.loads((out / "seed_1" / "results.json").read_text())["runs"]["ctre"]["args"]["seed"] == 1


# ------------------------------------------------------------------------------------------ audit items
def _one_layer(out_f=8, in_f=12, density=0.3, seed=0):
    g = torch.Generator().manual_seed(seed)
    layer = SparseLinear(in_f, out_f, pattern=T.uniform(out_f, in_f, density, generator=g))
    with torch.no_grad():
        layer.values.copy_(torch.randn(layer.values.shape, generator=g))
    return nn.Sequential(layer), layer


def test_audit_a_full_statistic_is_the_reference_whole_set_cosine():
    """Reference main.py: S = |l2_normalize(A_in^T) @ l2_normalize(A_out^T)^T| over every training row, regrowth
    = top-k of S among the positions not kept by the magnitude prune."""
    torch.manual_seed(0)
    model, layer = _one_layer()
    X = torch.rand(50, 12)
    upd = Updater(model, None, "ctre", zeta=0.25, stats="full", activation="relu", regrow_pruned="keep")
    upd.stats_source = lambda: [X[:20], X[20:]]
    w = torch.zeros(8, 12)
    r, c = layer.pattern.coo()
    w[r, c] = layer.values.detach()
    nnz = layer.nnz
    k = int(round(0.25 * nnz))
    order = torch.argsort(w[r, c].abs(), descending=True)
    kept = set((r[order[:nnz - k]] * 12 + c[order[:nnz - k]]).tolist())
    with torch.no_grad():
        A_out = torch.relu(layer(X))
    S = (torch.nn.functional.normalize(X.t(), dim=1) @ torch.nn.functional.normalize(A_out.t(), dim=1).t()).abs()
    S = S.t().flatten()              # (out, in) row-major positions
    S[list(kept)] = -1
    expect = kept | set(torch.topk(S, k).indices.tolist())
    upd.update()
    r2, c2 = layer.pattern.coo()
    assert set((r2 * 12 + c2).tolist()) == expect
    with pytest.raises(RuntimeError, match="stats_source"):
        Updater(model, None, "ctre", stats="full").update()


def test_audit_a_full_statistic_records_only_its_own_pass():
    model, layer = _one_layer()
    upd = Updater(model, None, "ctre", stats="full", activation="relu")
    model(torch.rand(5, 12))                       # a training forward outside the update: not recorded
    assert upd._stats[0].n == 0
    upd.stats_source = lambda: [torch.rand(7, 12)]
    upd._collect_full()
    assert upd._stats[0].n == 7


def test_audit_b_ctre_sim_replaces_repicked_pruned_by_random_absent():
    model, layer = _one_layer(density=0.5)
    upd = Updater(model, None, "ctre", variant="ctre_sim", activation="relu")
    pattern = layer.pattern
    keep = np.ones(pattern.nnz, np.uint8)
    keep[:3] = 0                                    # the first three entries pruned
    old = E.entry_positions(pattern)
    pruned = old[:3]
    empty = sorted(set(range(96)) - set(old.tolist()))
    picks = torch.cat([pruned[:2], torch.tensor(empty[:2])])   # two re-picks of pruned entries, two fresh ones
    rows, cols = (picks // 12).numpy().astype(np.int32), (picks % 12).numpy().astype(np.int32)
    r, c = upd._ctre_sim_replace(0, pattern, keep, rows, cols)
    got = set((r.astype(np.int64) * 12 + c).tolist())
    assert len(got) == 4 and set(empty[:2]) <= got
    assert not (got & set(old.tolist()))             # never an old entry (pruned or kept)


def _full_layer(n=4):
    rows = torch.arange(n).repeat_interleave(n)
    cols = torch.arange(n).repeat(n)
    layer = SparseLinear(n, n, pattern=Pattern.from_indices(rows, cols, (n, n)))
    return nn.Sequential(layer), layer


@pytest.mark.parametrize("mode", ["keep", True])
def test_audit_c_regrown_pruned_keep_weight_and_momentum(mode):
    """Reference _get_update_op: a regrown position that was in the mask is not a new connection: it keeps its weight
    and momentum (reinit_when_same=False). Ours with regrow_pruned='keep'; True re-initialises it."""
    torch.manual_seed(0)
    model, layer = _full_layer()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.rand(3, 4)).sum().backward()
    opt.step()
    v0 = layer.values.detach().clone()
    m0 = opt.state[layer.values]["momentum_buffer"].clone()
    upd = Updater(model, opt, "set", zeta=0.25, regrow_pruned=mode)   # the only empty positions: the pruned ones
    upd.update()
    rec = upd.history[0]
    assert rec["pruned"] == 4 and rec["nnz"] == 16
    if mode == "keep":
        assert rec["revived"] == 4
        assert torch.equal(layer.values.detach(), v0)
        assert torch.equal(opt.state[layer.values]["momentum_buffer"], m0)
    else:
        assert not torch.equal(layer.values.detach(), v0)
        assert int((opt.state[layer.values]["momentum_buffer"] == 0).sum()) == 4


def test_audit_c_regrown_weights_init_bounds():
    """CTRE/SET reference grow_init random_uniform: U(+-sqrt(6 / in)); RigL: zeros."""
    torch.manual_seed(0)
    model, layer = _one_layer(out_f=40, in_f=30, density=0.2)
    old = set(E.entry_positions(layer.pattern).tolist())
    upd = Updater(model, None, "set", zeta=0.5, init="kaiming_uniform", regrow_pruned=False)
    upd.update()
    pos = E.entry_positions(layer.pattern)
    new = torch.tensor([p not in old for p in pos.tolist()])
    v = layer.values.detach()[new]
    b = math.sqrt(6 / 30)
    assert v.numel() > 50 and v.abs().max() <= b and v.abs().max() > 0.8 * b


def test_audit_d_no_update_before_an_epoch_and_ctre_seq_switch_after_patience():
    model, layer = _one_layer()
    upd = Updater(model, None, "ctre", variant="ctre_seq", patience=40, activation="relu", stats="window")
    model(torch.rand(4, 12))
    upd.step()
    assert upd.n_updates == 0            # the reference's update after step 1 on all-zero scores: not reproduced
    upd.report_validation(0.5)
    for i in range(39):
        upd.report_validation(0.5)       # equal is no improvement (reference: val > max)
    assert upd.phase == "cosine"
    upd.report_validation(0.4)
    assert upd.phase == "random"         # the 40th epoch without improvement (early_stop == 40)
    upd.report_validation(0.9)
    assert upd.phase == "random"         # for good


def test_glorot_init_and_zero_biases():
    m = build_model("ctre", 50, 3, (40,), epsilon=1.0, seed=0, init="glorot")
    first = m[0]
    assert first.values.abs().max() <= math.sqrt(6 / (50 + 40))
    assert first.values.abs().max() > 0.7 * math.sqrt(6 / (50 + 40))
    assert torch.count_nonzero(first.bias) == 0
    d = build_model("dense", 50, 3, (40,), seed=0, init="glorot")
    assert d[0].weight.abs().max() <= math.sqrt(6 / 90) and torch.count_nonzero(d[0].bias) == 0


def test_weight_decay_on_weights_only():
    m = build_model("set", 20, 3, (16,), epsilon=2.0, seed=0)
    opt = make_sgd(m, TrainConfig(method="set", decay_biases=False, weight_decay=1e-4))
    wd = {id(p): g["weight_decay"] for g in opt.param_groups for p in g["params"]}
    assert all(wd[id(l.values)] == 1e-4 and wd[id(l.bias)] == 0.0 for l in (m[0], m[2]))
    opt2 = make_sgd(m, TrainConfig(method="set"))
    assert all(g["weight_decay"] == 1e-4 for g in opt2.param_groups)


def test_rigl_per_epoch_constant_fraction():
    m = build_model("rigl", 20, 3, (16,), epsilon=2.0, seed=0)
    opt = torch.optim.SGD(m.parameters(), lr=0.01)
    upd = make_updater("rigl", m, opt, epochs=3, steps_per_epoch=4, per_epoch=True, anneal=False, zeta=0.2,
                       stop_fraction=1.0)
    nnz = [l.nnz for l in (m[0], m[2])]
    for _ in range(12):
        opt.zero_grad()
        m(torch.rand(5, 20)).logsumexp(1).sum().backward()
        opt.step()
        upd.step()
        upd.epoch_end()
    assert upd.n_updates == 2 and [h["step"] for h in upd.history] == [4, 4, 8, 8]
    assert [h["pruned"] for h in upd.history] == [round(0.2 * n) for n in nnz] * 2
    with pytest.raises(ValueError, match="either every"):
        make_updater("rigl", m, opt, epochs=3, steps_per_epoch=4, per_epoch=True, every=2)


def test_audit_d_zero_score_first_update_reproduces_the_reference_defect():
    """zero_score_first_update=True: an update after step 1 that regrows the lowest flat positions of the reference's
    (in, out) kernel (column 0 of our (out, in) layout first), before any score exists."""
    torch.manual_seed(0)
    model, layer = _one_layer(out_f=8, in_f=12, density=0.3)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    upd = Updater(model, opt, "ctre", zeta=0.25, activation="relu", zero_score_first_update=True,
                  regrow_pruned="keep", total_epochs=3)
    old = set(E.entry_positions(layer.pattern).tolist())
    model(torch.rand(4, 12)).sum().backward()
    opt.step()
    assert upd.step() and upd.n_updates == 1
    new = set(E.entry_positions(layer.pattern).tolist()) - old
    k = upd.history[0]["pruned"]
    assert len(new) + upd.history[0]["revived"] == k
    kernel_order = sorted(range(96), key=lambda p: (p % 12, p // 12))       # (in, out) flat order
    assert all(kernel_order.index(p) < 8 * 2 + k for p in new)               # within the first columns
    assert min(p % 12 for p in new) == 0
