"""``SparseLinear``, a drop-in for ``nn.Linear`` that stores and computes only its live connections.

The weight is ``values``: one ``nn.Parameter`` of shape ``(nnz,)`` (CSR) or ``(nnz, bs, bs)`` (BSR) in CSR order,
so any ``torch.optim`` optimizer works on it unchanged and memory is O(nnz). The structure lives in buffers
(``rowptr, col, colptr, row, perm``: see :mod:`sparsecore.pattern`), so ``.to()``, ``state_dict``, ``deepcopy``
and DDP's broadcast carry it. Forward and backward never build the dense ``(out, in)`` weight.

A compact pattern's int16 ``col``, ``row`` and ``perm`` are held as buffers of their bytes (uint8, twice as
long): torch.distributed's gloo and NCCL backends cannot broadcast int16 tensors, and DDP broadcasts every buffer
when it wraps a model. ``layer.pattern`` gives them as int16, and so does ``state_dict()``.

:func:`sparsify` swaps the ``nn.Linear`` modules of a model for ``SparseLinear`` ones; it leaves dense the linears
whose parent module computes with their ``.weight`` directly (``nn.MultiheadAttention``'s ``out_proj``), and names
them in a warning.
"""
from __future__ import annotations

import inspect
import math
import re
import warnings
from typing import Dict, Iterable, List, Optional

import torch
from torch import Tensor, nn

from .ops import sparse_linear
from .pattern import INT32_MAX, Pattern
from .topology._common import check_real, check_size

__all__ = ["SparseLinear", "sparsify", "reset_optimizer_state"]

_PATTERN_BUFFERS = ("rowptr", "col", "colptr", "row", "perm")
_TRANSPOSE_BUFFERS = ("colptr", "row", "perm")
_ENTRY_INDEX_BUFFERS = ("col", "row", "perm")  # int16 in a compact pattern
# Version of the layer's entry in a state_dict ("_extra_state"). 2: col, row and perm may be int16, perm then as
# offsets inside rows (compact patterns); sparsecore before them read such a perm as CSR positions and called the
# file damaged, and now refuses the record instead. 1 (int32 indices only) still loads.
_STATE_FORMAT = 2
_STATE_FORMATS_READ = (1, 2)


def _buffer_form(t: Tensor) -> Tensor:
    """A pattern tensor as the layer holds it: int16 (a compact pattern's entry indices) as its bytes, a uint8
    view of the same memory (see the module docstring); anything else as it is."""
    return t.view(torch.uint8) if t.dtype == torch.int16 else t


def _index_form(b: Tensor) -> Tensor:
    """The inverse of :func:`_buffer_form`: the int16 indices a uint8 buffer holds (a view, no copy)."""
    return b.view(torch.int16) if b.dtype == torch.uint8 else b


# ----------------------------------------------------------------------------------------------- argument checks
def _check_density(density) -> float:
    d = check_real("density", density)
    if not 0.0 < d <= 1.0:
        raise ValueError(f"density must be in (0, 1], got {density!r}")
    return d


def _check_layout(layout, block_size, pattern: Optional[Pattern]) -> int:
    """The block size the arguments ask for (1 = CSR); ValueError for a contradiction."""
    if layout is not None and layout not in ("csr", "bsr"):
        raise ValueError(f"layout must be 'csr' or 'bsr', got {layout!r}")
    if block_size is not None:
        block_size = check_size("block_size", block_size, minimum=1)
    if pattern is not None:
        bs = pattern.block_size
        if layout is not None and layout != ("csr" if bs == 1 else "bsr"):
            raise ValueError(f"layout={layout!r} contradicts the pattern, which is "
                             f"{'CSR' if bs == 1 else f'BSR with block size {bs}'}")
        if block_size is not None and block_size != bs:
            raise ValueError(f"block_size={block_size} contradicts the pattern's block size {bs}")
        return bs
    if layout in (None, "csr"):
        if block_size not in (None, 1):
            raise ValueError(f"block_size={block_size} goes with layout='bsr' (layout is 'csr')")
        return 1
    return 32 if block_size is None else block_size


def _check_dtype(dtype) -> None:
    if dtype is None:
        return
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"dtype must be a torch.dtype, got {type(dtype).__name__} {dtype!r}")
    if not dtype.is_floating_point:
        raise TypeError(f"SparseLinear needs a floating dtype (float32, float64, bfloat16, float16), got {dtype}")


def _check_entries(out_f: int, in_f: int, bs: int, density: float) -> None:
    """Refuse, before anything is allocated, a random pattern whose entry count overflows the int32 indices."""
    Pattern._check_shape((out_f, in_f), bs)
    entries = round(density * (out_f // bs) * (in_f // bs))
    if entries > INT32_MAX:
        raise ValueError(f"density {density} of a ({out_f}, {in_f}) layer asks for {entries:,} "
                         f"{'entries' if bs == 1 else 'blocks'}, more than the int32 indices hold (2**31 - 1)")


def _perm_offsets(pattern: Pattern) -> Tensor:
    """Each transposed entry's offset inside its row, int64 (nnz,): a compact pattern's perm, for any pattern."""
    return pattern.csr_positions() - pattern.rowptr.to(torch.int64)[pattern.row.to(torch.int64)]


def _random_pattern(out_f: int, in_f: int, density: float, block_size: int,
                    generator: Optional[torch.Generator]) -> Pattern:
    from . import topology  # topology imports nn-free modules only; lazy to keep import light

    if block_size == 1:
        return topology.uniform(out_f, in_f, density, generator=generator)
    return topology.random_blocks(out_f, in_f, density, block_size, generator=generator)


class SparseLinear(nn.Module):
    r"""Applies ``y = x W^T + b`` with a sparse ``W`` of shape ``(out_features, in_features)``.

    Args:
        in_features, out_features, bias: as ``nn.Linear`` (ints; bias a bool).
        density: fraction of live weights for a random (uniform) pattern, a real number in (0, 1]. Exclusive with
            ``pattern``.
        pattern: a :class:`~sparsecore.pattern.Pattern` of shape ``(out_features, in_features)`` (any topology).
            The layer keeps the pattern's tensors (patterns are never modified in place).
        layout: ``"csr"`` (unstructured, the default with ``density``) or ``"bsr"`` (``block_size x block_size``
            blocks). With ``pattern`` it may be omitted; given, it must agree with the pattern.
        block_size: BSR block size (default 32); must divide both dimensions; only with ``layout="bsr"``.
        device, dtype: as ``nn.Linear``; dtype must be a floating type.
        generator: ``torch.Generator`` for the random pattern.
        feature_major: return feature-major outputs (stored (out, B); see :func:`sparsecore.sparse_linear`) even
            for a row-major input. Chains of sparse layers and elementwise ops (ReLU) then never transpose; code
            that calls ``.view`` on the output needs ``.reshape`` instead. Off by default; a feature-major input
            gives a feature-major output either way.

    Shapes: input ``(*, in_features)``, output ``(*, out_features)``. Dtypes: float32/float64/bfloat16 on CPU
    (bf16 kernels with fp32 accumulation), float32/float16/bfloat16 on CUDA (Triton); under ``torch.autocast`` the layer computes in the region's dtype
    like ``nn.Linear``. Initialisation is ``nn.Linear``'s, ``U(-1/sqrt(in), 1/sqrt(in))`` for the live weights and
    the bias, so a sparsified model starts from the weights its dense twin would have had.

    State dicts: ``values``, ``bias``, the five pattern buffers and ``_extra_state`` (the shape and block size). A
    state dict of another nnz loads (the ``values`` Parameter keeps its identity and takes the new size: see
    :func:`reset_optimizer_state` for an optimizer that already holds state); so does an ``nn.Linear`` state dict
    (its ``weight`` is read at this layer's pattern). Everything is checked before anything changes, and the
    transpose index is rebuilt from ``rowptr``/``col``, never taken on trust.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, density: Optional[float] = None,
                 pattern: Optional[Pattern] = None, layout: Optional[str] = None, block_size: Optional[int] = None,
                 device=None, dtype=None, generator: Optional[torch.Generator] = None, feature_major: bool = False):
        super().__init__()
        in_f, out_f = check_size("in_features", in_features), check_size("out_features", out_features)
        if not isinstance(bias, bool):
            raise TypeError(f"bias must be a bool, got {type(bias).__name__} {bias!r}")
        if (density is None) == (pattern is None):
            raise ValueError("give exactly one of density= (a random pattern) or pattern=")
        if pattern is not None and not isinstance(pattern, Pattern):
            raise TypeError(f"pattern must be a sparsecore.Pattern, got {type(pattern).__name__}")
        bs = _check_layout(layout, block_size, pattern)
        _check_dtype(dtype)
        self.in_features, self.out_features = in_f, out_f
        if pattern is None:
            density = _check_density(density)
            _check_entries(out_f, in_f, bs, density)
            pattern = _random_pattern(out_f, in_f, density, bs, generator)
        elif pattern.shape != (out_f, in_f):
            raise ValueError(f"pattern has shape {pattern.shape}, expected (out_features, in_features) = "
                             f"{(out_f, in_f)}")
        factory = {"device": device, "dtype": dtype}
        for name, t in pattern.tensors().items():
            self.register_buffer(name, _buffer_form(t if device is None else t.to(device)))
        self.block_size = pattern.block_size
        self.values = nn.Parameter(torch.empty(pattern.values_shape, **factory))
        self.bias = nn.Parameter(torch.empty(out_f, **factory)) if bias else None
        self._warned_dense_weight = False
        if not isinstance(feature_major, bool):
            raise TypeError(f"feature_major must be a bool, got {type(feature_major).__name__}")
        self.feature_major = feature_major
        self.reset_parameters()

    def reset_parameters(self) -> None:
        bound = 1.0 / math.sqrt(self.in_features) if self.in_features > 0 else 0.0
        with torch.no_grad():
            self.values.uniform_(-bound, bound)
            if self.bias is not None:
                self.bias.uniform_(-bound, bound)

    # ------------------------------------------------------------------ structure
    @property
    def pattern(self) -> Pattern:
        """The current structure (a view on the buffers; no copy)."""
        # Read from _buffers directly: nn.Module.__getattr__ costs ~1 us per name, and this runs every forward.
        b = self._buffers
        return Pattern((self.out_features, self.in_features), self.block_size,
                       **{n: _index_form(b[n]) for n in _PATTERN_BUFFERS})

    def set_pattern(self, pattern: Pattern, values: Tensor) -> None:
        """Install a new structure and its values (CSR order). Keeps the same ``values`` Parameter object (it
        takes the new shape when nnz changes); an optimizer's state must be remapped by the caller (see
        ``sparsecore.dst``) or reset (:func:`reset_optimizer_state`)."""
        if not isinstance(pattern, Pattern):
            raise TypeError(f"pattern must be a sparsecore.Pattern, got {type(pattern).__name__}")
        if pattern.shape != (self.out_features, self.in_features) or pattern.block_size != self.block_size:
            raise ValueError("the new pattern must have the layer's shape and block size")
        if tuple(values.shape) != pattern.values_shape:
            raise ValueError(f"values must have shape {pattern.values_shape}, got {tuple(values.shape)}")
        self._install(pattern, values)

    def _install(self, pattern: Pattern, values: Tensor) -> None:
        """Commit a checked pattern and its values (nothing here can fail half-way for checked inputs)."""
        dev = self.values.device
        new_values = values.detach().to(dev, self.values.dtype)
        for name, t in pattern.tensors().items():
            setattr(self, name, _buffer_form(t.to(dev)))
        with torch.no_grad():
            if new_values.shape == self.values.shape:
                self.values.copy_(new_values)
            else:
                self.values.data = new_values.clone()
                self.values.grad = None  # a gradient of the old size cannot be accumulated into

    @property
    def nnz(self) -> int:
        """Live weights (for BSR: blocks * block_size**2)."""
        return self.values.numel()

    @property
    def density(self) -> float:
        total = self.in_features * self.out_features
        return self.nnz / total if total else 0.0

    def mask(self) -> Tensor:
        """Dense bool (out, in) map of live weights, for inspection."""
        return self.pattern.mask()

    @property
    def weight(self) -> Tensor:
        """A dense copy of W (out, in), for inspection; the layer's own forward never builds it.

        Read while autograd records (grad mode on, ``values`` requiring grad), it is built differentiably, so a
        module that computes with ``.weight`` (``nn.MultiheadAttention`` with its ``out_proj``) still trains
        ``values`` correctly, but densely: O(out * in) memory and time. The first time a gradient flows back
        through it, a warning says so (reading it for inspection never warns). Otherwise it is a detached copy."""
        if torch.is_grad_enabled() and self.values.requires_grad:
            w = self.pattern.to_dense(self.values)
            if not getattr(self, "_warned_dense_weight", False):
                w.register_hook(self._warn_dense_weight_grad)
            return w
        return self.pattern.to_dense(self.values.detach())

    def __setattr__(self, name: str, value) -> None:
        if name == "weight":  # before nn.Module's own handling, which would take a Parameter as a new parameter
            raise AttributeError("SparseLinear.weight is a dense view built from values and the pattern; it cannot "
                                 "be assigned (tying it to another module's weight is not supported). Assign values, "
                                 "or use set_pattern(pattern, values).")
        if name in _ENTRY_INDEX_BUFFERS and isinstance(value, Tensor):
            value = _buffer_form(value)
        super().__setattr__(name, value)

    def __getattr__(self, name: str):
        # layer.col / .row / .perm read as the pattern has them (int16 for a compact pattern), not as the bytes the
        # buffers hold; everything else as nn.Module finds it.
        if name in _ENTRY_INDEX_BUFFERS:
            b = self.__dict__.get("_buffers", {})
            if name in b:
                return _index_form(b[name])
        return super().__getattr__(name)

    def _warn_dense_weight_grad(self, grad: Tensor) -> None:
        if not self._warned_dense_weight:
            self._warned_dense_weight = True
            warnings.warn(f"a gradient flowed through SparseLinear({self.in_features}, {self.out_features}).weight: "
                          "a module computes with the dense (out, in) weight instead of calling the layer. The values "
                          "train correctly, but densely (O(out * in) time and memory per step), with no gain from "
                          "sparsity. sparsify() leaves such linears dense; for attention use "
                          "sparsecore.SparseMultiheadAttention.", UserWarning, stacklevel=2)

    # ------------------------------------------------------------------ conversions
    @classmethod
    def from_dense(cls, linear: nn.Linear, mask: Optional[Tensor] = None, density: Optional[float] = None,
                   layout: Optional[str] = None, block_size: Optional[int] = None) -> "SparseLinear":
        """A SparseLinear with ``linear``'s weights at ``mask`` (bool (out, in)), or at the largest-magnitude
        ``density`` fraction of weights (of blocks, by L2 norm, for BSR)."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be an nn.Linear, got {type(linear).__name__}")
        if (mask is None) == (density is None):
            raise ValueError("give exactly one of mask= or density=")
        w = linear.weight.detach()
        bs = _check_layout(layout, block_size, None)
        if mask is not None:
            if tuple(mask.shape) != tuple(w.shape):
                raise ValueError(f"mask must have the weight's shape {tuple(w.shape)}, got {tuple(mask.shape)}")
            pattern = Pattern.from_mask(mask.to(w.device), block_size=bs)
        else:
            density = _check_density(density)
            Pattern._check_shape(tuple(w.shape), bs)
            score = w.abs() if bs == 1 else w.reshape(w.shape[0] // bs, bs, -1, bs).pow(2).sum((1, 3))
            k = max(1, round(density * score.numel()))
            idx = torch.topk(score.flatten().float(), k, sorted=False).indices
            n_c = score.shape[1]
            pattern = Pattern.from_indices(idx // n_c, idx % n_c, tuple(w.shape), block_size=bs)
        layer = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, pattern=pattern,
                    device=w.device, dtype=w.dtype)
        with torch.no_grad():
            layer.values.copy_(layer.pattern.gather(w))
            if linear.bias is not None:
                layer.bias.copy_(linear.bias)
        return layer

    def to_dense(self) -> nn.Linear:
        """An ``nn.Linear`` computing the same function."""
        lin = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                        device=self.values.device, dtype=self.values.dtype)
        with torch.no_grad():
            lin.weight.copy_(self.weight)
            if self.bias is not None:
                lin.bias.copy_(self.bias)
        return lin

    # ------------------------------------------------------------------ module plumbing
    def forward(self, input: Tensor) -> Tensor:
        return sparse_linear(input, self.values, self.pattern, self.bias,
                             feature_major=getattr(self, "feature_major", False))

    def get_extra_state(self) -> Tensor:
        """The layer's record in a state dict: int64 ``[format, out_features, in_features, block_size]``, a tensor
        so that every state-dict entry is one (safetensors, checkpoint averaging and ``.to()`` loops expect it)."""
        return torch.tensor([_STATE_FORMAT, self.out_features, self.in_features, self.block_size], dtype=torch.int64)

    def set_extra_state(self, state) -> None:  # checked and applied by _load_from_state_dict
        pass

    def _save_to_state_dict(self, destination, prefix, keep_vars) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        for name in _PATTERN_BUFFERS:  # a compact pattern's indices as int16, not as the bytes the buffers hold
            key = prefix + name
            if key in destination:
                destination[key] = _index_form(destination[key])

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        """Validate everything this layer would take from ``state_dict``, then commit it (or change nothing and
        report every problem in ``error_msgs``, which ``load_state_dict`` raises as one RuntimeError)."""
        for hook in self._load_state_dict_pre_hooks.values():
            hook(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)
        own = ("values", "bias", *_PATTERN_BUFFERS, "_extra_state")
        got = {n: state_dict[prefix + n] for n in own + ("weight",) if prefix + n in state_dict}
        dense_form = "weight" in got and "values" not in got and "rowptr" not in got
        if strict:
            for key in state_dict:
                if key.startswith(prefix):
                    name = key[len(prefix):]
                    if name not in own and not (name == "weight" and dense_form):
                        unexpected_keys.append(key)
        missing: List[str] = []
        errors: List[str] = []
        try:
            plan = self._plan_load(got, prefix, missing, errors)
        except (ValueError, TypeError, RuntimeError) as e:  # a malformed tensor of any kind
            errors.append(f"{type(e).__name__}: {e}")
            plan = None
        if strict:
            missing_keys.extend(missing)
        if errors or plan is None:
            error_msgs.extend(f"while loading {prefix or 'the layer'} (SparseLinear, left unchanged): {e}"
                              for e in errors)
            return
        pattern, values, bias, note = plan
        if note:
            warnings.warn(note, UserWarning, stacklevel=4)
        assign = bool(local_metadata.get("assign_to_params_buffers", False))
        if values is not None:
            if assign:  # load_state_dict(assign=True): take the checkpoint's tensors (e.g. onto a meta-device model)
                dev = values.device
                for name, t in pattern.tensors().items():
                    setattr(self, name, _buffer_form(t.to(dev)))
                self.values = nn.Parameter(values.detach(), requires_grad=self.values.requires_grad)
            else:
                self._install(pattern, values)
        if bias is not None:
            if assign:
                self.bias = nn.Parameter(bias.detach(), requires_grad=self.bias.requires_grad)
            else:
                with torch.no_grad():
                    self.bias.copy_(bias)

    def _plan_load(self, got: Dict[str, Tensor], prefix: str, missing_keys: list, errors: List[str]):
        """(pattern, values, bias, warning) to install, after every check; problems go to ``errors``."""
        shape, bs = (self.out_features, self.in_features), self.block_size
        meta = got.get("_extra_state")
        if meta is not None:
            rec = meta.tolist() if (isinstance(meta, Tensor) and meta.dim() == 1 and meta.numel() == 4
                                    and meta.dtype == torch.int64) else None
            if rec is None or rec[0] not in _STATE_FORMATS_READ:
                errors.append(f"{prefix}_extra_state is not a SparseLinear record this version reads (formats "
                              f"{_STATE_FORMATS_READ}: [format, out, in, block_size]; a newer sparsecore may have "
                              f"written it): {meta!r}")
            elif (rec[1], rec[2]) != shape or rec[3] != bs:
                errors.append(f"size mismatch: the checkpoint holds a SparseLinear of shape (out, in) = "
                              f"{(rec[1], rec[2])} with block size {rec[3]}, this layer is {shape} with block size {bs}")
        for name, t in got.items():
            if not isinstance(t, Tensor):
                errors.append(f"{prefix}{name} is a {type(t).__name__}, not a tensor")
        if errors:
            return None

        bias = got.get("bias")
        if self.bias is None:
            if bias is not None:
                errors.append(f"the checkpoint has a bias ({prefix}bias) but this layer was built with bias=False")
        elif bias is None:
            missing_keys.append(prefix + "bias")
        elif tuple(bias.shape) != (self.out_features,):
            errors.append(f"size mismatch for {prefix}bias: copying a tensor of shape {tuple(bias.shape)}, this layer "
                          f"has ({self.out_features},)")
        if bias is not None and not bias.is_floating_point():
            errors.append(f"{prefix}bias has dtype {bias.dtype}, not a floating type")

        note = None
        if "values" not in got and "weight" in got and "rowptr" not in got:
            # an nn.Linear's state dict: its weight, read at this layer's pattern
            w = got["weight"]
            if tuple(w.shape) != shape:
                errors.append(f"size mismatch for {prefix}weight: copying a dense weight of shape {tuple(w.shape)}, "
                              f"this layer is {shape}")
                return None
            if not w.is_floating_point():
                errors.append(f"{prefix}weight has dtype {w.dtype}, not a floating type")
                return None
            pattern = self.pattern
            values = pattern.to(w.device).gather(w.detach())
            total = w.detach().double().pow(2).sum()
            kept = values.double().pow(2).sum() / total if total > 0 else torch.tensor(1.0)
            note = (f"{prefix or 'SparseLinear'}: loaded a dense nn.Linear weight at this layer's pattern: kept "
                    f"{pattern.n_weights:,} of {shape[0] * shape[1]:,} weights ({100 * float(kept):.1f}% of its "
                    f"squared norm), dropped the rest. To choose the pattern from the weights, use "
                    f"SparseLinear.from_dense or sparsify(method='magnitude').")
            return pattern, values, bias, note

        if "rowptr" in got or "col" in got:
            if "rowptr" not in got or "col" not in got:
                errors.append(f"{prefix}rowptr and {prefix}col come together: the checkpoint has only "
                              f"{'rowptr' if 'rowptr' in got else 'col'}")
                return None
            pattern = Pattern.from_csr(got["rowptr"], got["col"], shape, bs)  # checks sizes, order, ranges
            rebuilt = pattern.tensors()
            for name in _TRANSPOSE_BUFFERS:  # never trusted: rebuilt, and a stored copy must agree
                t = got.get(name)
                if t is None:
                    missing_keys.append(prefix + name)
                    continue
                if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
                    errors.append(f"{prefix}{name} must be an integer tensor, got {t.dtype}")
                    continue
                want = rebuilt[name].to(torch.int64)
                if name == "perm" and t.dtype != rebuilt[name].dtype:  # the checkpoint's form is not the layer's:
                    # int16 holds offsets inside rows (a compact pattern), int32 CSR positions
                    want = _perm_offsets(pattern) if t.dtype == torch.int16 else pattern.csr_positions()
                if tuple(t.shape) != tuple(want.shape) or not torch.equal(t.detach().to("cpu", torch.int64), want):
                    errors.append(f"{prefix}{name} is not the transpose index of {prefix}rowptr/{prefix}col: the "
                                  f"checkpoint is damaged or was edited")
        else:
            pattern = self.pattern
            missing_keys.extend(prefix + n for n in _PATTERN_BUFFERS)
        values = got.get("values")
        if values is None:
            missing_keys.append(prefix + "values")
            if pattern.nnz != self.pattern.nnz or pattern != self.pattern:
                errors.append(f"the checkpoint has a pattern but no {prefix}values to go with it")
            return None if errors else (pattern, None, bias, None)
        if tuple(values.shape) != pattern.values_shape:
            errors.append(f"size mismatch for {prefix}values: copying a tensor of shape {tuple(values.shape)}, its "
                          f"pattern needs {pattern.values_shape}")
        elif not values.is_floating_point():
            errors.append(f"{prefix}values has dtype {values.dtype}, not a floating type")
        return None if errors else (pattern, values, bias, note)

    def extra_repr(self) -> str:
        layout = "csr" if self.block_size == 1 else f"bsr, block_size={self.block_size}"
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"nnz={self.nnz}, density={self.density:.4g}, layout={layout}")


def reset_optimizer_state(optimizer: torch.optim.Optimizer, model_or_layers) -> int:
    """Forget ``optimizer``'s state (momenta, Adam moments and step) of the ``values`` of every
    :class:`SparseLinear` in ``model_or_layers`` (a module or an iterable of SparseLinear); returns how many.

    Call it after loading a state dict of another topology into a model whose optimizer already holds state,
    when you do not load the optimizer's state from the same checkpoint: old momenta belong to old connections
    (of another size, when nnz changed, which makes the next ``step()`` fail). A checkpoint resume that loads
    the optimizer's state right after the model's needs nothing.
    """
    if isinstance(model_or_layers, nn.Module):
        layers = [m for m in model_or_layers.modules() if isinstance(m, SparseLinear)]
    else:
        layers = list(model_or_layers)
        for m in layers:
            if not isinstance(m, SparseLinear):
                raise TypeError(f"expected SparseLinear modules, got {type(m).__name__}")
    n = 0
    for m in layers:
        if optimizer.state.pop(m.values, None) is not None:
            n += 1
    return n


# ----------------------------------------------------------------------------------------------- sparsify
# Parent modules that compute with a child linear's .weight directly (a SparseLinear there is densified on
# every call), found by reading the class's source for "self.<child>.weight"; and reads that happen only on an
# inference fast path that never records gradients, where the detached dense copy is correct.
_INFERENCE_ONLY_WEIGHT_READS = {nn.TransformerEncoderLayer: ("linear1", "linear2")}
_SOURCE_CACHE: Dict[type, str] = {}


def _class_source(cls: type) -> str:
    if cls not in _SOURCE_CACHE:
        parts = []
        for klass in cls.__mro__:
            if klass in (nn.Module, object):
                break
            try:
                parts.append(inspect.getsource(klass))
            except (OSError, TypeError):  # built in, or defined where there is no source
                pass
        _SOURCE_CACHE[cls] = "\n".join(parts)
    return _SOURCE_CACHE[cls]


def _reads_weight(parent: nn.Module, child_name: str) -> bool:
    if child_name in _INFERENCE_ONLY_WEIGHT_READS.get(type(parent), ()):
        return False
    return re.search(rf"\bself\.{re.escape(child_name)}\.weight\b", _class_source(type(parent))) is not None


def _weight_read_linears(model: nn.Module) -> Dict[str, str]:
    """{name of an nn.Linear: its parent's class name} for the linears whose parent reads ``.weight``."""
    found = {}
    for pname, parent in model.named_modules():
        for cname, child in parent.named_children():
            if isinstance(child, nn.Linear) and _reads_weight(parent, cname):
                found[f"{pname}.{cname}" if pname else cname] = type(parent).__name__
    return found


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    *path, leaf = name.split(".")
    parent = model
    for part in path:
        parent = getattr(parent, part)
    setattr(parent, leaf, new)


def sparsify(model: nn.Module, density: Optional[float] = None, *, method: str = "uniform",
             epsilon: Optional[float] = None, skip: Iterable = (), layout: Optional[str] = None,
             block_size: Optional[int] = None, attention: str = "dense",
             generator: Optional[torch.Generator] = None, fuse: bool = True) -> nn.Module:
    """Replace every ``nn.Linear`` of ``model`` (in place) by a :class:`SparseLinear`; returns ``model``.

    method: ``"uniform"`` (random, ``density``), ``"er"`` (Erdos-Renyi, ``epsilon``: epsilon*(in+out)
    connections), ``"erk"`` (ERK densities across the layers, overall ``density``), or ``"magnitude"`` (keep the
    largest ``density`` fraction of the existing weights). The kept weights and biases are the dense ones.
    skip: module names (as in ``named_modules``; each must exist) or module types to leave dense.
    attention: what becomes of ``nn.MultiheadAttention``, which computes with its ``out_proj.weight`` directly:
    ``"dense"`` (default) leaves the whole block dense, and a warning names the linears so skipped;
    ``"sparse"`` replaces it by :class:`sparsecore.SparseMultiheadAttention` with its weights (q, k, v and out
    projections sparse by ``method``). Any other parent module whose code reads ``self.<child>.weight`` keeps that
    child dense, with the same warning.
    fuse: every plain ``nn.Sequential`` that then holds a SparseLinear becomes a
    :class:`sparsecore.SparseSequential` (the same object, children, ``state_dict`` keys and results), which trains
    each run of ``SparseLinear -> ReLU -> ... -> SparseLinear`` through one autograd node: on small layers a step is
    mostly per-layer fixed costs (see :mod:`sparsecore.chain`). ``fuse=False`` leaves the containers as they are.
    """
    from . import topology
    from .attention import SparseMultiheadAttention

    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if method not in ("uniform", "er", "erk", "magnitude"):
        raise ValueError(f"method must be 'uniform', 'er', 'erk' or 'magnitude', got {method!r}")
    if attention not in ("dense", "sparse"):
        raise ValueError(f"attention must be 'dense' or 'sparse', got {attention!r}")
    if not isinstance(fuse, bool):
        raise TypeError(f"fuse must be True or False, got {fuse!r}")
    if method == "er":
        if epsilon is None:
            raise ValueError("method='er' needs epsilon=")
        if density is not None:
            raise ValueError("method='er' takes epsilon=, not density=")
        epsilon = check_real("epsilon", epsilon)
        if epsilon <= 0:
            raise ValueError(f"epsilon must be > 0, got {epsilon}")
    else:
        if density is None:
            raise ValueError(f"method={method!r} needs density=")
        if epsilon is not None:
            raise ValueError(f"method={method!r} takes density=, not epsilon=")
        density = _check_density(density)
    bs = _check_layout(layout, block_size, None)
    if method == "er" and bs != 1:
        raise ValueError("method='er' is unstructured: use layout='csr'")
    skip = list(skip)
    for s in skip:
        if not isinstance(s, (str, type)):
            raise TypeError(f"skip takes module names or module types, got {type(s).__name__} {s!r}")
    names = dict(model.named_modules())
    unknown = [s for s in skip if isinstance(s, str) and s not in names]
    if unknown:
        raise ValueError(f"skip names modules the model does not have: {unknown} (names as in named_modules())")
    skip_names = {s for s in skip if isinstance(s, str)}
    skip_types = tuple(s for s in skip if isinstance(s, type))

    def skipped(name: str, m: nn.Module) -> bool:
        return name in skip_names or bool(skip_types and isinstance(m, skip_types))

    if isinstance(model, nn.Linear):
        if skipped("", model):
            return model
        return _sparse_from(model, method, density, epsilon, bs, generator)

    # attention blocks first: with attention="sparse" their projections become sparse with the block
    if attention == "sparse":
        mhas = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.MultiheadAttention) and not skipped(n, m)]
        kw = dict(method=method, density=density, epsilon=epsilon, layout="csr" if bs == 1 else "bsr",
                  block_size=None if bs == 1 else bs, generator=generator)
        for name, mha in mhas:
            if name == "":
                return SparseMultiheadAttention.from_dense(mha, **kw)
            _replace(model, name, SparseMultiheadAttention.from_dense(mha, **kw))
        for m in model.modules():  # its fused inference fast path needs nn.MultiheadAttention's packed weights
            if isinstance(m, nn.TransformerEncoder) and any(isinstance(l.self_attn, SparseMultiheadAttention)
                                                            for l in m.layers):
                m.use_nested_tensor = False
    read = _weight_read_linears(model)
    left_dense = sorted(n for n in read if not skipped(n, names.get(n, model)))
    targets = [(name, m) for name, m in model.named_modules()
               if isinstance(m, nn.Linear) and not skipped(name, m) and name not in read]
    if left_dense:
        where = ", ".join(f"{n} (in {read[n]})" for n in left_dense)
        hint = (" Pass attention='sparse' to replace nn.MultiheadAttention by sparsecore.SparseMultiheadAttention."
                if any(read[n] == "MultiheadAttention" for n in left_dense) else "")
        warnings.warn(f"sparsify left {len(left_dense)} nn.Linear dense because their parent module computes with "
                      f".weight directly (a SparseLinear there would be densified on every call): {where}.{hint}",
                      UserWarning, stacklevel=2)
    densities: List[Optional[float]] = [density] * len(targets)
    if method == "erk":
        densities = topology.erk_densities([(m.out_features, m.in_features) for _, m in targets], density)
    for (name, lin), d in zip(targets, densities):
        _replace(model, name, _sparse_from(lin, method, d, epsilon, bs, generator))
    if fuse:
        _fuse_sequentials(model)
    return model


def _fuse_sequentials(model: nn.Module) -> None:
    """Make every plain ``nn.Sequential`` of ``model`` with a SparseLinear child a SparseSequential, in place: the
    object's class is swapped (as ``torch.nn.utils.parametrize`` does), so references to it, its hooks and its
    attributes stay valid."""
    from .chain import SparseSequential

    for m in model.modules():
        if type(m) is nn.Sequential and any(isinstance(c, SparseLinear) for c in m.children()):
            m.__class__ = SparseSequential
            m.fused = True


def _sparse_from(lin: nn.Linear, method: str, density: Optional[float], epsilon: Optional[float], bs: int,
                 generator) -> SparseLinear:
    """A SparseLinear holding ``lin``'s weights at a pattern chosen by ``method``."""
    from . import topology

    if method == "magnitude":
        return SparseLinear.from_dense(lin, density=density, layout="csr" if bs == 1 else "bsr",
                                       block_size=None if bs == 1 else bs)
    if method == "er":
        p = topology.erdos_renyi(lin.out_features, lin.in_features, epsilon, generator=generator)
    else:
        _check_entries(lin.out_features, lin.in_features, bs, density)
        p = _random_pattern(lin.out_features, lin.in_features, density, bs, generator)
    new = SparseLinear(lin.in_features, lin.out_features, bias=lin.bias is not None, pattern=p,
                       device=lin.weight.device, dtype=lin.weight.dtype)
    with torch.no_grad():
        new.values.copy_(p.to(lin.weight.device).gather(lin.weight.detach()))
        if lin.bias is not None:
            new.bias.copy_(lin.bias)
    return new
