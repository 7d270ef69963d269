"""Dynamic sparse training under ``torch.distributed``: one topology on every rank.

With data-parallel training every rank holds a replica of the model and DDP all-reduces the gradients of the
parameters (for a :class:`~sparsecore.nn.SparseLinear`, the ``values`` of shape ``(nnz,)``: O(nnz) per step). The
*structure* (the int32 pattern buffers) is not a parameter, and nothing in torch keeps it equal across ranks. The
:class:`~sparsecore.dst.Updater` does, with what this module provides:

* :class:`Comm`: the process group an Updater synchronises over, its collectives (all-reduce in place, agreement on
  integers, gathering objects) and counters of what they sent (payload bytes, calls, seconds). :func:`active_comm`
  returns None when no process group is initialised or it has one rank, and then every Updater code path is the
  single-process one, unchanged.
* the statistics each growth rule scores with are reduced over ranks (RigL's dense-gradient chunks ``dy^T x``,
  CTRE/G2G's activation sums and the cross terms ``Y^T X`` chunk by chunk: see :mod:`sparsecore.dst.scores`), so
  every rank sees the scores of the global batch; every random choice is seeded (the seed is compared across ranks
  when the Updater is built), ties are broken by a seeded key, so every rank computes the same edit.
* :func:`layer_checksums`: after every update the ranks compare a 62-bit digest (blake2b) of each layer's pattern
  buffers and of its values (an all-reduce of ``4 * layers + 4`` int64); a difference raises
  :class:`DivergenceError` on every rank, naming the layer and what differs.
* :func:`rebuild_reducer`: DDP sizes its gradient buckets and keeps autograd hooks on the parameters it was built
  with; after gradual pruning replaces a ``values`` Parameter (nnz shrinks) the same DDP object gets a new reducer
  over the module's current parameters, as DDP's own ``__setstate__`` builds one.
* :func:`exclude_pattern_buffers`: DDP's ``broadcast_buffers`` (``forward_sync_buffers``) would copy rank 0's
  pattern buffers over every rank's at each forward: 3 * nnz + rows + cols int32 per layer and step, more than the
  gradient, and a rank's values could then sit under rank 0's pattern. The pattern buffers are taken out of that
  broadcast (other buffers, e.g. batch-norm statistics, keep DDP's setting); the checksums guarantee they are
  equal.

See docs/DISTRIBUTED.md for what each step and update sends and what it costs at scale.
"""
from __future__ import annotations

import hashlib
import inspect
import time
import weakref
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

__all__ = ["Comm", "active_comm", "DivergenceError", "gather_is_cheaper", "unwrap", "is_ddp", "layer_checksums", "tensor_checksum",
           "rebuild_reducer", "exclude_pattern_buffers", "pattern_buffer_names", "check_consistent",
           "active_ddp_module"]

_PATTERN_BUFFERS = ("rowptr", "col", "colptr", "row", "perm")
_MASK62 = (1 << 62) - 1


class DivergenceError(RuntimeError):
    """The ranks of a process group hold different topologies, values or Updater settings."""


def _dist():
    import torch.distributed as dist

    return dist


def is_ddp(model) -> bool:
    """Whether ``model`` is a ``torch.nn.parallel.DistributedDataParallel``."""
    from torch.nn.parallel import DistributedDataParallel

    return isinstance(model, DistributedDataParallel)


def unwrap(model: nn.Module) -> Tuple[nn.Module, Optional[nn.Module]]:
    """``(module, ddp)``: the module inside a DDP wrapper and the wrapper, or ``(model, None)``."""
    if is_ddp(model):
        return model.module, model
    return model, None


def active_ddp_module() -> Optional[nn.Module]:
    """The DDP object whose forward is running right now (torch sets it around the wrapped module's forward), or
    None. Lets an Updater given ``ddp.module`` find the wrapper from a forward hook."""
    from torch.nn.parallel import DistributedDataParallel

    get = getattr(DistributedDataParallel, "_get_active_ddp_module", None)
    return get() if get is not None else getattr(DistributedDataParallel, "_active_ddp_module", None)


# ----------------------------------------------------------------------------------------------- communication
class Comm:
    """Collectives over one process group, with counters of what they sent.

    ``bytes`` counts the *payload* of every collective (the bytes of the tensor all-reduced, or gathered from
    this rank); a ring all-reduce puts about ``2 (world - 1) / world`` times that on each rank's link. Tensors are
    moved to the backend's device (CUDA for NCCL, the CPU otherwise) when they are elsewhere.
    """

    def __init__(self, group=None):
        dist = _dist()
        self.group = group
        self.world = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self.backend = str(dist.get_backend(group))
        if self.backend == "nccl":
            self.device = torch.device("cuda", torch.cuda.current_device())
        else:
            self.device = torch.device("cpu")
        self.bytes = 0
        self.calls = 0
        self.seconds = 0.0

    def counters(self) -> Tuple[int, int, float]:
        return self.bytes, self.calls, self.seconds

    def _account(self, nbytes: int, t0: float) -> None:
        self.bytes += int(nbytes)
        self.calls += 1
        self.seconds += time.perf_counter() - t0

    def all_reduce_(self, t: Tensor, op: str = "sum") -> Tensor:
        """Reduce ``t`` over the ranks, in place (``op``: ``"sum"`` or ``"max"``); returns ``t``."""
        dist = _dist()
        t0 = time.perf_counter()
        rop = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}[op]
        if t.device == self.device and t.is_contiguous():
            dist.all_reduce(t, op=rop, group=self.group)
        else:
            buf = t.detach().to(self.device).contiguous()
            dist.all_reduce(buf, op=rop, group=self.group)
            t.copy_(buf)
        self._account(t.numel() * t.element_size(), t0)
        return t

    def mismatches(self, values: Sequence[int]) -> List[Tuple[int, int]]:
        """Compare integers (each in ``[-2**62, 2**62]``) across ranks with one all-reduce: ``(min, max)`` over
        the ranks for each entry (equal when every rank gave the same)."""
        v = torch.tensor([int(x) for x in values], dtype=torch.int64)
        both = torch.cat([v, -v]).to(self.device)
        self.all_reduce_(both, "max")
        both = both.cpu()
        n = v.numel()
        return [(-int(both[n + i]), int(both[i])) for i in range(n)]

    def any(self, flag: bool) -> bool:
        """True on every rank when ``flag`` is true on any."""
        t = torch.tensor([1 if flag else 0], dtype=torch.int64, device=self.device)
        return bool(int(self.all_reduce_(t, "max").item()))

    def row_counts(self, m: int) -> List[int]:
        """Every rank's ``m`` (an int), in rank order, on every rank."""
        t = torch.zeros(self.world, dtype=torch.int64, device=self.device)
        t[self.rank] = int(m)
        self.all_reduce_(t, "sum")
        return [int(v) for v in t.cpu()]

    def all_gather_rows(self, t: Tensor, counts: Sequence[int]) -> Tensor:
        """The rows of every rank's 2-D ``t`` (``counts[r]`` rows on rank r; ranks may differ), concatenated in
        rank order, on every rank: one all-gather of tensors padded to the largest count."""
        dist = _dist()
        t0 = time.perf_counter()
        m = max(counts)
        src = t.detach().to(self.device)
        if src.shape[0] < m:
            src = torch.cat([src, src.new_zeros(m - src.shape[0], *src.shape[1:])])
        src = src.contiguous()
        parts = [torch.empty_like(src) for _ in range(self.world)]
        dist.all_gather(parts, src, group=self.group)
        out = torch.cat([p[:c] for p, c in zip(parts, counts)]).to(t.device)
        self._account(src.numel() * src.element_size(), t0)
        return out

    def gather_object(self, obj: Any, dst: int = 0) -> Optional[List[Any]]:
        """Every rank's ``obj`` in rank order on ``dst`` (a rank of the group; None elsewhere)."""
        dist = _dist()
        t0 = time.perf_counter()
        out = [None] * self.world if self.rank == dst else None
        root = dst if self.group is None else dist.get_global_rank(self.group, dst)  # gather_object wants a global rank
        dist.gather_object(obj, out, dst=root, group=self.group)
        self._account(0, t0)
        return out

    def barrier(self) -> None:
        dist = _dist()
        t0 = time.perf_counter()
        if self.backend == "nccl":
            dist.barrier(group=self.group, device_ids=[self.device.index])
        else:
            dist.barrier(group=self.group)
        self._account(0, t0)


def active_comm(group=None) -> Optional[Comm]:
    """A :class:`Comm` over ``group`` (default: the default process group), or None when ``torch.distributed`` is
    not available, not initialised, or the group has a single rank (nothing to synchronise)."""
    dist = _dist()
    if not (dist.is_available() and dist.is_initialized()):
        return None
    if dist.get_world_size(group) <= 1:
        return None
    return Comm(group)


def gather_is_cheaper(world: int, rows: Sequence[int], n_in: int, n_out: int) -> bool:
    """Whether exchanging the *factors* of a score matrix (all-gathering each rank's rows of ``(in + out)``
    values: RigL's ``x``/``dy``, CTRE/G2G's ``X``/``Y``) moves fewer bytes per rank than all-reducing the
    ``(out, in)`` score matrix chunk by chunk. Ring estimates: all-gather ``(W - 1) * max(rows) * (in + out)``,
    all-reduce ``2 (W - 1) / W * out * in``; the same answer on every rank (its inputs are agreed)."""
    return world * max(rows) * (n_in + n_out) < 2 * n_in * n_out


# ----------------------------------------------------------------------------------------------- checksums
def tensor_checksum(t: Optional[Tensor]) -> int:
    """A 62-bit digest (blake2b) of a tensor's dtype, shape and bytes (0 for None). Copies to the CPU if needed:
    O(numel), once per update."""
    if t is None:
        return 0
    t = t.detach()
    h = hashlib.blake2b(digest_size=8)
    h.update(f"{t.dtype}{tuple(t.shape)}".encode())
    if t.numel():
        c = t.to("cpu").contiguous().reshape(-1)
        h.update(c.view(torch.uint8).numpy().tobytes() if c.dtype != torch.uint8 else c.numpy().tobytes())
    return int.from_bytes(h.digest(), "little") & _MASK62


def layer_checksums(layer: nn.Module) -> Tuple[int, int]:
    """``(pattern, values)`` digests of a SparseLinear: its five pattern buffers, and its ``values``."""
    h = hashlib.blake2b(digest_size=8)
    for name in _PATTERN_BUFFERS:
        h.update(tensor_checksum(layer._buffers[name]).to_bytes(8, "little"))
    return int.from_bytes(h.digest(), "little") & _MASK62, tensor_checksum(layer.values)


def check_consistent(comm: Comm, layers: Sequence[nn.Module], counters: Dict[str, int], when: str) -> None:
    """Raise :class:`DivergenceError` on every rank unless all ranks hold the same patterns and values of
    ``layers`` and the same ``counters`` (name -> int). One all-reduce of ``2 * (2 * layers + counters)`` int64."""
    sums = [layer_checksums(l) for l in layers]
    names = list(counters)
    values = [s[0] for s in sums] + [s[1] for s in sums] + [int(counters[n]) for n in names]
    mm = comm.mismatches(values)
    L = len(layers)
    problems = []
    for i in range(L):
        if mm[i][0] != mm[i][1]:
            problems.append(f"layer {i}: the pattern differs")
        elif mm[L + i][0] != mm[L + i][1]:
            problems.append(f"layer {i}: the values differ")
    for j, n in enumerate(names):
        lo, hi = mm[2 * L + j]
        if lo != hi:
            problems.append(f"{n} differs ({lo} on some rank, {hi} on another)")
    if problems:
        raise DivergenceError(
            f"the {comm.world} ranks diverged {when}: " + "; ".join(problems) + ". Every rank must build the "
            "model and the Updater with the same seed and options, train the same number of steps, and run its "
            "gradients through DDP (or the same reduction); patterns or values changed on one rank only cannot "
            "be reconciled.")


# ----------------------------------------------------------------------------------------------- DDP
def pattern_buffer_names(module: nn.Module) -> List[str]:
    """The names (as in ``module.named_buffers()``) of the pattern buffers of every SparseLinear in ``module``."""
    from ..nn import SparseLinear

    names = []
    for mname, m in module.named_modules():
        if isinstance(m, SparseLinear):
            names += [f"{mname}.{b}" if mname else b for b in _PATTERN_BUFFERS]
    return names


def exclude_pattern_buffers(ddp: nn.Module) -> List[str]:
    """Take the SparseLinear pattern buffers of ``ddp.module`` out of DDP's per-forward buffer broadcast
    (``broadcast_buffers`` / ``forward_sync_buffers``); other buffers keep DDP's setting. Returns the names
    excluded. Safe only where something else keeps the patterns equal on every rank: the Updater does, and checks
    it after every update. DDP's broadcast at construction (``init_sync``) already made them equal."""
    if not is_ddp(ddp):
        raise TypeError(f"expected a DistributedDataParallel, got {type(ddp).__name__}")
    names = pattern_buffer_names(ddp.module)
    ddp.parameters_to_ignore.update(names)  # DDP filters buffers (and params) by these names at every sync
    ddp._assign_modules_buffers()           # refresh the list DDP broadcasts (empty when nothing else is left)
    return names


def _check_rebuildable(ddp) -> None:
    problems = []
    if getattr(ddp, "mixed_precision", None) is not None:
        problems.append("mixed_precision is set")
    if getattr(ddp, "_use_python_reducer", False):
        problems.append("the Python reducer (compiled DDP) is in use")
    if getattr(ddp, "_delay_all_reduce_params", None):
        problems.append("delay_all_reduce_named_params is set (its buffer is sized at construction)")
    for name in ("_build_params_for_reducer", "_ddp_init_helper", "_build_debug_param_to_name_mapping"):
        if not callable(getattr(ddp, name, None)):
            problems.append(f"this torch's DDP has no {name}")
    helper = getattr(ddp, "_ddp_init_helper", None)
    if callable(helper):
        params = list(inspect.signature(helper).parameters)
        if params[:4] != ["parameters", "expect_sparse_gradient", "param_to_name_mapping", "static_graph"]:
            problems.append(f"this torch's DDP._ddp_init_helper takes {params}")
    if problems:
        raise RuntimeError("cannot rebuild DistributedDataParallel's reducer after nnz changed (gradual pruning "
                           "replaced a values Parameter): " + "; ".join(problems) + ". Re-wrap the model in a new "
                           "DDP after each such update, or use a method that keeps nnz (set, rigl, ctre, g2g).")


def rebuild_reducer(ddp: nn.Module) -> None:
    """Give ``ddp`` a new gradient reducer over its module's *current* parameters, in place.

    Needed after a parameter was replaced (gradual pruning shrinks nnz: the ``values`` Parameter of the new size
    replaces the old one in the module and the optimizer). DDP's reducer holds the parameters it was built with,
    buckets sized for them and autograd hooks on their gradient accumulators: unchanged, the new Parameter's
    gradient is never reduced and the next forward fails with "Expected to have finished reduction in the prior
    iteration". This does what DDP's own ``__setstate__`` does (``_build_params_for_reducer`` then
    ``_ddp_init_helper``), after removing the old reducer's hooks; communication hooks registered with
    ``register_comm_hook`` are registered again, and ``static_graph`` is set again. Every rank must call it at the
    same point (between iterations); it runs no collective itself (the new buckets are rebuilt, in gradient order,
    after the next backward, as at the start of training).

    Keeping the Parameter object and changing its size instead (``param.data = smaller``) does not work under
    DDP: the reducer keeps the parameter's gradient accumulator alive, whose recorded shape is the old one, and
    the next backward fails with "returned an invalid gradient ... expected shape compatible with [old nnz]".
    """
    if not is_ddp(ddp):
        raise TypeError(f"expected a DistributedDataParallel, got {type(ddp).__name__}")
    _check_rebuildable(ddp)
    dist = _dist()
    hooks = list(getattr(ddp, "_comm_hooks", []))
    static = bool(ddp.static_graph)
    old = ddp.reducer
    remove = getattr(old, "_remove_autograd_hooks", None)
    if callable(remove):
        remove()
    ddp.reducer = None
    ddp.logger = None  # holds the old reducer
    del old
    params, expect_sparse = ddp._build_params_for_reducer()
    ignore = ddp.parameters_to_ignore
    ddp._module_parameters = [p for n, p in ddp.module.named_parameters() if n not in ignore]
    mapping = ddp._build_debug_param_to_name_mapping(params)
    ddp.static_graph = False
    ddp._ddp_init_helper(params, expect_sparse, mapping, static)
    if static:
        ddp._set_static_graph()
    for hook, state in hooks:
        dist._register_comm_hook(ddp.reducer, state, hook)
    ddp._has_rebuilt_buckets = False


class DDPRef:
    """A weak reference to the DDP wrapper of a module: given, or found from a forward hook while DDP's forward
    runs (:func:`active_ddp_module`). Holds nothing when the model is not run through DDP."""

    def __init__(self, module: nn.Module, ddp: Optional[nn.Module] = None):
        self._module = weakref.ref(module)
        self._ref = weakref.ref(ddp) if ddp is not None else None
        self.on_found = None  # called with the DDP object when it is first known

    def get(self) -> Optional[nn.Module]:
        return self._ref() if self._ref is not None else None

    def set(self, ddp: nn.Module) -> None:
        self._ref = weakref.ref(ddp)
        if self.on_found is not None:
            self.on_found(ddp)

    def forward_pre_hook(self, module, inputs) -> None:
        if self.get() is not None:
            return
        ddp = active_ddp_module()
        if ddp is not None and ddp.module is self._module():
            self.set(ddp)
