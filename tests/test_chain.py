"""SparseSequential: runs of SparseLinear (-> ReLU) layers fused into one autograd node give the modules' results bit
for bit, fall back to the modules wherever they must, and keep gradients of gradients exact."""
import copy
import inspect

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sparsecore
from sparsecore import SparseLinear, SparseSequential
from sparsecore.chain import _has_hooks
from sparsecore.pattern import Pattern

from conftest import random_mask


def sparse(in_f, out_f, density, gen, dtype=torch.float32, bias=True, block_size=1, fm=False):
    bs = block_size
    mask = random_mask(out_f // bs, in_f // bs, density, gen, empty_rows=[1], empty_cols=[0])
    mask[0, 1] = True
    layer = SparseLinear(in_f, out_f, bias=bias, pattern=Pattern.from_mask(mask.repeat_interleave(bs, 0)
                                                                             .repeat_interleave(bs, 1), bs),
                         dtype=dtype)
    with torch.no_grad():
        layer.values.copy_(torch.randn(layer.values.shape, generator=gen, dtype=dtype) * 0.3)
        if bias:
            layer.bias.copy_(torch.randn(out_f, generator=gen, dtype=dtype))
    layer.feature_major = fm
    return layer


def run_graph_nodes(out):
    """Names of the autograd nodes reachable from out."""
    seen, todo, names = set(), [out.grad_fn], []
    while todo:
        f = todo.pop()
        if f is None or f in seen:
            continue
        seen.add(f)
        names.append(type(f).__name__)
        todo += [g for g, _ in f.next_functions]
    return names


def fused_and_modules(model, x, loss_fn):
    """(output, input grad, parameter grads) with the model fused and called module by module."""
    res = []
    for fused in (True, False):
        model.fused = fused
        xi = x.detach().clone().requires_grad_(x.requires_grad)
        for p in model.parameters():
            p.grad = None
        out = model(xi)
        loss_fn(out).backward()
        res.append((out.detach(), None if xi.grad is None else xi.grad, [p.grad for p in model.parameters()]))
    model.fused = True
    return res


def assert_same(a, b):
    (oa, xa, ga), (ob, xb, gb) = a, b
    assert torch.equal(oa, ob)
    assert (xa is None) == (xb is None) and (xa is None or torch.equal(xa, xb))
    assert len(ga) == len(gb) and all((p is None and q is None) or torch.equal(p, q) for p, q in zip(ga, gb))


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("batch", [1, 7, 100])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("fm", [False, True])
def test_fused_run_equals_the_modules_bit_for_bit(threads, batch, dtype, fm, gen):
    """A 4-layer MLP (ReLU between, none after the last), every parameter's gradient and the input's, against the
    same modules called one by one; feature-major layers (the MLPs of sparsecore train) and row-major ones."""
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        model = SparseSequential(sparse(30, 41, 0.2, gen, dtype, fm=fm), nn.ReLU(),
                                 sparse(41, 33, 0.05, gen, dtype, fm=fm), nn.ReLU(inplace=True),
                                 sparse(33, 40, 0.3, gen, dtype, bias=False, fm=fm), nn.ReLU(),
                                 sparse(40, 9, 0.5, gen, dtype, fm=fm))
        x = torch.randn(batch, 30, generator=gen, dtype=dtype).requires_grad_()
        target = torch.randint(0, 9, (batch,), generator=gen)
        a, b = fused_and_modules(model, x, lambda out: F.cross_entropy(out.float(), target))
        assert_same(a, b)
        names = run_graph_nodes(model(x))
        assert "_RunFunctionBackward" in names and "ReluBackward0" not in names
    finally:
        torch.set_num_threads(old)


def test_mixed_runs_bsr_dense_and_other_modules(gen):
    """Runs broken by a dense Linear, a LayerNorm and a Tanh; a BSR layer inside a run; a run ending in a ReLU;
    a layer whose input does not require grad (the first)."""
    torch.manual_seed(0)
    model = SparseSequential(sparse(32, 48, 0.3, gen, block_size=8), nn.ReLU(), sparse(48, 40, 0.2, gen), nn.ReLU(),
                             nn.Linear(40, 24), nn.LayerNorm(24), sparse(24, 16, 0.4, gen), nn.Tanh(),
                             sparse(16, 20, 0.3, gen), nn.ReLU(), sparse(20, 5, 0.6, gen), nn.ReLU())
    x = torch.randn(13, 32, generator=gen)
    a, b = fused_and_modules(model, x, lambda out: out.square().sum())
    assert_same(a, b)
    names = run_graph_nodes(model(x))
    assert names.count("_RunFunctionBackward") == 3


def test_gradients_of_gradients_are_exact(gen):
    """create_graph=True through a fused run: gradcheck and gradgradcheck in float64, and a gradient penalty equal
    to the modules' one."""
    model = SparseSequential(sparse(6, 9, 0.4, gen, torch.float64, fm=True), nn.ReLU(),
                             sparse(9, 7, 0.4, gen, torch.float64, fm=True), nn.ReLU(),
                             sparse(7, 3, 0.6, gen, torch.float64, fm=True))
    x = torch.randn(5, 6, generator=gen, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(model, (x,))
    assert torch.autograd.gradgradcheck(model, (x,))
    params = list(model.parameters())

    def penalty():
        xi = x.detach().requires_grad_()
        (gx,) = torch.autograd.grad(model(xi).sum(), xi, create_graph=True)
        return torch.autograd.grad(gx.square().sum(), params, allow_unused=True)  # (the last bias: unused)

    fused = penalty()
    model.fused = False
    modules = penalty()
    assert sum(g is not None for g in fused) == 5 and [g is None for g in fused] == [g is None for g in modules]
    assert all(a is None or torch.allclose(a, b, rtol=1e-10, atol=1e-12) for a, b in zip(fused, modules))


def test_falls_back_where_it_must(gen):
    """Hooks on a member (they run), no_grad, autocast, a 3-D input, subclasses: the modules one by one, with their
    results."""
    model = SparseSequential(sparse(10, 12, 0.4, gen), nn.ReLU(), sparse(12, 4, 0.5, gen))
    x = torch.randn(6, 10, generator=gen)
    seen = []
    h = model[0].register_forward_hook(lambda m, i, o: seen.append(o.shape))
    out = model(x)
    h.remove()
    names = run_graph_nodes(out)  # the hooked layer called as a module, the last one a run of its own
    assert seen == [(6, 12)] and "_EagerSparseLinearBackward" in names and names.count("_RunFunctionBackward") == 1
    with torch.no_grad():
        assert model(x).grad_fn is None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
        model.fused = False
        ref = model(x)
        model.fused = True
    assert out.dtype == torch.bfloat16 and torch.equal(out, ref)
    assert "_RunFunctionBackward" not in run_graph_nodes(out)
    out3 = model(torch.randn(2, 3, 10, generator=gen))
    assert out3.shape == (2, 3, 4) and "_RunFunctionBackward" not in run_graph_nodes(out3)

    class MyReLU(nn.ReLU):
        pass

    model[1] = MyReLU()
    names = run_graph_nodes(model(x))
    assert names.count("_RunFunctionBackward") == 2  # each layer a run of its own, the ReLU subclass between


def test_in_place_change_of_the_output_is_refused(gen):
    """The output is saved with autograd's version check (its ReLU mask comes from it): changing it in place
    before backward is an error, not a wrong gradient."""
    model = SparseSequential(sparse(10, 12, 0.4, gen), nn.ReLU())
    out = model(torch.randn(4, 10, generator=gen))
    out.mul_(2)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.sum().backward()


def test_compile_traces_the_modules(gen):
    model = SparseSequential(sparse(10, 12, 0.4, gen), nn.ReLU(), sparse(12, 4, 0.5, gen))
    x = torch.randn(6, 10, generator=gen)
    compiled = torch.compile(model, backend="eager")
    torch.testing.assert_close(compiled(x), model(x))


def test_sparsify_fuses_sequentials_in_place(gen):
    """The same objects (their class swapped), their hooks kept; a Sequential without sparse layers untouched."""
    inner = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 8))
    head = nn.Sequential(nn.Tanh(), nn.Identity())
    model = nn.Sequential(nn.Linear(12, 16), nn.ReLU(), inner, head)
    seen = []
    model.register_forward_pre_hook(lambda m, a: seen.append(1))
    out = sparsecore.sparsify(model, density=0.5, generator=gen)
    assert out is model and type(model) is SparseSequential and model[2] is inner
    assert type(inner) is SparseSequential and type(head) is nn.Sequential
    y = model(torch.randn(3, 12, generator=gen).requires_grad_())
    assert seen == [1]  # the hook on the container survived
    assert run_graph_nodes(y).count("_RunFunctionBackward") == 2
    twin = copy.deepcopy(model)
    assert type(twin) is SparseSequential and torch.equal(twin(torch.ones(2, 12)), model(torch.ones(2, 12)))
    plain = sparsecore.sparsify(nn.Sequential(nn.Linear(4, 4)), density=0.5, fuse=False)
    assert type(plain) is nn.Sequential
    with pytest.raises(TypeError, match="fuse must be True or False"):
        sparsecore.sparsify(nn.Sequential(nn.Linear(4, 4)), density=0.5, fuse="yes")


def test_state_dict_keys_unchanged_by_fusing(gen):
    def build():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 8))

    a = sparsecore.sparsify(build(), density=0.5, fuse=True, generator=torch.Generator().manual_seed(1))
    b = sparsecore.sparsify(build(), density=0.5, fuse=False, generator=torch.Generator().manual_seed(1))
    assert list(a.state_dict()) == list(b.state_dict())
    b.load_state_dict(a.state_dict())
    x = torch.randn(5, 12, generator=gen)
    assert torch.equal(a(x), b(x))


@pytest.mark.parametrize("method", ["set", "ctre", "g2g", "rigl"])
def test_dst_training_fused_equals_modules_and_hooks_only_while_recording(method, gen):
    """Three epochs of a method's MLP with its Updater: fused and module by module end with the same topology and
    values bit for bit (CTRE/G2G record their window statistics, RigL its gradient batch, through hooks that are
    active only for those steps and marked idle otherwise, so the other steps run fused)."""
    from sparsecore.apps.models import build_model, make_updater

    x_all = torch.randn(160, 16, generator=gen)
    y_all = torch.randint(0, 4, (160,), generator=gen)
    spe, batch = 8, 20

    def run(fused):
        model = build_model(method, 16, 4, (24, 24), seed=3, **({"groups": 2} if method == "g2g" else {}))
        model.fused = fused
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        opts = {"max_samples": 50} if method in ("ctre", "g2g") else {}
        up = make_updater(method, model, opt, epochs=3, steps_per_epoch=spe, seed=3, **opts)
        hooked, fused_steps = [], 0
        for step in range(3 * spe):
            i = (step % spe) * batch
            hooked.append(any(_has_hooks(m) for m in model if isinstance(m, SparseLinear)))
            opt.zero_grad()
            out = model(x_all[i:i + batch])
            fused_steps += "_RunFunctionBackward" in run_graph_nodes(out)
            F.cross_entropy(out, y_all[i:i + batch]).backward()
            opt.step()
            up.step()
            if (step + 1) % spe == 0:
                up.epoch_end()  # as sparsecore train calls it
        assert up.n_updates == 2
        return model, hooked, fused_steps

    a, hooked, fused_steps = run(True)
    b, _, _ = run(False)
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb), ka
    if method == "set":
        assert not any(hooked) and fused_steps == 3 * spe
    else:
        # recording steps: the window of 50 rows (3 batches of 20) before each of the 2 updates (CTRE, G2G: the
        # first step records too, to learn the batch size), RigL's last batch of each updating epoch
        assert 0 < sum(hooked) < 3 * spe and fused_steps == 3 * spe - sum(hooked)


def test_output_without_relu_may_be_changed_in_place(gen):
    """A run that ends in a layer (no ReLU) does not keep its output: the caller may change it in place before
    backward (a residual add, say), as after a SparseLinear, with the gradients of the modules one by one."""
    model = SparseSequential(sparse(10, 12, 0.4, gen), nn.ReLU(), sparse(12, 6, 0.5, gen))
    x = torch.randn(4, 10, generator=gen)
    res = torch.randn(4, 6, generator=gen)

    def loss_fn(out):
        return out.add_(res).square().sum()

    a, b = fused_and_modules(model, x, loss_fn)
    assert_same(a, b)


def _train_with_updater(method, gen, epochs, compiled, after_step=None):
    """A small MLP of ``method`` trained for ``epochs`` epochs of 6 batches with its Updater (epoch_end called as
    sparsecore train calls it), through torch.compile (eager backend) if ``compiled``; ``after_step()`` runs after
    each step. Returns the model and its Updater."""
    from sparsecore.apps.models import build_model, make_updater

    x_all = torch.randn(120, 16, generator=gen)
    y_all = torch.randint(0, 4, (120,), generator=gen)
    spe, batch = 6, 20
    torch._dynamo.reset()
    model = build_model(method, 16, 4, (24, 24), seed=3)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    opts = {"max_samples": 40} if method == "ctre" else {}
    up = make_updater(method, model, opt, epochs=epochs, steps_per_epoch=spe, seed=3, **opts)
    f = torch.compile(model, backend="eager") if compiled else model
    for step in range(epochs * spe):
        i = (step % spe) * batch
        opt.zero_grad()
        F.cross_entropy(f(x_all[i:i + batch]), y_all[i:i + batch]).backward()
        opt.step()
        up.step()
        if (step + 1) % spe == 0:
            up.epoch_end()
        if after_step is not None:
            after_step()
    return model, up


@pytest.mark.parametrize("method", ["rigl", "ctre"])
def test_dst_updates_through_torch_compile(method):
    """torch.compile does not see hooks registered after it traced: the Updater's recording hooks stay registered
    for the whole run (only marked idle), so a compiled model records its RigL batches and CTRE windows and
    updates, as the same model uncompiled does (same topology after the updates)."""

    def run(compiled):
        model, up = _train_with_updater(method, torch.Generator().manual_seed(0), 3, compiled)
        assert up.n_updates == 2
        return [m.pattern for m in model if isinstance(m, SparseLinear)]

    assert run(True) == run(False)


@pytest.mark.parametrize("method", ["rigl", "ctre"])
def test_compiled_model_with_updater_does_not_recompile(method, gen):
    """The recording hooks run eagerly under torch.compile: traced, their checks of the step counter and the
    window guarded the compiled forward, which then recompiled at every step of a CTRE window (and around RigL's
    armed steps) until dynamo's cache limit. Once the first steps have compiled, no step compiles a new graph,
    through updates and their recording windows alike, and the updates still happen."""
    from torch._dynamo.utils import counters

    counters.clear()
    graphs = []
    _, up = _train_with_updater(method, gen, 4, True, lambda: graphs.append(counters["stats"]["unique_graphs"]))
    assert up.n_updates >= 2
    assert graphs[-1] == graphs[1], f"graphs compiled per step: {graphs}"


def test_fullgraph_compile_with_recording_updater_names_the_hook(gen):
    """fullgraph=True cannot include the Updater's eager recording hooks: dynamo refuses, and its message carries
    our reason (where torch takes one), so the user learns what to change."""
    from sparsecore.apps.models import build_model, make_updater

    torch._dynamo.reset()
    model = build_model("rigl", 16, 4, (24, 24), seed=3)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    make_updater("rigl", model, opt, epochs=2, steps_per_epoch=3, seed=3)
    f = torch.compile(model, backend="eager", fullgraph=True)
    with pytest.raises(Exception) as err:
        f(torch.randn(5, 16, generator=gen))
    if "reason" in inspect.signature(torch.compiler.disable).parameters:
        assert "sparsecore DST Updater" in str(err.value)


def test_wrong_width_raises_as_the_modules_do(gen):
    """The kernels take the input's width on trust: a run ends at a layer whose in_features is not the width that
    reaches it, so the module raises its usual error instead of reading past the input (it read garbage)."""
    x = torch.randn(4, 8, generator=gen, requires_grad=True)
    first = SparseSequential(sparse(10, 6, 0.5, gen), nn.ReLU())
    with pytest.raises(ValueError, match="in_features = 10"):
        first(x)
    inner = SparseSequential(sparse(8, 5, 0.5, gen), nn.ReLU(), sparse(7, 3, 0.5, gen))
    with pytest.raises(ValueError, match="in_features = 7"):
        inner(x)


def test_a_flatten_before_the_run_keeps_it_fused(gen):
    """Fusion is decided per run, on the run's own input: a Flatten (4-D input) before the sparse layers leaves
    them fused, with the modules' results."""
    model = SparseSequential(nn.Flatten(), sparse(12, 10, 0.5, gen), nn.ReLU(), sparse(10, 4, 0.5, gen))
    x = torch.randn(5, 3, 2, 2, generator=gen, requires_grad=True)
    assert type(model(x).grad_fn).__name__ == "_RunFunctionBackward"
    a, b = fused_and_modules(model, x, lambda out: out.square().sum())
    assert_same(a, b)


@pytest.mark.parametrize("frozen", [(0,), (0, 1), (1,)])
def test_frozen_lower_layers(frozen, gen):
    """Layers whose parameters need no gradient (fine-tuning the top of a network), under an input that needs
    none: the run's backward stops at the lowest layer that wants gradients, with the modules' results."""
    model = SparseSequential(sparse(10, 12, 0.4, gen), nn.ReLU(), sparse(12, 9, 0.4, gen), nn.ReLU(),
                             sparse(9, 4, 0.5, gen))
    layers = [m for m in model if isinstance(m, SparseLinear)]
    for i in frozen:
        layers[i].requires_grad_(False)
    x = torch.randn(6, 10, generator=gen)
    a, b = fused_and_modules(model, x, lambda out: out.square().sum())
    assert_same(a, b)
    for i, m in enumerate(layers):
        assert (m.values.grad is None) == (i in frozen)
