"""sparsecore.apps.models: every method builds the MLP of docs/METHODS.md with the right sparse layers and densities."""
import importlib.util
import math

import pytest
import torch
from torch import nn

from sparsecore import SparseLinear, topology
from sparsecore.apps.models import METHODS, MLP, build_model, linear_layers, make_updater, model_stats

IN, SHAPE, HID, C = 64, (8, 8, 1), (40, 40), 10     # tiny: 64 -> 40 -> 40 -> 10
SHAPES = [(40, 64), (40, 40), (10, 40)]              # (out, in) per layer
HAS_DST = importlib.util.find_spec("sparsecore.dst") is not None


def kinds(model):
    return [type(m).__name__ for _, m in linear_layers(model)]


def layers(model):
    return [m for _, m in linear_layers(model)]


@pytest.mark.parametrize("method", METHODS)
def test_every_method_builds_and_runs(method):
    model = build_model(method, IN, C, HID, input_shape=SHAPE, seed=0)
    assert isinstance(model, MLP) and model.method == method
    assert model.widths == [IN, *HID, C]
    x = torch.randn(5, IN)
    y = model(x)
    assert y.shape == (5, C)
    y.sum().backward()
    assert model(torch.randn(3, *SHAPE)).shape == (3, C)   # images are flattened
    s = model_stats(model)
    assert s["dense_params"] == sum(o * i for o, i in SHAPES)
    assert 0 < s["density"] <= 1
    assert s["nnz"] == sum(l["nnz"] for l in s["layers"])
    # ReLU between linear layers only
    assert sum(isinstance(m, nn.ReLU) for m in model) == len(HID)


def test_dense_is_plain_linear():
    m = build_model("dense", IN, C, HID)
    assert kinds(m) == ["Linear"] * 3
    assert model_stats(m)["density"] == 1.0


@pytest.mark.parametrize("method,eps", [("static", 20.0), ("set", 20.0), ("ctre", 1.0)])
def test_er_methods_default_epsilon_all_layers_sparse(method, eps):
    m = build_model(method, IN, C, HID, seed=3)
    assert kinds(m) == ["SparseLinear"] * 3
    for layer, (o, i) in zip(layers(m), SHAPES):
        assert layer.nnz == topology.er_count(o, i, eps)
    assert m.info["epsilon"] == eps


def test_ctre_four_layers_of_1000_at_quarter_percent():
    # METHODS.md: 784 -> 1000 -> 1000 -> 1000 -> 10, all four layers ER(epsilon=1), about 0.25% density
    m = build_model("ctre", 784, 10, seed=0)
    assert kinds(m) == ["SparseLinear"] * 4
    s = model_stats(m)
    assert s["nnz"] == (784 + 1000) + 2 * 2000 + 1010
    assert 0.002 < s["density"] < 0.003


def test_epsilon_and_density_switch_the_patterns():
    m = build_model("set", IN, C, HID, epsilon=2.0)
    assert [l.nnz for l in layers(m)] == [topology.er_count(o, i, 2.0) for o, i in SHAPES]
    m = build_model("static", IN, C, HID, density=0.25)
    assert [l.nnz for l in layers(m)] == [round(0.25 * o * i) for o, i in SHAPES]
    assert m.info["pattern"] == "uniform"


def test_rigl_erk_overall_density():
    m = build_model("rigl", IN, C, HID, density=0.3, seed=1)
    assert kinds(m) == ["SparseLinear"] * 3
    s = model_stats(m)
    assert abs(s["density"] - 0.3) < 0.01
    want = topology.erk_densities(SHAPES, 0.3)
    for layer, d in zip(layers(m), want):
        assert abs(layer.density - d) < 1.5 / (layer.in_features * layer.out_features) + 1e-9
    m = build_model("rigl", IN, C, HID, epsilon=2.0)
    assert [l.nnz for l in layers(m)] == [topology.er_count(o, i, 2.0) for o, i in SHAPES]


@pytest.mark.parametrize("fan_out", [1, 2])
def test_tsm_topographic_input_layer(fan_out):
    m = build_model("tsm", IN, C, HID, input_shape=SHAPE, fan_out=fan_out)
    first, *deep = layers(m)
    assert isinstance(first, SparseLinear) and first.nnz == fan_out * IN
    assert first.pattern == topology.topographic(40, IN, SHAPE, fan_out=fan_out)
    assert all(isinstance(l, nn.Linear) for l in deep)
    # every input feature feeds exactly fan_out hidden neurons
    assert torch.equal(first.mask().sum(0), torch.full((IN,), fan_out))
    # deeper layers ER as an option
    m = build_model("tsm", IN, C, HID, input_shape=SHAPE, epsilon=2.0)
    assert [l.nnz for l in layers(m)[1:]] == [topology.er_count(o, i, 2.0) for o, i in SHAPES[1:]]
    assert m.info["deep"] == "er"


def test_tsm_input_layer_size_independent_of_width():
    a = build_model("tsm", IN, C, (40,), input_shape=SHAPE)
    b = build_model("tsm", IN, C, (400,), input_shape=SHAPE)
    assert layers(a)[0].nnz == layers(b)[0].nnz == IN


def test_etsm_starts_full_and_targets_overall_density():
    m = build_model("etsm", IN, C, HID, input_shape=SHAPE, density=0.2)
    first, *deep = layers(m)
    assert first.nnz == IN
    assert all(isinstance(l, SparseLinear) and l.density == 1.0 for l in deep)
    assert m.info["target_density"] == 0.2
    with pytest.raises(ValueError, match="below what the unpruned input layer"):
        build_model("etsm", IN, C, HID, input_shape=SHAPE, density=1e-4)


def test_g2g_ensembles_density_links_over_groups():
    m = build_model("g2g", IN, C, HID, groups=4, links=1, seed=0)
    first, second, out = layers(m)
    assert isinstance(out, nn.Linear)            # 10 classes: 4 groups do not divide it
    for l in (first, second):
        assert isinstance(l, SparseLinear) and l.block_size == 1   # ensembles of 10 hidden: no block divides
        assert math.isclose(l.density, 0.25)
    m2 = build_model("g2g", IN, C, HID, groups=4, links=2, seed=0)
    assert math.isclose(layers(m2)[1].density, 0.5)
    # ensemble structure: output neuron j only receives from its linked input ensembles
    mask = second.mask()
    assert mask.reshape(4, 10, 4, 10).any(3).any(1).sum() == 4


def test_g2g_bsr_when_a_block_divides_the_ensembles():
    m = build_model("g2g", 128, 10, (128,), groups=4, block_size=16)
    l = layers(m)[0]
    assert l.block_size == 16 and math.isclose(l.density, 0.25)
    assert l.values.shape[1:] == (16, 16)
    # automatic choice from block_sizes (BSR kernels are built into this _C)
    from sparsecore.apps.models import bsr_available
    m = build_model("g2g", 256, 10, (256, 256), groups=4)
    want = 64 if bsr_available() else 1
    assert [l.block_size for l in layers(m)[:2]] == [want, want]
    x = torch.randn(4, 256)
    if bsr_available():
        m(x).sum().backward()
    with pytest.raises(ValueError, match="must divide the ensemble sizes"):
        build_model("g2g", 128, 10, (128,), groups=4, block_size=5)


def test_same_seed_same_model_and_global_rng_untouched():
    torch.manual_seed(123)
    before = torch.get_rng_state()
    a = build_model("set", IN, C, HID, seed=7)
    assert torch.equal(torch.get_rng_state(), before)
    b = build_model("set", IN, C, HID, seed=7)
    c = build_model("set", IN, C, HID, seed=8)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa if sa[k].shape == sc[k].shape)


def test_init_rules():
    torch.manual_seed(0)
    m = build_model("set", 400, C, (400,), epsilon=50, seed=0)          # default "normal": N(0, 0.1)
    v = layers(m)[0].values.detach()
    assert abs(v.std().item() - 0.1) < 0.01
    m = build_model("ctre", 400, C, (400,), epsilon=50, seed=0, init="he")   # U(+-sqrt(6/400))
    v = layers(m)[0].values.detach()
    assert v.abs().max() <= math.sqrt(6 / 400) and v.abs().max() > 0.9 * math.sqrt(6 / 400)
    m = build_model("dense", 400, C, (400,), seed=0)
    assert layers(m)[0].weight.abs().max() <= 1 / 20
    m = build_model("ctre", 400, C, (400,), epsilon=50, seed=0)         # default "sparse": U(+-1/sqrt(row nnz))
    l = layers(m)[0]
    fan = l.mask().sum(1).clamp(min=1).float()
    assert (l.weight.abs() <= (1 / fan.sqrt())[:, None] + 1e-7).all()


@pytest.mark.parametrize("kwargs,match", [
    (dict(method="nope"), "unknown method"),
    (dict(method="set", epsilon=1.0, density=0.1), "at most one"),
    (dict(method="set", fan_out=2), "does not take option"),
    (dict(method="dense", density=0.5), "neither epsilon nor density"),
    (dict(method="set", epsilon=-1.0), "epsilon must be"),
    (dict(method="rigl", density=1.5), "density must be"),
    (dict(method="tsm", fan_out=0), "fan_out"),
    (dict(method="g2g", groups=4, links=5), "links"),
    (dict(method="set", init="xavier"), "init must be"),
])
def test_bad_arguments(kwargs, match):
    method = kwargs.pop("method")
    with pytest.raises(ValueError, match=match):
        build_model(method, IN, C, HID, input_shape=SHAPE, **kwargs)


def test_bad_hidden_and_input_shape():
    with pytest.raises(ValueError, match="hidden"):
        build_model("dense", IN, C, (40, 0))
    with pytest.raises(ValueError, match="input_shape"):
        build_model("tsm", IN, C, HID, input_shape=(7, 7, 1))


@pytest.mark.parametrize("method", ["dense", "static", "tsm"])
def test_no_updater_for_fixed_topologies(method):
    m = build_model(method, IN, C, HID, input_shape=SHAPE)
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    assert make_updater(method, m, opt, epochs=2, steps_per_epoch=3) is None


@pytest.mark.skipif(not HAS_DST, reason="sparsecore.dst not available")
@pytest.mark.parametrize("method", ["set", "rigl", "ctre", "g2g", "etsm"])
def test_updaters_build_and_step(method):
    from sparsecore import dst

    m = build_model(method, IN, C, HID, input_shape=SHAPE, seed=0)
    opt = torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9)
    up = make_updater(method, m, opt, epochs=2, steps_per_epoch=4, seed=0)
    assert isinstance(up, dst.Updater)
    g = torch.Generator().manual_seed(0)
    for _ in range(2):
        for _ in range(4):
            x = torch.randn(16, IN, generator=g)
            y = torch.randint(0, C, (16,), generator=g)
            opt.zero_grad()
            nn.functional.cross_entropy(m(x), y).backward()
            opt.step()
            up.step()
        up.epoch_end()
    assert m(torch.randn(2, IN)).shape == (2, C)


def test_tsm_input_layer_sparse_init_uses_actual_fan_in():
    m = build_model("tsm", IN, C, (16,), input_shape=SHAPE)          # 64 pixels onto 16 neurons: 4 inputs each
    first = layers(m)[0]
    assert torch.equal(first.mask().sum(1), torch.full((16,), 4))
    v = first.values.detach()
    assert v.abs().max() <= 0.5 and v.abs().max() > 0.4              # U(+-1/sqrt(4))
    m = build_model("tsm", IN, C, (16,), input_shape=SHAPE, init="linear")
    assert layers(m)[0].values.detach().abs().max() <= 1 / 8
    # on a full layer (ETSM's deeper layers) "sparse" is nn.Linear's rule
    m = build_model("etsm", IN, C, (16,), input_shape=SHAPE, density=0.5)
    deep = layers(m)[1].values.detach()
    assert deep.abs().max() <= 1 / 4 and deep.abs().max() > 0.9 / 4
