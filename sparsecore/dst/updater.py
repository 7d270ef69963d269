"""``Updater``: dynamic sparse training for every :class:`~sparsecore.nn.SparseLinear` of a model.

    updater = sparsecore.dst.Updater(model, optimizer, method="set", total_epochs=epochs)
    for epoch in range(epochs):
        for x, y in loader:
            loss = criterion(model(x), y); optimizer.zero_grad(); loss.backward(); optimizer.step()
            updater.step()                       # after every optimizer.step()
        updater.epoch_end()                      # SET, CTRE, G2G rewire here by default
        updater.report_validation(val_acc)       # only CTRE's ctre_seq variant uses it

The rules are those of docs/METHODS.md; every number not stated there is a named option below with its default.

=========  ==================================================================================================
method     rule (defaults)
=========  ==================================================================================================
static     never changes.
set        per epoch (not after the last one): prune ``zeta`` = 0.3 of the entries by magnitude (``set_signed``:
           ``zeta`` of the positive and ``zeta`` of the negative weights separately, as the SET reference);
           regrow as many uniformly at random among empty positions; new weights ``N(0, 1) * init_scale``,
           ``init_scale`` = 0.1.
rigl       every ``delta_t`` = 100 steps while ``t < stop_fraction * total_steps`` (0.75): prune ``alpha_t`` of the
           entries by magnitude, ``alpha_t = alpha/2 (1 + cos(pi t / T_end))``, ``alpha`` = 0.3 (``zeta`` sets it
           too; ``anneal=False`` keeps ``alpha_t = alpha``, as CTRE's comparison runs RigL); regrow where the dense
           gradient ``|dL/dW|`` is largest among empty positions; new weights 0.
ctre       per epoch: prune ``zeta`` = 0.2 by magnitude; regrow at the empty positions with the largest
           ``|cos(a_i, a_j)|`` (input neuron i, output neuron j); new weights ``U(-sqrt(6/fan_in), sqrt(6/fan_in))``.
           ``variant``: ``"cte"`` cosine only; ``"ctre_sim"`` a cosine pick that was pruned in the same update is
           replaced by a uniformly random empty position (never one pruned in that update); ``"ctre_seq"``
           cosine until :meth:`Updater.report_validation` saw no improvement for ``patience`` = 40 reports
           (epochs), random (SET-like) regrowth after that. ``zero_score_first_update=True`` reproduces a defect
           of the reference code, for measuring it: an update right after the first optimizer step, before any
           score exists, whose all-zero scores make TF's ``top_k`` regrow the lowest flat positions of the
           ``(in, out)`` kernel (input neuron 0 to outputs 0, 1, ..., then input neuron 1, ...).
g2g        per epoch: prune ``zeta`` = 0.3 by magnitude, regrow at the empty positions with the largest
           ``|Pearson corr(a_i, a_j)|``; new weights 0 (ours). ``within_ensembles=True`` restricts regrowth to
           linked ensemble pairs: ``groups`` ensembles per layer, the links taken from the layer's pattern when the
           Updater is built (a pair is linked when it holds any connection), or given as ``ensemble_links``
           (per layer, an int tensor ``(P, 2)`` of ``(out_group, in_group)``, as ``topology.linked_ensembles``).
gmp        every ``delta_t`` = 100 steps from ``start`` = 0 to ``end`` (default ``0.75 * total_steps``) and at
           ``end``: magnitude-prune each layer to the cubic schedule ``s_t = s_f + (s_i - s_f)(1 - (t - start) /
           (end - start))^3``, ``s_i`` its sparsity when the Updater is built, ``s_f = 1 - target_density``.
           No regrowth: nnz shrinks and the ``values`` Parameter is replaced (in the optimizer too).
etsm       ``gmp`` on every layer but the TSM input layer (the model's first ``nn.Linear``/``SparseLinear``)
           unless ``prune_input=True``. Layers to prune must be ``SparseLinear`` (dense ones at density 1).
=========  ==================================================================================================

Common options: ``regrow_pruned`` (True: an entry pruned in an update may be regrown by it, as a new entry with
the method's initial weight and zero optimizer state; ``"keep"``: it may, and then it keeps its weight and optimizer
state, as if never pruned, as the RigL/CTRE reference code does (a regrown position that was in the mask is "not a
new connection" there); False: it may not), ``init`` (``"zero"``, ``"normal"``
(std ``init_scale``), ``"uniform"`` (``+-init_scale``), ``"kaiming_uniform"`` (``+-sqrt(6 / in_features)``) or a
callable ``f(shape, generator, layer) -> Tensor``), ``chunk_elems`` = 2**20 (elements of one chunk of a dense
score matrix: RigL's gradient, CTRE's cosine, G2G's correlation are computed and streamed into a top-k in chunks
of output rows, never whole), ``max_samples`` = 2048 (CTRE/G2G reservoir rows per layer, see
:mod:`sparsecore.dst.scores`), ``stats`` (CTRE/G2G: ``"window"``, the activations of the last ``max_samples`` rows
of the training steps before the update; ``"reservoir"``; ``"full"``, a pass of the Updater's own over the whole
training set at each update, as CTRE's reference: set ``updater.stats_source`` to a callable returning an iterable
of input batches, e.g. the training set without its labels), ``activation`` (CTRE/G2G output-neuron activations: ``"auto"`` = softmax of the
output of the model's output layer (its last ``nn.Linear``/``SparseLinear``), ReLU of the others; or ``"relu"``,
``"softmax"``, ``"identity"``, ``"tanh"``, ``"sigmoid"``, a callable, or a list with one per layer).

Schedule: ``every`` = an int rewires every ``every`` optimizer steps (in :meth:`step`); ``every=None`` takes the
method's default (per epoch for set/ctre/g2g, ``delta_t`` steps for rigl/gmp/etsm); ``per_epoch=True`` forces
per-epoch updates. Epochs end when the training loop calls :meth:`epoch_end`, or, when ``steps_per_epoch`` is
given, every ``steps_per_epoch`` steps inside :meth:`step` (:meth:`epoch_end` then does nothing). ``epoch_length``
(steps) tells an :meth:`epoch_end`-driven schedule how long an epoch is, so that CTRE/G2G window statistics record
only its last steps (without it they record every step, always correct but not free). With
``total_epochs`` (or ``total_steps`` and ``steps_per_epoch``) the update after the last epoch is skipped, as
SET's reference does. No update ever happens before the first optimizer step, nor twice without a step between.

RigL's gradient: when the next step is an update step, :meth:`step` arms forward hooks that keep that step's layer
input ``x`` and a tensor hook that keeps ``dy`` (the gradient of the layer output) during its backward pass; the
update then computes ``dL/dW = dy^T x`` over that batch, in chunks. Call :meth:`arm` yourself before a
forward/backward to use :meth:`update` by hand.

Randomness: every choice of an update is a function of ``seed``, the update counter and the layer index
(:func:`sparsecore.dst.edit.derive_seed`); ties in magnitudes and scores are broken by a seeded random key.
:meth:`state_dict` / :meth:`load_state_dict` carry the counters, the ctre_seq phase, the activation statistics and
the reservoir's generator, so a checkpointed run resumes exactly.

Data parallelism (``torch.distributed`` initialised with more than one rank when the Updater is built; see
:mod:`sparsecore.dst.distributed` and docs/DISTRIBUTED.md). Give it the DDP-wrapped model or its ``.module``, and
build it, and call :meth:`step` / :meth:`epoch_end` / :meth:`report_validation`, alike on every rank. Every update
then gives the same pattern and values on every rank, those of one process training on the union of the ranks'
batches: RigL's dense-gradient chunks and CTRE/G2G's activation sums and cross-term chunks are all-reduced (memory:
one chunk), ``max_samples`` is the global window (each rank keeps ``ceil(max_samples / world)`` rows), every draw
is seeded and every tie broken by a seeded key. The construction compares the seed, the settings, the patterns and
the values across ranks, each update first the counters and after it a checksum of every layer's pattern and
values: a difference raises :class:`~sparsecore.dst.distributed.DivergenceError` on every rank. ``dist_scores``
says how the scores' statistics travel: ``"reduce"`` (default) all-reduces the ``(out, in)`` score chunks (each rank
multiplies only its own rows; the bytes do not grow with the ranks; the same bits on every rank whatever its
hardware); ``"gather"`` all-gathers the factor rows once (RigL's batch ``x``/``dy``, CTRE/G2G's window ``X``/``Y``:
``world * rows * (in + out)`` values) and every rank computes the scores of the union itself (``world`` times the
multiply work, and ranks must compute bit-identical matrix products); ``"auto"`` takes, per layer and update, the
one that moves fewer bytes (:func:`~sparsecore.dst.distributed.gather_is_cheaper`), for wide layers and small
batches on fast processors and slow networks. When gradual
pruning replaces a ``values`` Parameter, the DDP wrapper (given, or found at its first forward) gets a new reducer
over the new parameters (:func:`~sparsecore.dst.distributed.rebuild_reducer`); the pattern buffers are taken out of
DDP's per-forward buffer broadcast (:func:`~sparsecore.dst.distributed.exclude_pattern_buffers`). :attr:`costs`
records each update's seconds and what it communicated. Without a process group nothing of this runs.
"""
from __future__ import annotations

import hashlib
import math
import time
import warnings
from typing import Callable, List, Optional, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from ..nn import SparseLinear
from . import distributed as D
from . import edit as E
from .schedule import cubic_sparsity, rigl_fraction
from .scores import ActivationStats, dense_grad_chunks, similarity_chunks

__all__ = ["Updater", "METHODS"]

METHODS = ("static", "set", "rigl", "ctre", "g2g", "gmp", "etsm")


_EAGER_HOOK_REASON = ("a sparsecore DST Updater's recording hook runs outside the compiled graph, so that the model does "
                      "not recompile as the Updater's state changes; torch.compile(fullgraph=True) cannot include it: "
                      "compile without fullgraph")


def _eager_hook(hook: Callable) -> Callable:
    """A recording hook that torch.compile runs as it is instead of tracing it. Traced, the hook's checks (the
    step counter, the armed flag, the statistics' fill) become guards of the compiled forward, which then
    recompiled at every step until dynamo's cache limit and fell back to eager mode. Called eagerly, it costs one
    graph break per layer and recompiles nothing. (fullgraph=True refuses the break: dynamo's error then names
    this hook and gives the reason.)"""
    try:
        return torch.compiler.disable(hook, reason=_EAGER_HOOK_REASON)
    except TypeError:  # torch before 2.8 takes no reason
        return torch.compiler.disable(hook)


_COMMON = dict(regrow_pruned=True, chunk_elems=1 << 20, init=None, init_scale=None, dist_scores="reduce")
_DEFAULTS = {
    "static": dict(),
    "set": dict(zeta=0.3, set_signed=False, init="normal", init_scale=0.1),
    "rigl": dict(alpha=None, delta_t=100, stop_fraction=0.75, init="zero", anneal=True),
    "ctre": dict(zeta=0.2, variant="cte", patience=40, init="kaiming_uniform", activation="auto",
                 max_samples=2048, stats="window", zero_score_first_update=False),
    "g2g": dict(zeta=0.3, within_ensembles=False, groups=None, ensemble_links=None, init="zero",
                activation="auto", max_samples=2048, stats="window"),
    "gmp": dict(target_density=None, start=0, end=None, end_fraction=0.75, delta_t=100, prune_input=True),
    "etsm": dict(target_density=None, start=0, end=None, end_fraction=0.75, delta_t=100, prune_input=False),
}
_PER_EPOCH = ("set", "ctre", "g2g")
_ACTS = {
    "relu": torch.relu, "identity": lambda y: y, "tanh": torch.tanh, "sigmoid": torch.sigmoid,
    "softmax": lambda y: torch.softmax(y, dim=-1),
}


class Updater:
    """Dynamic sparse training of a model's :class:`SparseLinear` layers (see the module docstring).

    Args:
        model: the model, or its DistributedDataParallel wrapper; its ``SparseLinear`` modules (in ``modules()``
            order) are updated, or only ``layers``.
        optimizer: the ``torch.optim`` optimizer of the model (or None): its state follows every edit.
        method: one of :data:`METHODS`.
        zeta: prune fraction (method default when None: 0.3 SET/G2G, 0.2 CTRE; RigL's ``alpha``).
        every: update period in steps, or None for the method's default schedule.
        total_steps: training length in optimizer steps (RigL's ``T_end``, GMP's default ``end``).
        seed: seed of every random choice.
        layers: SparseLinear modules (or their names in the model) to update instead of all of them.
        per_epoch, steps_per_epoch, total_epochs, epoch_length: the per-epoch schedule (module docstring).
        process_group: the torch.distributed group the ranks of a data-parallel run form (default: the default
            group when one is initialised; none: single-process).
        **options: the method's options (module docstring); unknown names are an error.
    """

    def __init__(self, model: nn.Module, optimizer=None, method: str = "set", zeta: Optional[float] = None,
                 every: Optional[int] = None, total_steps: Optional[int] = None, seed: int = 0, *,
                 layers: Optional[Sequence] = None, per_epoch: Optional[bool] = None,
                 steps_per_epoch: Optional[int] = None, total_epochs: Optional[int] = None,
                 epoch_length: Optional[int] = None, process_group=None, **options):
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        opts = dict(_COMMON)
        opts.update(_DEFAULTS[method])
        unknown = set(options) - set(opts)
        if unknown:
            raise TypeError(f"unknown option(s) for method={method!r}: {sorted(unknown)}; "
                            f"valid: {sorted(opts)}")
        opts.update(options)
        model, ddp = D.unwrap(model)  # a DDP wrapper or its .module: the layers are the module's
        self.method, self.model, self.optimizer = method, model, optimizer
        self.seed = int(seed)
        self.total_steps = None if total_steps is None else int(total_steps)
        self.opts = opts
        if method == "rigl":
            alpha = opts["alpha"] if opts["alpha"] is not None else (zeta if zeta is not None else 0.3)
            self.zeta = float(alpha)
        else:
            self.zeta = float(zeta if zeta is not None else opts.get("zeta", 0.0))
        if not 0.0 <= self.zeta <= 1.0:
            raise ValueError(f"zeta must be in [0, 1], got {self.zeta}")
        if method == "ctre" and opts["variant"] not in ("cte", "ctre_sim", "ctre_seq"):
            raise ValueError(f"variant must be 'cte', 'ctre_sim' or 'ctre_seq', got {opts['variant']!r}")
        if opts["dist_scores"] not in ("auto", "reduce", "gather"):
            raise ValueError(f"dist_scores must be 'auto', 'reduce' or 'gather', got {opts['dist_scores']!r}")
        if method in ("ctre", "g2g") and opts["stats"] not in ActivationStats.MODES:
            raise ValueError(f"stats must be one of {ActivationStats.MODES}, got {opts['stats']!r}")
        if opts["regrow_pruned"] not in (True, False, "keep"):
            raise ValueError(f"regrow_pruned must be True, False or 'keep', got {opts['regrow_pruned']!r}")
        self.stats_source: Optional[Callable] = None  # stats="full": callable -> iterable of training input batches
        self._collecting = False
        self._zero_scores = False  # ctre zero_score_first_update: the update after step 1 is running

        # ---- layers
        if layers is None:
            self.layers: List[SparseLinear] = [m for m in model.modules() if isinstance(m, SparseLinear)]
        else:
            named = dict(model.named_modules())
            self.layers = [named[l] if isinstance(l, str) else l for l in layers]
            for l in self.layers:
                if not isinstance(l, SparseLinear):
                    raise TypeError(f"layers must be SparseLinear modules, got {type(l).__name__}")
        if not self.layers and method != "static":
            raise ValueError("the model has no SparseLinear layer to update")

        # ---- schedule
        if per_epoch is None:
            per_epoch = every is None and method in _PER_EPOCH
        if per_epoch and every is not None:
            raise ValueError("give either every= (steps) or per_epoch=True, not both")
        if not per_epoch and every is None:
            every = opts.get("delta_t", None)
        if every is not None and (not isinstance(every, int) or every < 1):
            raise ValueError(f"every must be a positive int, got {every!r}")
        self.per_epoch, self.every = bool(per_epoch), every
        self.steps_per_epoch = None if steps_per_epoch is None else int(steps_per_epoch)
        if epoch_length is not None and (isinstance(epoch_length, bool) or not isinstance(epoch_length, int)
                                         or epoch_length < 1):
            raise ValueError(f"epoch_length must be a positive int (steps), got {epoch_length!r}")
        self.epoch_length = epoch_length
        self._epoch_start_t = 0  # step count when the current epoch began (epoch_end-driven schedules)
        if total_epochs is None and self.total_steps and self.steps_per_epoch:
            total_epochs = math.ceil(self.total_steps / self.steps_per_epoch)
        self.total_epochs = total_epochs
        if method == "rigl":
            if self.total_steps is None:
                raise ValueError("method='rigl' needs total_steps= (its schedule stops at stop_fraction of it)")
            self.t_end = opts["stop_fraction"] * self.total_steps
        if method in ("gmp", "etsm"):
            td = opts["target_density"]
            if td is None or not 0.0 < td <= 1.0:
                raise ValueError(f"method={method!r} needs target_density in (0, 1], got {td!r}")
            if opts["end"] is None:
                if self.total_steps is None:
                    raise ValueError(f"method={method!r} needs end= or total_steps=")
                opts["end"] = int(round(opts["end_fraction"] * self.total_steps))
            if not opts["end"] > opts["start"] >= 0:
                raise ValueError(f"need 0 <= start < end, got start={opts['start']}, end={opts['end']}")
            # the TSM input layer: the model's first linear layer (sparse or dense), skipped unless prune_input
            linear = [m for m in model.modules() if isinstance(m, (nn.Linear, SparseLinear))]
            first = linear[0] if linear else None
            self._prune_layers = [i for i, l in enumerate(self.layers) if l is not first or opts["prune_input"]]
            self._s_init = [1.0 - l.pattern.nnz / self._entries(l) for l in self.layers]

        # ---- state
        self.t = 0                # optimizer steps seen
        self.epoch = 0            # epochs ended
        self.n_updates = 0        # topology updates done
        self._last_update_t = -1  # step of the last update (no two updates without a step between)
        self.phase = "cosine"     # ctre_seq: "cosine" then "random"
        self.best_val: Optional[float] = None
        self.bad_epochs = 0
        self.history: List[dict] = []  # one record per layer and update

        # ---- hooks. The recording hooks stay registered (torch.compile does not see hooks added after it traced),
        # and check what to record themselves; between the forward passes that record, _sync_hooks marks them idle
        # (hook.sc_idle), which lets a fused chain (sparsecore.SparseSequential) run over their layers.
        self._handles = []        # the DDP wrapper's finder, and the recording hooks
        self._layer_hooks = []    # (layer, hook) pairs of the recording hooks
        self._stats: List[Optional[ActivationStats]] = [None] * len(self.layers)
        self._res_gen = torch.Generator().manual_seed(E.derive_seed(self.seed, E.RESERVOIR))
        self._armed = False
        self._window_steps: Optional[int] = None  # window statistics: steps that fill max_samples rows
        self._x: List[Optional[Tensor]] = [None] * len(self.layers)
        self._dy: List[Optional[Tensor]] = [None] * len(self.layers)
        # data-parallel training (torch.distributed initialised, more than one rank): None otherwise
        self._comm = D.active_comm(process_group)
        if method in ("ctre", "g2g") and opts["stats"] == "full" and self._comm is not None:
            raise ValueError("stats='full' is not available under data parallelism: use 'window' or 'reservoir'")
        self.costs: List[dict] = []  # one record per update: seconds, and what it communicated
        if method in ("ctre", "g2g"):
            self._acts = self._activation_fns(opts["activation"])
            # under data parallelism max_samples is the global window: each rank keeps its share of the rows
            m_rank = opts["max_samples"] if self._comm is None else -(-opts["max_samples"] // self._comm.world)
            for i, l in enumerate(self.layers):
                self._stats[i] = ActivationStats(l.in_features, l.out_features, m_rank, self._res_gen,
                                                 mode=opts["stats"])
                self._layer_hooks.append((l, self._stats_hook(i)))
        if method == "rigl":
            for i, l in enumerate(self.layers):
                self._layer_hooks.append((l, self._capture_hook(i)))
            if self.per_epoch and not self.steps_per_epoch:
                self._armed = True  # epoch ends are not known in advance: keep the last batch of every step
            else:
                self._arm_if_next_updates()
        if method == "g2g" and opts["within_ensembles"]:
            self._allowed = [self._links_of(i, l) for i, l in enumerate(self.layers)]
        self._ddp = None
        if self._comm is not None:
            self._init_distributed(ddp)
        self._handles += [l.register_forward_hook(h) for l, h in self._layer_hooks]
        self._sync_hooks()

    # ------------------------------------------------------------------ training-loop interface
    def step(self) -> bool:
        """Call after every ``optimizer.step()``. Returns True when it rewired."""
        self.t += 1
        did = False
        if self.method == "ctre" and self.opts["zero_score_first_update"] and self.t == 1 and self.n_updates == 0:
            self._zero_scores = True
            try:
                self.update()
            finally:
                self._zero_scores = False
            did = True
        elif self.per_epoch:
            if self.steps_per_epoch and self.t % self.steps_per_epoch == 0:
                did = self._epoch_tick()
        elif self.every is not None and (self.t % self.every == 0 or self._extra_update_step(self.t)):
            if self._scheduled(self.t):
                self.update()
                did = True
        self._arm_if_next_updates()
        self._sync_hooks()
        return did

    def epoch_end(self) -> bool:
        """Call at the end of every epoch. Rewires when the schedule is per epoch (and this is not the last epoch).
        Does nothing with ``steps_per_epoch`` (epochs are then counted by :meth:`step`). Returns True when it
        rewired."""
        did = self._epoch_tick() if self.per_epoch and not self.steps_per_epoch else False
        self._sync_hooks()
        return did

    def report_validation(self, accuracy: float) -> None:
        """Report the validation accuracy of the epoch (``ctre_seq`` switches to random regrowth after ``patience``
        reports without improvement)."""
        acc = float(accuracy)
        if self.best_val is None or acc > self.best_val:
            self.best_val, self.bad_epochs = acc, 0
        else:
            self.bad_epochs += 1
        if (self.method == "ctre" and self.opts["variant"] == "ctre_seq" and self.phase == "cosine"
                and self.bad_epochs >= self.opts["patience"]):
            self.phase = "random"
        self._sync_hooks()

    def arm(self) -> None:
        """Record for a hand-called :meth:`update`: RigL keeps the layer inputs and output gradients of the next
        forward/backward; CTRE/G2G window statistics record every training forward from now on."""
        self._armed = True
        self._sync_hooks()

    def remove_hooks(self) -> None:
        """Detach the Updater from the model: its hooks are removed for good (nothing records any more)."""
        for h in self._handles:
            h.remove()
        self._handles, self._layer_hooks = [], []

    def _hooks_wanted(self) -> bool:
        """Whether the next training forward must run the layers' recording hooks: RigL's while armed, CTRE/G2G's
        while their statistics record (reservoir: always; window: in the steps that fill it; full: during the
        Updater's own pass). The hooks check the same conditions themselves (and always run where no chain fuses,
        e.g. under torch.compile), so this may only err towards True: a hook marked idle too early loses a batch
        inside a fused chain."""
        if not self._layer_hooks:
            return False
        if self.method == "rigl":
            return self._armed
        if self.method == "ctre" and self.phase == "random":
            return False
        for st in self._stats:
            if st is None:
                continue
            if st.mode == "reservoir" or (st.mode == "full" and self._collecting):
                return True
            # one step early as well: registering too soon costs a hook call, too late a missing batch
            if st.mode == "window" and (self._window_steps is None or self._window_open() or self._window_open(1)):
                return True
        return False

    def _sync_hooks(self) -> None:
        """Mark the recording hooks idle when the next forward records nothing (a fused chain may then skip them),
        active when it does. Called wherever the answer can change: construction, step, epoch_end,
        report_validation, arm, update, loading a state, and around the stats="full" pass."""
        idle = not self._hooks_wanted()
        for _, h in self._layer_hooks:
            h.sc_idle = idle

    # ------------------------------------------------------------------ schedule internals
    def _epoch_tick(self) -> bool:
        self.epoch += 1
        started, self._epoch_start_t = self._epoch_start_t, self.t
        if self.total_epochs is not None and self.epoch >= self.total_epochs:
            return False  # not after the last epoch
        if self.t == 0 or self._last_update_t == self.t:
            return False  # never before any training step (no scores yet), never twice at one step
        if self.epoch_length and self.t - started < self.epoch_length and self.method in ("ctre", "g2g"):
            empty = [i for i, st in enumerate(self._stats) if st is not None and st.mode == "window" and st.n == 0]
            if empty and not (self.method == "ctre" and self.phase == "random"):
                raise RuntimeError(f"{self.method}: this epoch had {self.t - started} steps, fewer than epoch_length="
                                   f"{self.epoch_length} minus the statistics window, so layers {empty} recorded "
                                   "nothing: pass the epoch's real length as epoch_length (or none)")
        self.update()
        return True

    def _extra_update_step(self, t: int) -> bool:
        return self.method in ("gmp", "etsm") and t == self.opts["end"]

    def _scheduled(self, t: int) -> bool:
        if t <= 0 or self._last_update_t == t:
            return False
        if self.method == "static":
            return False
        if self.method == "rigl":
            return t < self.t_end
        if self.method in ("gmp", "etsm"):
            o = self.opts
            return o["start"] < t <= o["end"]
        return True

    def _arm_if_next_updates(self) -> None:
        if self.method != "rigl" or (self.per_epoch and not self.steps_per_epoch) or self._armed:
            return
        nxt = self.t + 1
        if self.per_epoch:
            upd = nxt % self.steps_per_epoch == 0
        else:
            upd = nxt % self.every == 0 and self._scheduled(nxt)
        if upd:
            self._armed = True

    # ------------------------------------------------------------------ hooks
    def _activation_fns(self, spec) -> List[Callable]:
        n = len(self.layers)
        if isinstance(spec, (list, tuple)):
            if len(spec) != n:
                raise ValueError(f"activation list must have one entry per layer ({n}), got {len(spec)}")
            specs = list(spec)
        elif spec == "auto":
            # softmax after the model's output layer (the last linear layer, sparse or dense), ReLU elsewhere
            linear = [m for m in self.model.modules() if isinstance(m, (nn.Linear, SparseLinear))]
            out_layer = linear[-1] if linear else None
            specs = ["softmax" if l is out_layer else "relu" for l in self.layers]
        else:
            specs = [spec] * n
        fns = []
        for s in specs:
            if callable(s):
                fns.append(s)
            elif s in _ACTS:
                fns.append(_ACTS[s])
            else:
                raise ValueError(f"activation must be 'auto', one of {sorted(_ACTS)} or a callable, got {s!r}")
        return fns

    def _stats_hook(self, i: int):
        def hook(module, inputs, output):
            if not module.training or self._stats[i] is None:
                return
            if self.method == "ctre" and self.phase == "random":
                return  # ctre_seq after the switch: no scores needed
            st = self._stats[i]
            if st.mode == "full":
                if not self._collecting:
                    return  # full statistics come from the Updater's own pass at the update only
            elif st.mode == "window":
                if self._window_steps is None:  # the first batch tells how many steps fill the window
                    self._window_steps = -(-st.max_samples // max(1, inputs[0].numel() // st.n_in))
                if not self._window_open():
                    return
            with torch.no_grad():
                st.add(inputs[0], self._acts[i](output.detach()))
        return _eager_hook(hook)

    def _window_open(self, ahead: int = 0) -> bool:
        """Whether the coming step (or the one ``ahead`` steps after it) is one of the last ``_window_steps`` before
        a scheduled update (window statistics need only those). True when the next update is not known in advance
        (epochs ended by :meth:`epoch_end`) or after :meth:`arm`."""
        if self._armed:
            return True
        t_next = self.t + 1 + ahead  # the step whose forward pass is running
        if self.per_epoch:
            if not self.steps_per_epoch:
                if not self.epoch_length:
                    return True
                if self.total_epochs is not None and self.epoch + 1 >= self.total_epochs:
                    return False  # the last epoch: no update after it
                return t_next - self._epoch_start_t > self.epoch_length - self._window_steps
            spe = self.steps_per_epoch
            due = -(-t_next // spe) * spe  # the step that ends this epoch
            if self.total_epochs is not None and due // spe >= self.total_epochs:
                return False  # no update after the last epoch
        else:
            due = -(-t_next // self.every) * self.every
            if not self._scheduled(due):
                return False
        return due - t_next < self._window_steps

    def _capture_hook(self, i: int):
        def hook(module, inputs, output):
            if not self._armed or not module.training:
                return
            self._x[i] = inputs[0].detach()
            if output.requires_grad:
                def keep_dy(g, i=i):
                    self._dy[i] = g.detach()
                output.register_hook(keep_dy)
        return _eager_hook(hook)

    # ------------------------------------------------------------------ updates
    @staticmethod
    def _entries(layer: SparseLinear) -> int:
        bs = layer.block_size
        return (layer.out_features // bs) * (layer.in_features // bs)

    def update(self) -> None:
        """Rewire every layer now, by the method's rule."""
        if self.method == "static":
            return
        t0 = time.perf_counter()
        c0 = self._comm.counters() if self._comm is not None else (0, 0, 0.0)
        missing = []
        if self.method == "rigl":
            missing = [i for i in range(len(self.layers)) if self._x[i] is None or self._dy[i] is None]
        if self._comm is not None:
            self._agree_before_update(bool(missing))
        elif missing:
            raise RuntimeError("RigL needs the gradient of a batch: call updater.arm() before a forward/backward "
                               f"pass (no captured batch for layers {missing})")
        no_scores = self._zero_scores or (self.method == "ctre" and self.phase == "random")
        if self.method in ("ctre", "g2g") and self.opts["stats"] == "full" and not no_scores:
            self._collect_full()
        if self.method in ("ctre", "g2g") and not no_scores and self._comm is None:  # (distributed: checked on the counts of every rank, in the scores)
            empty = [i for i, s in enumerate(self._stats) if s is None or s.n == 0]
            if empty:
                raise RuntimeError(f"{self.method} needs activation statistics: run training forward passes (train "
                                   f"mode) before an update (none for layers {empty})")
        values_before = [l.values for l in self.layers]
        self._exchange: List[str] = []  # per scored layer: how its statistics travelled ("reduce" / "gather")
        records = []
        with torch.no_grad():
            for i, layer in enumerate(self.layers):
                rec = self._update_layer(i, layer)
                if rec is not None:
                    rec.update(step=self.t, update=self.n_updates, layer=i)
                    records.append(rec)
        if self._comm is not None:
            self._after_update_distributed(values_before)
        self.history.extend(records)
        self.n_updates += 1
        self._last_update_t = self.t
        for s in self._stats:
            if s is not None:
                s.reset()
        self._x = [None] * len(self.layers)
        self._dy = [None] * len(self.layers)
        if not (self.method == "rigl" and self.per_epoch and not self.steps_per_epoch):
            self._armed = False
        c1 = self._comm.counters() if self._comm is not None else (0, 0, 0.0)
        self.costs.append({"update": self.n_updates - 1, "step": self.t, "seconds": time.perf_counter() - t0,
                           "comm_bytes": c1[0] - c0[0], "comm_calls": c1[1] - c0[1],
                           "comm_seconds": c1[2] - c0[2], "score_exchange": list(self._exchange)})
        self._sync_hooks()

    @torch.no_grad()
    def _collect_full(self) -> None:
        """stats="full": one forward pass over ``stats_source()`` (the whole training set) recording every layer's
        input and output activations with the current weights."""
        if self.stats_source is None:
            raise RuntimeError(f"{self.method} with stats='full' needs updater.stats_source: a callable returning an "
                               "iterable of training input batches (the loop of sparsecore train sets it)")
        for s in self._stats:
            s.reset()
        was = self.model.training
        self.model.train()  # the hooks record training-mode forwards; no dropout/batch-norm in these MLPs
        self._collecting = True
        self._sync_hooks()
        try:
            for xb in self.stats_source():
                self.model(xb)
        finally:
            self._collecting = False
            self._sync_hooks()
            self.model.train(was)

    def _seed(self, i: int, tag: int) -> int:
        return E.derive_seed(self.seed, self.n_updates, i, tag)

    def _update_layer(self, i: int, layer: SparseLinear) -> Optional[dict]:
        if self.method in ("gmp", "etsm"):
            return self._gmp_layer(i, layer)
        pattern = layer.pattern
        nnz = pattern.nnz
        if self.method == "rigl" and self.opts["anneal"]:
            k = int(round(rigl_fraction(self.t, self.zeta, self.t_end) * nnz))
        else:
            k = int(round(self.zeta * nnz))
        keep, k = self._prune(i, layer, pattern, k)
        if k == 0:
            return {"pruned": 0, "grown": 0, "nnz": nnz}
        rp = self.opts["regrow_pruned"]
        occupied = keep if rp else None
        revived = 0
        if self._random_phase() and rp != "keep":
            new_pattern, gather, newpos = E.regrow_random(pattern, keep, k, self._seed(i, E.RANDOM), occupied)
        else:
            if self._random_phase():
                rows, cols = E.random_absent(pattern, k, self._seed(i, E.RANDOM), occupied)
            else:
                rows, cols = self._grow(i, layer, pattern, keep, occupied, k)
            if len(rows) < k:
                warnings.warn(f"layer {i}: only {len(rows)} of {k} regrowth candidates exist; nnz shrinks",
                              RuntimeWarning, stacklevel=3)
            if rp == "keep":
                keep, rows, cols, revived = self._revive(pattern, keep, rows, cols)
            new_pattern, gather, newpos = E.merge(pattern, keep, rows, cols)
        values = self._init_values(i, layer, newpos.numel())
        E.apply_edit(layer, self.optimizer, new_pattern, gather, newpos, values)
        return {"pruned": k, "grown": newpos.numel() + revived, "revived": revived, "nnz": new_pattern.nnz}

    @staticmethod
    def _revive(pattern, keep, rows, cols):
        """regrow_pruned="keep": regrown positions that were pruned in this update become kept entries again (their
        weight and optimizer state untouched) instead of new ones. Returns (keep, rows, cols, number revived)."""
        n_cols = pattern.shape[1] // pattern.block_size
        old = E.entry_positions(pattern)  # CSR order: ascending linear positions
        new = torch.from_numpy(np.asarray(rows, dtype=np.int64)) * n_cols + torch.from_numpy(np.asarray(cols, np.int64))
        if old.numel() == 0 or new.numel() == 0:
            return keep, rows, cols, 0
        idx = torch.searchsorted(old, new).clamp(max=old.numel() - 1)
        hit = old[idx] == new
        n = int(hit.sum())
        if n == 0:
            return keep, rows, cols, 0
        keep = keep.copy()
        keep[idx[hit].numpy()] = 1
        stay = (~hit).numpy()
        return keep, np.ascontiguousarray(rows[stay]), np.ascontiguousarray(cols[stay]), n

    def _prune(self, i, layer, pattern, k):
        """(keep mask, number pruned)."""
        if self.method == "set" and self.opts["set_signed"]:
            if layer.block_size != 1:
                raise ValueError("set_signed=True needs CSR layers (a block has no sign)")
            v = layer.values.detach().to("cpu")
            pos = v >= 0
            n_pos = int(pos.sum())
            k_pos = int(round(self.zeta * n_pos))
            k_neg = int(round(self.zeta * (v.numel() - n_pos)))
            inf = torch.tensor(float("inf"), dtype=v.dtype)
            keep_p = E.prune_keep(pattern, torch.where(pos, v, inf), k_pos, self._seed(i, E.PRUNE))
            keep_n = E.prune_keep(pattern, torch.where(pos, inf, -v), k_neg, self._seed(i, E.PRUNE_NEG))
            return keep_p & keep_n, k_pos + k_neg
        return E.prune_keep(pattern, E.magnitude_scores(layer.values), k, self._seed(i, E.PRUNE)), k

    # ---- growth rules
    def _random_phase(self) -> bool:
        """Random (SET-like) regrowth: SET, and ctre_seq after its switch."""
        return self.method == "set" or (self.method == "ctre" and self.opts["variant"] == "ctre_seq"
                                        and self.phase == "random")

    def _lowest_kernel_positions(self, pattern, keep, k):
        """zero_score_first_update: the first k positions not kept in the flat order of the reference's (in, out)
        kernel, i.e. column by column of our (out, in) layout (TF top_k returns equal scores lowest index first)."""
        n_rows, n_cols = pattern.shape[0] // pattern.block_size, pattern.shape[1] // pattern.block_size
        kept = E.entry_positions(pattern, keep)
        picks = []
        rows = torch.arange(n_rows, dtype=torch.int64)
        c, need = 0, k
        while need > 0 and c < n_cols:
            pos = rows * n_cols + c
            free = pos[~torch.isin(pos, kept)][:need]
            picks.append(free)
            need -= free.numel()
            c += 1
        pos = torch.cat(picks).sort().values if picks else torch.zeros(0, dtype=torch.int64)
        return (pos // n_cols).numpy().astype(np.int32), (pos % n_cols).numpy().astype(np.int32)

    def _grow(self, i, layer, pattern, keep, occupied, k):
        m = self.method
        if self._zero_scores:
            if occupied is None:
                raise ValueError("zero_score_first_update needs regrow_pruned=True or 'keep' (as the reference)")
            rows, cols = self._lowest_kernel_positions(pattern, keep, k)
            if self.opts["variant"] == "ctre_sim":
                rows, cols = self._ctre_sim_replace(i, pattern, keep, rows, cols)
            return rows, cols
        topk = E.TopKAbsent(pattern, k, self._seed(i, E.GROW), occupied)
        bs, ce = layer.block_size, self.opts["chunk_elems"]
        reduce, gather = self._score_exchange(i, layer)  # data parallelism: scores of every rank's samples
        if m == "rigl":
            x, dy = self._x[i], self._dy[i]
            if gather is not None:  # every rank's batch rows, then the dense gradient locally
                x, dy = gather(x.reshape(-1, x.shape[-1])), gather(dy.reshape(-1, dy.shape[-1]))
            chunks = dense_grad_chunks(x, dy, ce, bs, reduce=None if gather is not None else reduce)
        else:
            chunks = similarity_chunks(self._stats[i], "cosine" if m == "ctre" else "pearson", ce, bs,
                                       reduce=reduce, gather_rows=gather)
        allowed = self._allowed[i] if m == "g2g" and self.opts["within_ensembles"] else None
        for r0, c in chunks:
            if allowed is not None:
                c = self._mask_links(c, r0, allowed)
            topk.push(r0, c)
        rows, cols = topk.result()
        if m == "ctre" and self.opts["variant"] == "ctre_sim":
            rows, cols = self._ctre_sim_replace(i, pattern, keep, rows, cols)
        return rows, cols

    def _score_exchange(self, i: int, layer: SparseLinear):
        """``(reduce, gather)`` for layer i's growth scores under data parallelism (both None in one process):
        all-reduce the score chunks (``gather`` None), or all-gather the factor rows once (``dist_scores``:
        ``"reduce"``, ``"gather"``, or ``"auto"``, the one that moves fewer bytes for this layer and batch)."""
        comm = self._comm
        if comm is None:
            return None, None
        if self.method == "rigl":
            rows = self._x[i].reshape(-1, self._x[i].shape[-1]).shape[0]
        else:
            rows = self._stats[i].m if self._stats[i].x is not None else 0
        mode = self.opts["dist_scores"]
        if mode not in ("auto", "reduce", "gather"):
            raise ValueError(f"dist_scores must be 'auto', 'reduce' or 'gather', got {mode!r}")
        if mode == "reduce":
            self._exchange.append("reduce")
            return comm.all_reduce_, None
        counts = comm.row_counts(rows)
        if mode == "auto" and not D.gather_is_cheaper(comm.world, counts, layer.in_features, layer.out_features):
            self._exchange.append("reduce")
            return comm.all_reduce_, None
        self._exchange.append("gather")
        return comm.all_reduce_, (lambda t: comm.all_gather_rows(t, counts))

    def _ctre_sim_replace(self, i, pattern, keep, rows, cols):
        """Cosine picks that were pruned in this update are replaced by uniformly random empty positions, drawn
        among positions neither in the pattern before the update nor picked by cosine."""
        n_cols = pattern.shape[1] // pattern.block_size
        new_pos = torch.from_numpy(rows).to(torch.int64) * n_cols + torch.from_numpy(cols).to(torch.int64)
        pruned = E.entry_positions(pattern, (keep == 0).astype(np.uint8))
        again = torch.isin(new_pos, pruned)
        n_again = int(again.sum())
        if n_again == 0:
            return rows, cols
        stay = ~again.numpy()
        rows, cols = rows[stay], cols[stay]
        # occupied for the random draw: every old entry (pruned ones included) plus the remaining cosine picks
        occ_pattern, _, _ = E.merge(pattern, None, rows, cols)
        r2, c2 = E.random_absent(occ_pattern, n_again, self._seed(i, E.RANDOM), None)
        pos = np.concatenate([rows.astype(np.int64) * n_cols + cols, r2.astype(np.int64) * n_cols + c2])
        pos.sort()
        return (pos // n_cols).astype(np.int32), (pos % n_cols).astype(np.int32)

    def _links_of(self, i: int, layer: SparseLinear):
        """(allowed bool (groups, groups), out ensemble size, in ensemble size) in entries (blocks for BSR):
        which (out ensemble, in ensemble) pairs regrowth may use in layer i."""
        groups = self.opts["groups"]
        if isinstance(groups, (list, tuple)):
            groups = groups[i]
        if groups is None:
            raise ValueError("within_ensembles=True needs groups= (an int, or one per layer)")
        bs = layer.block_size
        n_r, n_c = layer.out_features // bs, layer.in_features // bs
        if n_r % groups or n_c % groups:
            raise ValueError(f"layer {i}: groups={groups} must divide its block rows {n_r} and block columns "
                             f"{n_c} (ensembles must not split blocks)")
        allowed = torch.zeros(groups, groups, dtype=torch.bool)
        links = self.opts["ensemble_links"]
        if links is not None:
            lk = links[i] if isinstance(links, (list, tuple)) else links
            lk = torch.as_tensor(lk, dtype=torch.int64)
            allowed[lk[:, 0], lk[:, 1]] = True
        else:  # the pairs that hold connections now
            r, c = layer.pattern.coo()
            allowed[r.cpu() // (n_r // groups), c.cpu() // (n_c // groups)] = True
        return allowed, n_r // groups, n_c // groups

    @staticmethod
    def _mask_links(chunk: Tensor, r0: int, links) -> Tensor:
        """-inf at the chunk's positions outside the linked ensemble pairs."""
        allowed, so, si = links
        og = torch.arange(r0, r0 + chunk.shape[0]) // so
        ig = torch.arange(chunk.shape[1]) // si
        ok = allowed[og][:, ig].to(chunk.device)
        return chunk.masked_fill(~ok, float("-inf"))

    # ---- new weights
    def _init_values(self, i: int, layer: SparseLinear, k: int) -> Optional[Tensor]:
        init = self.opts["init"]
        if k == 0 or init == "zero":
            return None  # apply_edit fills zeros
        bs = layer.block_size
        shape = (k,) if bs == 1 else (k, bs, bs)
        g = torch.Generator().manual_seed(self._seed(i, E.INIT))
        dtype = layer.values.dtype
        scale = self.opts["init_scale"]
        if callable(init):
            return init(shape, g, layer)
        if init == "normal":
            return torch.randn(shape, generator=g, dtype=dtype) * (0.1 if scale is None else scale)
        if init == "uniform":
            b = 0.1 if scale is None else scale
            return (torch.rand(shape, generator=g, dtype=dtype) * 2 - 1) * b
        if init == "kaiming_uniform":
            b = math.sqrt(6.0 / layer.in_features)
            return (torch.rand(shape, generator=g, dtype=dtype) * 2 - 1) * b
        raise ValueError(f"init must be 'zero', 'normal', 'uniform', 'kaiming_uniform' or a callable, got {init!r}")

    # ---- gradual magnitude pruning
    def _gmp_layer(self, i: int, layer: SparseLinear) -> Optional[dict]:
        if i not in self._prune_layers:
            return None
        o = self.opts
        total = self._entries(layer)
        s_t = cubic_sparsity(self.t, self._s_init[i], 1.0 - o["target_density"], o["start"], o["end"])
        target = int(round((1.0 - s_t) * total))
        pattern = layer.pattern
        k = pattern.nnz - target
        if k <= 0:
            return {"pruned": 0, "grown": 0, "nnz": pattern.nnz}
        keep = E.prune_keep(pattern, E.magnitude_scores(layer.values), k, self._seed(i, E.PRUNE))
        empty = np.zeros(0, np.int32)
        new_pattern, gather, newpos = E.merge(pattern, keep, empty, empty)
        E.apply_edit(layer, self.optimizer, new_pattern, gather, newpos, None)
        return {"pruned": k, "grown": 0, "nnz": new_pattern.nnz}

    # ------------------------------------------------------------------ data parallelism
    @property
    def world_size(self) -> int:
        """Ranks this Updater synchronises over (1 without torch.distributed)."""
        return 1 if self._comm is None else self._comm.world

    @property
    def ddp(self):
        """The DistributedDataParallel wrapper of the model: given, or found at its first forward; else None."""
        return None if self._ddp is None else self._ddp.get()

    def _settings_digest(self) -> int:
        """62-bit digest of everything that shapes the updates (method, schedule, options), compared across ranks."""
        def norm(v):
            if callable(v):
                return f"callable:{getattr(v, '__module__', '')}.{getattr(v, '__qualname__', type(v).__name__)}"
            if isinstance(v, (list, tuple)):
                return [norm(x) for x in v]
            if isinstance(v, Tensor):
                return ["tensor", D.tensor_checksum(v)]
            return repr(v)
        rec = [self.method, self.zeta, self.every, self.per_epoch, self.steps_per_epoch, self.total_epochs,
               self.total_steps, len(self.layers), sorted((k, norm(v)) for k, v in self.opts.items())]
        return int.from_bytes(hashlib.blake2b(repr(rec).encode(), digest_size=8).digest(), "little") & ((1 << 62) - 1)

    def _init_distributed(self, ddp) -> None:
        """Under torch.distributed: keep the DDP wrapper (given, or found by a forward pre-hook while DDP runs the
        model), take the pattern buffers out of its per-forward buffer broadcast, and check that every rank starts
        from the same seed, settings, patterns and values (a collective: every rank builds its Updater)."""
        self._ddp = D.DDPRef(self.model, ddp)
        self._ddp.on_found = D.exclude_pattern_buffers
        if ddp is not None:
            D.exclude_pattern_buffers(ddp)
        else:
            self._handles.append(self.model.register_forward_pre_hook(self._ddp.forward_pre_hook))
        counters = {"the Updater's seed": self.seed & ((1 << 62) - 1),
                    "the Updater's method, schedule or options": self._settings_digest(),
                    "the number of SparseLinear layers": len(self.layers)}
        try:
            D.check_consistent(self._comm, self.layers, counters, "when the Updater was built")
        except D.DivergenceError as e:
            raise D.DivergenceError(f"{e} If the models were built with different seeds, wrap the model in DDP "
                                    f"before building the Updater: DDP's construction copies rank 0's parameters and "
                                    f"buffers to every rank.") from None

    def _agree_before_update(self, missing: bool) -> None:
        """Every rank is at the same step and update, in the same phase, and has what its rule needs."""
        counters = [self.t, self.n_updates, 1 if self.phase == "random" else 0, self.bad_epochs, int(missing)]
        mm = self._comm.mismatches(counters)
        if mm[4][1]:
            raise RuntimeError("RigL needs the gradient of a batch on every rank: call updater.arm() before a "
                               "forward/backward pass (some rank has no captured batch)")
        names = ["the step counter", "the update counter", "the ctre_seq phase (report_validation got different "
                 "accuracies on different ranks)", "report_validation's count of epochs without improvement"]
        bad = [f"{n} ({lo} on some rank, {hi} on another)" for n, (lo, hi) in zip(names, mm[:4]) if lo != hi]
        if bad:
            raise D.DivergenceError(f"the {self._comm.world} ranks disagree before update {self.n_updates}: "
                                    + "; ".join(bad) + ". Every rank must call step(), epoch_end() and "
                                    "report_validation() alike (the same validation accuracy on every rank).")

    def _after_update_distributed(self, values_before) -> None:
        """Check that every rank holds the same patterns and values; give DDP a new reducer where a values
        Parameter was replaced (gradual pruning shrank nnz)."""
        hint = ("" if "gather" not in self._exchange else
                " (this update computed scores from gathered rows on every rank: ranks whose matrix products differ "
                "in the last bit, e.g. other CPUs or thread counts, can pick differently; dist_scores='reduce' "
                "computes them from all-reduced sums, the same bits on every rank)")
        D.check_consistent(self._comm, self.layers, {"the step counter": self.t},
                           f"at update {self.n_updates} (step {self.t}){hint}")
        replaced = any(l.values is not v for l, v in zip(self.layers, values_before))
        ddp = self.ddp
        if replaced and ddp is not None:
            D.rebuild_reducer(ddp)

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        """Counters, ctre_seq phase, GMP's initial sparsities, activation statistics and the reservoir's generator.
        To resume: load the model's state dict, build the optimizer on the loaded model (gradual pruning replaces
        ``values`` Parameters) and load its state, build the Updater the same way, then :meth:`load_state_dict`."""
        return {
            "method": self.method, "t": self.t, "epoch": self.epoch, "n_updates": self.n_updates,
            "last_update_t": self._last_update_t, "phase": self.phase, "best_val": self.best_val,
            "bad_epochs": self.bad_epochs, "armed": self._armed, "epoch_start_t": self._epoch_start_t,
            "s_init": getattr(self, "_s_init", None),
            "reservoir_rng": self._res_gen.get_state(),
            "stats": [None if s is None else s.state_dict() for s in self._stats],
        }

    def rank_local_state(self) -> dict:
        """The part of :meth:`state_dict` that is particular to this rank under data parallelism: the activation
        statistics (each rank's window or reservoir of its own samples) and the reservoir's generator. Everything
        else is equal on every rank."""
        return {"stats": [None if s is None else s.state_dict() for s in self._stats],
                "reservoir_rng": self._res_gen.get_state()}

    def has_rank_local_rows(self) -> bool:
        """Whether any layer's activation statistics hold samples now (they are empty right after an update)."""
        return any(s is not None and s.n > 0 for s in self._stats)

    def load_rank_local_state(self, st: dict) -> None:
        """Load what :meth:`rank_local_state` returned (after :meth:`load_state_dict`)."""
        self._res_gen.set_state(st["reservoir_rng"])
        for s, x in zip(self._stats, st["stats"]):
            if s is not None and x is not None:
                s.load_state_dict(x)

    def load_state_dict(self, sd: dict) -> None:
        if sd["method"] != self.method:
            raise ValueError(f"state is for method {sd['method']!r}, this Updater runs {self.method!r}")
        self.t, self.epoch, self.n_updates = int(sd["t"]), int(sd["epoch"]), int(sd["n_updates"])
        self._last_update_t = int(sd["last_update_t"])
        self.phase, self.best_val, self.bad_epochs = sd["phase"], sd["best_val"], int(sd["bad_epochs"])
        self._armed = bool(sd["armed"])
        self._epoch_start_t = int(sd.get("epoch_start_t", 0))
        if sd.get("s_init") is not None:
            self._s_init = list(sd["s_init"])
        self._res_gen.set_state(sd["reservoir_rng"])
        for s, st in zip(self._stats, sd["stats"]):
            if s is not None and st is not None:
                s.load_state_dict(st)
        self._x = [None] * len(self.layers)
        self._dy = [None] * len(self.layers)
        self._sync_hooks()

    def __repr__(self) -> str:
        sched = "per epoch" if self.per_epoch else f"every {self.every} steps"
        return (f"Updater(method={self.method!r}, zeta={self.zeta}, {sched}, layers={len(self.layers)}, "
                f"t={self.t}, updates={self.n_updates})")
