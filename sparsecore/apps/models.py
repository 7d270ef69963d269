"""The sparse-training methods of docs/METHODS.md as ready-to-train MLPs, and their DST updater configuration.

    model = build_model("set", in_features=784, n_classes=10, hidden=(1000, 1000, 1000), epsilon=20, seed=0)
    updater = make_updater("set", model, optimizer, epochs=100, steps_per_epoch=540, seed=0)

Every model is an :class:`MLP`: ``Linear -> ReLU -> ... -> Linear`` (an ``nn.Sequential``, so layer ``2 * i`` is the
``i``-th linear layer), whose linear layers are :class:`~sparsecore.nn.SparseLinear` where the method makes them
sparse and ``nn.Linear`` where it keeps them dense. Inputs of more than two dimensions are flattened.

Methods and their defaults (ours where the papers give no number; every one is a named option)
-------------------------------------------------------------------------------------------------
=========  ==========================================================================================================
``dense``  ``nn.Linear`` everywhere (the reference the others are measured against).
``static`` ER(``epsilon``) on *every* layer, never changed. Default ``epsilon = 20`` (SET's MLP value), so that
           ``static`` is SET without the topology evolution.
``set``    ER(``epsilon``) on every layer, default ``epsilon = 20`` (SET reference); evolution per epoch
           (``zeta = 0.3``, random regrowth), see :func:`make_updater`.
``rigl``   ERK densities for an overall ``density`` (default 0.1) on every layer, or ER when ``epsilon`` is given;
           gradient regrowth every ``delta_t = 100`` steps until 75% of training, ``alpha = 0.3``.
``ctre``   ER(``epsilon``) on all four layers, default ``epsilon = 1`` (CTRE's reference, ~0.25% density on
           Fashion-MNIST with 1000-1000-1000); cosine regrowth per epoch, ``zeta = 0.2``; ``init="sparse"``.
``tsm``    a topographic input layer (``topology.topographic``, ``fan_out = 1``, so ``fan_out * in_features``
           connections); the deeper layers dense (``nn.Linear``), or ER(``epsilon``) / uniform(``density``) when
           either is given (``deep="dense"|"er"|"uniform"`` names it explicitly).
``etsm``   TSM, with the deeper layers stored sparse from the start (full, density 1) so that the updater's
           gradual cubic magnitude pruning shrinks them to a target *overall* density ``density``
           (default 0.1, counted over all weights of the model including the input layer). The input layer is
           kept unless ``prune_input=True``.
``g2g``    ensembles (``topology.ensembles``: ``groups = 4``, ``links = 1``, ``inner_density = 1``,
           ``linking = "ring"``), i.e. 25% density, on every layer whose both widths ``groups`` divides (the output
           layer of a 10-class problem stays dense). Block-sparse (BSR) when a block size from ``block_sizes``
           (default 64, 32, 16: measured faster than CSR at 25% density on 1024-wide layers, while blocks of
           10 or less were slower than CSR) divides the ensemble sizes *and* the BSR kernels are built, else
           CSR (so 1000-wide layers, ensembles of 250, run on CSR); ``block_size=`` forces one (``1`` = CSR).
=========  ==========================================================================================================

``--epsilon`` sets ER densities (``epsilon * (in + out)`` connections per layer), ``--density`` the others; giving
``density`` to an ER method (``set``, ``static``, ``ctre``) switches its layers to uniform random patterns of that
density.

Initialisation (``init=`` option): ``"linear"`` is ``nn.Linear``'s ``U(+-1/sqrt(fan_in))`` (dense fan-in), ``"he"`` is
``U(+-sqrt(6/fan_in))`` (METHODS.md's rule for CTRE's regrown weights), ``"normal"`` is ``N(0, 1)/10`` (SET's
reference), ``"glorot"`` is ``U(+-sqrt(6/(fan_in+fan_out)))`` of the *dense* shape with zero biases (TF's
``glorot_uniform`` kernel then masked: the CTRE/RigL reference code's initial weights), ``"sparse"`` is ``U(+-1/sqrt(k))`` with ``k`` the live inputs of each output neuron (its actual
fan-in: ``nn.Linear``'s rule carried over to sparse layers, identical to ``"linear"`` on dense and full layers).
Defaults: SET's reference rule for ``set``/``static`` (``"normal"``), ``"linear"`` for ``dense``, and ``"sparse"`` for ``rigl``, ``g2g``, ``tsm``,
``etsm`` and ``ctre`` (ours: with the dense fan-in a sparse layer starts with activations shrinking layer after
layer; TSM's input layer with ``fan_out = 1`` gives a hidden neuron only ``in / hidden`` inputs, and CTRE at
``epsilon = 1`` about 2: with ``"he"``, the rule METHODS.md gives for CTRE's *regrown* weights, our CTRE MLP on
Fashion-MNIST stayed at chance, train loss ln 10, for 2 epochs at lr 0.05, while ``"sparse"`` reached 77% test
accuracy). Biases start as ``nn.Linear``'s (zeros with ``"glorot"``).

Every random choice (patterns, initial values) comes from ``seed`` alone: the same arguments give the same model,
whatever the state of torch's global generator, which is left untouched.
"""
from __future__ import annotations

import math
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from ..chain import SparseSequential
from ..nn import SparseLinear
from ..pattern import Pattern

__all__ = ["METHODS", "MLP", "build_model", "make_updater", "method_defaults", "linear_layers", "model_stats",
           "bsr_available"]

METHODS: Tuple[str, ...] = ("tsm", "etsm", "g2g", "ctre", "set", "rigl", "static", "dense")

# Per-method defaults of build_model's options (docs/METHODS.md; "ours" where the papers give none).
_DEFAULTS: Dict[str, Dict[str, Any]] = {
    "dense": {"init": "linear"},
    "static": {"epsilon": 20.0, "init": "normal"},
    "set": {"epsilon": 20.0, "init": "normal"},
    "rigl": {"density": 0.1, "init": "sparse"},
    "ctre": {"epsilon": 1.0, "init": "sparse"},
    "tsm": {"fan_out": 1, "deep": None, "init": "sparse"},
    "etsm": {"fan_out": 1, "density": 0.1, "prune_input": False, "init": "sparse"},
    "g2g": {"groups": 4, "links": 1, "inner_density": 1.0, "linking": "ring", "block_size": None,
            "block_sizes": (64, 32, 16), "init": "sparse"},
}

# Options build_model accepts per method (beyond epsilon / density / input_shape / seed).
_OPTIONS: Dict[str, Tuple[str, ...]] = {
    "dense": ("init",),
    "static": ("init",),
    "set": ("init",),
    "rigl": ("init",),
    "ctre": ("init",),
    "tsm": ("fan_out", "deep", "init", "channels_first"),
    "etsm": ("fan_out", "prune_input", "init", "channels_first"),
    "g2g": ("groups", "links", "inner_density", "linking", "block_size", "block_sizes", "init"),
}

_INITS = ("linear", "he", "normal", "sparse", "glorot")


def method_defaults(method: str) -> Dict[str, Any]:
    """The default options of ``method`` (a copy)."""
    _check_method(method)
    return dict(_DEFAULTS[method])


def bsr_available() -> bool:
    """Whether the block-sparse CPU kernels are built into this ``sparsecore._C``."""
    from .. import _C

    return hasattr(_C, "bsr_spmm")


def _check_method(method) -> str:
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}: expected one of {', '.join(METHODS)}")
    return method


class MLP(SparseSequential):
    """``Linear -> ReLU -> ... -> Linear`` with some linear layers sparse (:class:`SparseLinear`); its runs of sparse
    layers train through one autograd node each (:class:`~sparsecore.SparseSequential`).

    Attributes: ``method`` (the name it was built for), ``widths`` (``[in, *hidden, classes]``), ``info``
    (a JSON-serialisable record of how each layer was built).
    """

    def __init__(self, layers: Sequence[nn.Module], method: str = "custom", info: Optional[dict] = None):
        mods: List[nn.Module] = []
        for i, layer in enumerate(layers):
            mods.append(layer)
            if i < len(layers) - 1:
                mods.append(nn.ReLU())
        super().__init__(*mods)
        self.method = method
        self.widths = [layers[0].in_features] + [layer.out_features for layer in layers]
        for layer in layers:  # activations between the layers stay feature-major: no tile transposes (ops.py)
            if isinstance(layer, SparseLinear):
                layer.feature_major = True
        self.info = info or {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() > 2:
            x = x.flatten(1)
        return super().forward(x)


def linear_layers(model: nn.Module) -> List[Tuple[str, nn.Module]]:
    """``(name, module)`` of every ``nn.Linear`` / :class:`SparseLinear` of ``model``, in order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Linear, SparseLinear))]


def model_stats(model: nn.Module) -> Dict[str, Any]:
    """Sizes of a model's linear layers: ``nnz`` (live weights: stored values of sparse layers plus all weights
    of dense ones), ``dense_params`` (weights of the dense model of the same widths), ``density``, ``biases``,
    ``n_params`` (every trainable number, biases included) and per-layer records."""
    layers = []
    nnz = dense = biases = 0
    for name, m in linear_layers(model):
        full = m.in_features * m.out_features
        if isinstance(m, SparseLinear):
            live, kind = m.nnz, ("csr" if m.block_size == 1 else f"bsr{m.block_size}")
        else:
            live, kind = full, "dense"
        b = m.bias.numel() if m.bias is not None else 0
        layers.append({"name": name, "kind": kind, "in": m.in_features, "out": m.out_features, "nnz": int(live),
                       "density": live / full if full else 0.0})
        nnz, dense, biases = nnz + live, dense + full, biases + b
    n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"nnz": int(nnz), "dense_params": int(dense), "density": nnz / dense if dense else 0.0,
            "biases": int(biases), "n_params": int(n_params), "layers": layers}


# ------------------------------------------------------------------------------------------------ building


def _parse_hidden(hidden) -> Tuple[int, ...]:
    if isinstance(hidden, int) and not isinstance(hidden, bool):
        hidden = (hidden,)
    try:
        h = tuple(hidden)
    except TypeError:
        raise ValueError(f"hidden must be a sequence of positive ints, got {hidden!r}") from None
    for w in h:
        if isinstance(w, bool) or not isinstance(w, int) or w < 1:
            raise ValueError(f"hidden widths must be positive ints, got {hidden!r}")
    return h


def _init_values(layer: nn.Module, init: str, g: torch.Generator) -> None:
    """Re-initialise the weights (not the bias) of ``layer`` by rule ``init``, from generator ``g``."""
    w = layer.values if isinstance(layer, SparseLinear) else layer.weight
    fan_in = layer.in_features
    with torch.no_grad():
        if init == "linear":
            bound = 1.0 / math.sqrt(fan_in)
            w.uniform_(-bound, bound, generator=g)
        elif init == "he":
            bound = math.sqrt(6.0 / fan_in)
            w.uniform_(-bound, bound, generator=g)
        elif init == "normal":
            w.normal_(0.0, 0.1, generator=g)
        elif init == "glorot":  # TF's glorot_uniform of the dense kernel, then masked (the CTRE/RigL reference)
            bound = math.sqrt(6.0 / (fan_in + layer.out_features))
            w.uniform_(-bound, bound, generator=g)
        elif init == "sparse":
            if not isinstance(layer, SparseLinear):
                return _init_values(layer, "linear", g)
            p = layer.pattern
            fan = (p.rowptr[1:] - p.rowptr[:-1]).to(torch.float64) * p.block_size
            bound = fan.clamp(min=1).rsqrt().to(w.dtype)                     # per block row
            bound = torch.repeat_interleave(bound, (p.rowptr[1:] - p.rowptr[:-1]).to(torch.int64))
            if p.block_size > 1:
                bound = bound[:, None, None]
            w.uniform_(-1.0, 1.0, generator=g).mul_(bound)
        else:  # pragma: no cover - checked earlier
            raise ValueError(init)
        if layer.bias is not None:
            if init == "glorot":
                layer.bias.zero_()  # TF dense layers' zeros bias initializer
            else:
                bound = 1.0 / math.sqrt(fan_in)
                layer.bias.uniform_(-bound, bound, generator=g)


def _sparse(pattern: Pattern) -> SparseLinear:
    return SparseLinear(pattern.shape[1], pattern.shape[0], pattern=pattern)


def _check_positive(name: str, v, *, upper: Optional[float] = None) -> float:
    try:
        f = float(v)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number, got {v!r}") from None
    if not (f > 0) or not math.isfinite(f) or (upper is not None and f > upper):
        rng = f"(0, {upper}]" if upper is not None else "> 0"
        raise ValueError(f"{name} must be {rng}, got {v!r}")
    return f


def _g2g_block(so: int, si: int, opts: dict) -> int:
    if opts.get("block_size") is not None:
        bs = int(opts["block_size"])
        if bs < 1 or so % bs or si % bs:
            raise ValueError(f"g2g block_size={bs} must divide the ensemble sizes {so} and {si}")
        return bs
    if not bsr_available():
        return 1
    for bs in opts.get("block_sizes") or ():
        if so % bs == 0 and si % bs == 0:
            return int(bs)
    return 1


def build_model(method: str, in_features: int, n_classes: int, hidden: Sequence[int] = (1000, 1000, 1000), *,
                input_shape: Optional[Sequence[int]] = None, epsilon: Optional[float] = None,
                density: Optional[float] = None, seed: int = 0, **method_options) -> MLP:
    """The MLP of ``method`` (see the module docstring for the methods, their options and defaults).

    Args:
        method: one of :data:`METHODS`.
        in_features, n_classes: input and output widths.
        hidden: hidden widths, e.g. ``(1000, 1000, 1000)``.
        input_shape: layout of one sample's features for ``tsm``/``etsm`` (``(H, W, C)``, ``(H, W)`` or
            ``(features,)``; default ``(in_features,)``).
        epsilon: ER parameter for ER layers. density: uniform/ERK density, or the ETSM target.
        seed: the only source of randomness.
        method_options: per-method options (``init``, ``fan_out``, ``deep``, ``groups``, ``links``, ...);
            an option the method does not know is an error.
    """
    _check_method(method)
    for name, v in (("in_features", in_features), ("n_classes", n_classes)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    hidden = _parse_hidden(hidden)
    unknown = set(method_options) - set(_OPTIONS[method])
    if unknown:
        raise ValueError(f"method {method!r} does not take option(s) {sorted(unknown)}; "
                         f"it takes {list(_OPTIONS[method]) or 'none'}")
    if epsilon is not None and density is not None:
        raise ValueError("give at most one of epsilon (ER) and density")
    if method == "dense" and (epsilon is not None or density is not None):
        raise ValueError("method 'dense' takes neither epsilon nor density")
    if method == "etsm" and epsilon is not None:
        raise ValueError("method 'etsm' takes a target overall density (density=), not epsilon")
    if epsilon is not None:
        epsilon = _check_positive("epsilon", epsilon)
    if density is not None:
        density = _check_positive("density", density, upper=1.0)
    opts = dict(_DEFAULTS[method])
    opts.update(method_options)
    init = opts.get("init", "linear")
    if init not in _INITS:
        raise ValueError(f"init must be one of {_INITS}, got {init!r}")

    # SparseLinear / nn.Linear draw their default init from torch's global generator; every value is drawn
    # again from ``g`` below, so run the construction on a forked generator and leave the caller's untouched.
    with torch.random.fork_rng(devices=[]):
        return _build(method, in_features, n_classes, hidden, input_shape, epsilon, density, seed, opts, init)


def _build(method, in_features, n_classes, hidden, input_shape, epsilon, density, seed, opts, init) -> MLP:
    from .. import topology

    widths = [in_features, *hidden, n_classes]
    shapes = [(widths[i + 1], widths[i]) for i in range(len(widths) - 1)]   # (out, in)
    g = torch.Generator().manual_seed(int(seed) % 2**63)
    info: Dict[str, Any] = {"method": method, "widths": widths, "seed": int(seed), "init": init}
    layers: List[nn.Module] = []

    def er_or_uniform(out_f: int, in_f: int, eps: Optional[float], dens: Optional[float]) -> nn.Module:
        if dens is not None:
            return _sparse(topology.uniform(out_f, in_f, dens, generator=g))
        return _sparse(topology.erdos_renyi(out_f, in_f, eps, generator=g))

    if method == "dense":
        layers = [nn.Linear(i, o) for o, i in shapes]
    elif method in ("static", "set", "ctre"):
        eps = None if density is not None else (epsilon if epsilon is not None else opts["epsilon"])
        layers = [er_or_uniform(o, i, eps, density) for o, i in shapes]
        info.update(epsilon=eps, density=density, pattern="uniform" if density is not None else "er")
    elif method == "rigl":
        if epsilon is not None:
            layers = [_sparse(topology.erdos_renyi(o, i, epsilon, generator=g)) for o, i in shapes]
            info.update(epsilon=epsilon, pattern="er")
        else:
            d = density if density is not None else opts["density"]
            dens = topology.erk_densities(shapes, d)
            layers = [_sparse(topology.uniform(o, i, dl, generator=g)) if dl < 1.0 else _full(o, i)
                      for (o, i), dl in zip(shapes, dens)]
            info.update(density=d, pattern="erk", layer_densities=dens)
    elif method in ("tsm", "etsm"):
        shape_in = tuple(input_shape) if input_shape is not None else (in_features,)
        if math.prod(shape_in) != in_features:
            raise ValueError(f"input_shape {shape_in} has {math.prod(shape_in)} features but in_features="
                             f"{in_features}")
        fan_out = int(opts["fan_out"])
        if not 1 <= fan_out <= widths[1]:
            raise ValueError(f"fan_out must be in [1, first hidden width {widths[1]}], got {opts['fan_out']!r}")
        first = _sparse(topology.topographic(widths[1], in_features, shape_in, fan_out=fan_out,
                                             channels_first=bool(opts.get("channels_first", False))))
        layers = [first]
        info.update(input_shape=list(shape_in), fan_out=fan_out)
        if method == "tsm":
            deep = opts.get("deep")
            if deep is None:
                deep = "er" if epsilon is not None else "uniform" if density is not None else "dense"
            if deep not in ("dense", "er", "uniform"):
                raise ValueError(f"deep must be 'dense', 'er' or 'uniform', got {deep!r}")
            if deep == "er" and epsilon is None:
                raise ValueError("tsm with deep='er' needs epsilon")
            if deep == "uniform" and density is None:
                raise ValueError("tsm with deep='uniform' needs density")
            for o, i in shapes[1:]:
                layers.append(nn.Linear(i, o) if deep == "dense" else
                              er_or_uniform(o, i, epsilon if deep == "er" else None,
                                            density if deep == "uniform" else None))
            info.update(deep=deep, epsilon=epsilon, density=density)
        else:
            target = density if density is not None else opts["density"]
            layers += [_full(o, i) for o, i in shapes[1:]]
            info.update(target_density=target, prune_input=bool(opts["prune_input"]))
            # check the target is reachable by pruning the prunable layers
            _etsm_layer_density(layers, target, bool(opts["prune_input"]))
    elif method == "g2g":
        groups, links = int(opts["groups"]), int(opts["links"])
        if not (1 <= links <= groups):
            raise ValueError(f"g2g needs 1 <= links <= groups, got groups={groups}, links={links}")
        if density is not None or epsilon is not None:
            raise ValueError("g2g's density is links / groups * inner_density: set groups/links/inner_density")
        blocks = []
        for o, i in shapes:
            if o % groups or i % groups:
                layers.append(nn.Linear(i, o))
                blocks.append(0)
                continue
            bs = _g2g_block(o // groups, i // groups, opts)
            layers.append(_sparse(topology.ensembles(o, i, groups, links, inner_density=opts["inner_density"],
                                                     linking=opts["linking"], block_size=bs, generator=g)))
            blocks.append(bs)
        info.update(groups=groups, links=links, inner_density=opts["inner_density"], linking=opts["linking"],
                    block_sizes=blocks)

    for layer in layers:
        _init_values(layer, init, g)
    return MLP(layers, method=method, info=info)


def _full(out_f: int, in_f: int) -> SparseLinear:
    """A SparseLinear holding every connection (density 1), for layers that a DST method will prune."""
    rows = torch.arange(out_f, dtype=torch.int64).repeat_interleave(in_f)
    cols = torch.arange(in_f, dtype=torch.int64).repeat(out_f)
    return _sparse(Pattern.from_indices(rows, cols, (out_f, in_f)))


def _etsm_layer_density(layers: Sequence[nn.Module], target: float, prune_input: bool) -> float:
    """Density every prunable layer must end at so that the whole model has overall density ``target``."""
    total = sum(m.in_features * m.out_features for m in layers)
    fixed = 0 if prune_input else (layers[0].nnz if isinstance(layers[0], SparseLinear) else
                                   layers[0].in_features * layers[0].out_features)
    prunable = [m for k, m in enumerate(layers) if prune_input or k > 0]
    room = sum(m.in_features * m.out_features for m in prunable)
    want = target * total - fixed
    if room == 0 or want <= 0:
        raise ValueError(f"etsm target density {target} is below what the unpruned input layer already holds "
                         f"({fixed} of {total} weights, density {fixed / total:.4g}); raise it or set "
                         f"prune_input=True")
    return min(1.0, want / room)


# ------------------------------------------------------------------------------------------------ updaters

_STEP_METHODS = ("rigl", "etsm")        # rewired every ``every`` optimizer steps; the others once per epoch


def make_updater(method: str, model: nn.Module, optimizer: torch.optim.Optimizer, *, epochs: int,
                 steps_per_epoch: int, seed: int = 0, **options):
    """The :class:`sparsecore.dst.Updater` that evolves ``model``'s topology for ``method``, or ``None`` for the
    methods whose topology is fixed (``dense``, ``static``, ``tsm``).

    The rules and their defaults are the updater's (docs/METHODS.md): SET ``zeta = 0.3`` per epoch, random regrowth
    ``N(0, 0.1)``; RigL ``alpha = 0.3`` until 75% of training, gradient regrowth; CTRE ``zeta = 0.2`` per epoch,
    cosine regrowth (``variant="cte"``; ``ctre_sim``/``ctre_seq`` by option); G2G ``zeta = 0.3`` per epoch,
    correlation regrowth; ETSM cubic gradual magnitude pruning of every layer but the input one until 75% of
    training, to the per-layer density that gives the model's target overall density. Set here:

    * ``every`` (steps) for RigL and ETSM: ``min(100, steps_per_epoch)`` (ours: the reference's ``delta_t = 100``,
      made shorter when an epoch is, so that short runs still get updates); per epoch for SET, CTRE and G2G.
      ``per_epoch=True`` puts RigL on the per-epoch schedule too (an update at the end of every epoch but the last,
      from the gradient of the epoch's last batch, as CTRE's comparison runs it; give ``anneal=False`` and
      ``stop_fraction=1.0`` for its constant drop fraction over the whole run).
    * ``total_steps = epochs * steps_per_epoch`` and ``total_epochs = epochs`` (no update after the last epoch).
    * ``activation`` for CTRE/G2G: softmax after the model's output layer, ReLU after the others (the updater's
      "auto" would take the last *sparse* layer for the output, wrong when the output layer is dense).

    ``options`` are passed on to the updater (``zeta``, ``every``, ``variant``, ``within_ensembles``, ``init``,
    ``max_samples``, ...; an unknown name is an error). ``model`` may be a DistributedDataParallel wrapper: its
    ``.module`` is inspected, and the wrapper given to the updater.
    """
    _check_method(method)
    if method in ("dense", "static", "tsm"):
        if options:
            raise ValueError(f"method {method!r} has no topology updates; got updater options {sorted(options)}")
        return None
    from .. import dst

    wrapper = model
    model, _ = dst.distributed.unwrap(model)  # inspect the module inside a DDP wrapper
    total_steps = int(epochs) * int(steps_per_epoch)
    opts = dict(options)
    kw: Dict[str, Any] = {"total_steps": total_steps, "total_epochs": int(epochs), "seed": int(seed)}
    per_epoch = opts.pop("per_epoch", None)
    if per_epoch is not None and not isinstance(per_epoch, bool):
        raise ValueError(f"per_epoch must be true or false, got {per_epoch!r}")
    if per_epoch and "every" in opts:
        raise ValueError("give either every= (steps) or per_epoch=True, not both")
    if per_epoch and method in _STEP_METHODS:
        if method == "etsm":
            raise ValueError("etsm prunes gradually every `every` steps: per_epoch does not apply")
        kw.update(per_epoch=True, steps_per_epoch=int(steps_per_epoch))  # epochs counted by step()
    elif per_epoch is False and method not in _STEP_METHODS:
        raise ValueError(f"method {method!r} updates once per epoch; give every= (steps) for another schedule")
    elif "every" in opts:
        every = opts.pop("every")
        kw["every"] = None if every is None else int(every)
    elif method in _STEP_METHODS:
        kw["every"] = max(1, min(100, int(steps_per_epoch)))
    else:  # per epoch, at epoch_end(): the epoch's length lets CTRE/G2G record statistics in its last steps only
        kw["epoch_length"] = int(steps_per_epoch)
    if "zeta" in opts:
        kw["zeta"] = opts.pop("zeta")
    sparse = [m for m in model.modules() if isinstance(m, SparseLinear)]
    all_linear = [m for _, m in linear_layers(model)]
    if method in ("ctre", "g2g") and "activation" not in opts:
        out_layer = all_linear[-1] if all_linear else None
        opts["activation"] = ["softmax" if m is out_layer else "relu" for m in sparse]
    if method == "g2g" and opts.get("within_ensembles") and "groups" not in opts:
        opts["groups"] = getattr(model, "info", {}).get("groups")
    if method == "etsm":
        info = getattr(model, "info", {})
        prune_input = bool(info.get("prune_input", False))
        opts.setdefault("target_density", _etsm_layer_density(all_linear, info.get("target_density", 0.1),
                                                              prune_input))
        opts.setdefault("prune_input", prune_input)
    return dst.Updater(wrapper, optimizer, method=method, **kw, **opts)  # a DDP wrapper is passed on as given
