"""``SparseSequential``: an ``nn.Sequential`` that trains each run of ``SparseLinear -> ReLU -> ... -> SparseLinear``
through one autograd node.

On the small layers of sparse-training papers (1000 wide, batch 100, 0.2-5% dense) a training step is mostly fixed
costs rather than arithmetic: per layer an ``autograd.Function`` call and its checks, a ReLU op with an autograd node
of its own, and the engine's work for every node in the backward pass. A chain runs the same kernels on the same
layouts, layer after layer, inside one ``autograd.Function``: the result and every gradient are bit for bit those of
the modules called one by one (tested), and the activations it keeps for the backward pass are the ones the modules
would keep (each layer's input, which is the previous ReLU's output).

A run is fused only where nothing could tell the difference; anywhere else the modules are called one by one as
``nn.Sequential`` does:

* the modules of a run are exactly :class:`~sparsecore.nn.SparseLinear` and ``nn.ReLU`` (not subclasses), with no
  hooks of their own, and no global module hooks are registered (the DST updater's recording hooks are marked idle
  between the steps that record, see :class:`sparsecore.dst.Updater`, and do not count);
* autograd records (grad mode on, and the input or a parameter requires grad), no ``torch.autocast`` region is
  active for the input's device, and ``torch.compile`` is not tracing (it traces the custom ops instead);
* the run's input is 2-D (what comes before the run, a Flatten say, runs as a module), each layer's in_features is
  the width reaching it, and every layer's values and bias have the input's dtype and device.

Every activation of a run has the layout the layer would give it (row-major, or feature-major as
``SparseLinear.feature_major`` and :func:`sparsecore.feature_major` say), so that what follows the run, and the bias
gradients (sums over the batch), see the same tensors bit for bit. Gradients of gradients (``create_graph=True``) are
exact: the backward pass then recomputes the run with the differentiable ops and differentiates that.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from .backend import resolve
from .nn import SparseLinear
from .ops import (_CPU_DTYPES, _TRITON_DTYPES, _autocast_dtype, _grad_layout, _is_fm, _relu_mask, _sddmm_impl,
                  _spmm_impl, _spmm_t_impl, sparse_linear)

__all__ = ["SparseSequential"]


class _Link:
    """One layer of a fused run: its pattern, whether a ReLU follows it, and what decides its output's layout: the
    C++ CSR kernels (``in_place_layouts``) return feature-major when the layer asks for it (``feature_major``) or
    its input is feature-major, exactly as :func:`~sparsecore.ops.sparse_linear` decides."""

    __slots__ = ("pattern", "relu", "feature_major", "in_place_layouts")

    def __init__(self, pattern, relu: bool, feature_major: bool, in_place_layouts: bool):
        self.pattern, self.relu = pattern, relu
        self.feature_major, self.in_place_layouts = feature_major, in_place_layouts

    def out_fm(self, x: Tensor) -> bool:
        return self.in_place_layouts and (self.feature_major or _is_fm(x))


def _has_hooks(m: nn.Module) -> bool:
    """Whether m has hooks a fused run would skip. Forward hooks marked ``sc_idle`` (the DST Updater's recording
    hooks between the steps that record) do nothing now and do not count."""
    if m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks:
        return True
    return any(not getattr(h, "sc_idle", False) for h in m._forward_hooks.values())


def _global_hooks() -> bool:
    from torch.nn.modules import module as _m

    return bool(_m._global_forward_hooks or _m._global_forward_pre_hooks or _m._global_backward_hooks
                or _m._global_backward_pre_hooks)


def _fusable_layer(m: nn.Module, x: Tensor) -> bool:
    if type(m) is not SparseLinear or _has_hooks(m):
        return False
    v, b = m.values, m.bias
    return (v.dtype == x.dtype and v.device == x.device
            and (b is None or (b.dtype == x.dtype and b.device == x.device)))


def _collect_run(mods: Sequence[nn.Module], i: int, x: Tensor) -> Tuple[List[_Link], List[Optional[Tensor]], int]:
    """The fusable run starting at mods[i]: its links, its parameters (values, bias per layer) and the index after
    it. An empty run when mods[i] cannot start one."""
    links: List[_Link] = []
    params: List[Optional[Tensor]] = []
    cpu = resolve(x.device) == "cpu"
    j, width = i, x.shape[1]
    # A layer whose in_features is not the width reaching it ends the run: called as a module, it raises its error
    # (the kernels take the width on trust).
    while j < len(mods) and _fusable_layer(mods[j], x) and mods[j].in_features == width:
        m = mods[j]
        width = m.out_features
        relu = j + 1 < len(mods) and type(mods[j + 1]) is nn.ReLU and not _has_hooks(mods[j + 1])
        p = m.pattern
        links.append(_Link(p, relu, bool(getattr(m, "feature_major", False)), cpu and p.block_size == 1))
        params += [m.values, m.bias]
        j += 2 if relu else 1
    return links, params, j


def _backend_dtype_ok(x: Tensor) -> bool:
    return x.dtype in (_CPU_DTYPES if resolve(x.device) == "cpu" else _TRITON_DTYPES)


class _RunFunction(torch.autograd.Function):
    """y = the run's layers (and ReLUs) applied in turn to x. Inputs: x, the links, then values and bias of each
    layer (bias may be None)."""

    @staticmethod
    def forward(ctx, x, links, *params):
        acts = []
        h = x
        for k, link in enumerate(links):
            p = link.pattern
            h = _spmm_impl(h, params[2 * k], params[2 * k + 1], p.rowptr, p.col, p.shape[0], p.block_size,
                           link.out_fm(h), relu=link.relu)  # the ReLU in the kernel's stores where it can
            acts.append(h)
        ctx.links = links
        # Saved for backward, so the engine frees them after it as it frees any node's: the input, the output only
        # where the run ends in a ReLU (its mask comes from it; autograd's version check then refuses an in-place
        # change of it, as nn.ReLU's saved result does; otherwise the caller may change it in place, as after a
        # SparseLinear), the hidden activations, and the parameters (for the create_graph recomputation).
        ctx.save_for_backward(x, h if links[-1].relu else None, *params, *acts[:-1])
        return h

    @staticmethod
    def backward(ctx, grad):
        links = ctx.links
        saved = ctx.saved_tensors
        x, out, params, hidden = saved[0], saved[1], saved[2:2 + 2 * len(links)], saved[2 + 2 * len(links):]
        if torch.is_grad_enabled():  # create_graph=True: differentiate the run recomputed with differentiable ops
            return _recomputed_grads(ctx, grad, x, params)
        acts = [x, *hidden]
        needs = ctx.needs_input_grad
        grads: List[Optional[Tensor]] = [None] * len(params)
        # The lowest layer whose gradients are wanted (0 when x's is): below it nothing is computed (frozen layers).
        stop = 0 if needs[0] else next((k for k in range(len(links)) if needs[2 + 2 * k] or needs[3 + 2 * k]),
                                       len(links))
        dy = grad
        for k in range(len(links) - 1, stop - 1, -1):
            link = links[k]
            p = link.pattern
            if link.relu and k == len(links) - 1:  # the ReLU's backward, from its output (> 0 where its input was);
                dy = _relu_mask(dy, out)                # inner ones: in the dX below
            dy = _grad_layout(dy, p.block_size)
            if needs[2 + 2 * k]:
                grads[2 * k] = _sddmm_impl(dy, acts[k], p.rowptr, p.col, p.block_size)
            if params[2 * k + 1] is not None and needs[3 + 2 * k]:
                grads[2 * k + 1] = dy.sum(0)
            if k == stop and not needs[0]:
                dy = None
                break
            relu_before = k > 0 and links[k - 1].relu
            dy = _spmm_t_impl(dy, params[2 * k], p.rowptr, p.colptr, p.row, p.perm, p.shape[1], p.block_size,
                              _is_fm(acts[k]), mask=acts[k] if relu_before else None)
        return (dy if needs[0] else None, None, *grads)


def _recomputed_grads(ctx, grad: Tensor, x: Tensor, params: List[Optional[Tensor]]):
    """The run's gradients as functions of x, the parameters and grad (for create_graph=True): the forward pass again
    with the differentiable ops (sparse_linear is closed under differentiation), then autograd.grad through it."""
    links, needs = ctx.links, ctx.needs_input_grad
    with torch.enable_grad():
        h = x
        for k, link in enumerate(links):
            h = sparse_linear(h, params[2 * k], link.pattern, params[2 * k + 1])
            if link.relu:
                h = torch.relu(h)
        wanted = [(0, x)] if needs[0] else []
        wanted += [(2 + i, t) for i, t in enumerate(params) if t is not None and needs[2 + i]]
        got = torch.autograd.grad(h, [t for _, t in wanted], grad, create_graph=True, allow_unused=True)
    out: List[Optional[Tensor]] = [None] * (2 + len(params))
    for (pos, t), g in zip(wanted, got):
        out[pos] = torch.zeros_like(t) if g is None else g
    return tuple(out)


class SparseSequential(nn.Sequential):
    """``nn.Sequential`` whose runs of :class:`~sparsecore.nn.SparseLinear` layers, each optionally followed by an
    ``nn.ReLU``, train through one autograd node per run (see the module docstring for when a run is fused, and
    why). Same children, same ``state_dict`` keys and the same results as ``nn.Sequential``; ``fused=False`` calls
    the modules one by one always.

    ``sparsecore.sparsify(model, ..., fuse=True)`` turns the ``nn.Sequential`` modules of a model that hold sparse
    layers into ``SparseSequential`` ones.
    """

    def __init__(self, *args, fused: bool = True):
        super().__init__(*args)
        self.fused = bool(fused)

    def _fusing(self, x) -> bool:
        # What holds for the whole call; each run checks its own input (a Flatten or an Embedding may come first).
        return (self.fused and isinstance(x, Tensor) and torch.is_grad_enabled()
                and not torch.compiler.is_compiling() and _autocast_dtype(x.device.type) is None
                and not _global_hooks())

    def forward(self, input):
        if not self._fusing(input):
            return super().forward(input)
        mods = list(self._modules.values())
        x, i = input, 0
        while i < len(mods):
            links, params, j = (_collect_run(mods, i, x)
                                if isinstance(x, Tensor) and x.dim() == 2 and _backend_dtype_ok(x) else ([], [], i))
            if links and (x.requires_grad or any(t is not None and t.requires_grad for t in params)):
                if not (x.is_contiguous() or _is_fm(x)):
                    x = x.contiguous()
                x = _RunFunction.apply(x, tuple(links), *params)
                i = j
            else:
                x = mods[i](x)
                i += 1
        return x

    def extra_repr(self) -> str:
        return "" if self.fused else "fused=False"
