"""``SparseLinear``, a drop-in for ``nn.Linear`` that stores and computes only its live connections.

The weight is ``values``: one ``nn.Parameter`` of shape ``(nnz,)`` (CSR) or ``(nnz, bs, bs)`` (BSR) in CSR order,
so any ``torch.optim`` optimizer works on it unchanged and memory is O(nnz). The structure lives in int32
buffers (``rowptr, col, colptr, row, perm``: see :mod:`sparsecore.pattern`), so ``.to()``, ``state_dict`` and
``deepcopy`` carry it. Forward and backward never build the dense ``(out, in)`` weight.
"""
from __future__ import annotations

import math
from typing import Iterable, Optional

import torch
from torch import Tensor, nn

from .ops import sparse_linear
from .pattern import Pattern

__all__ = ["SparseLinear", "sparsify"]

_PATTERN_BUFFERS = ("rowptr", "col", "colptr", "row", "perm")


def _random_pattern(out_f: int, in_f: int, density: float, layout: str, block_size: int,
                    generator: Optional[torch.Generator]) -> Pattern:
    from . import topology  # topology imports nn-free modules only; lazy to keep import light

    if layout == "csr":
        return topology.uniform(out_f, in_f, density, generator=generator)
    return topology.random_blocks(out_f, in_f, density, block_size, generator=generator)


class SparseLinear(nn.Module):
    r"""Applies ``y = x W^T + b`` with a sparse ``W`` of shape ``(out_features, in_features)``.

    Args:
        in_features, out_features, bias: as ``nn.Linear``.
        density: fraction of live weights for a random (uniform) pattern, in (0, 1]. Exclusive with ``pattern``.
        pattern: a :class:`~sparsecore.pattern.Pattern` of shape ``(out_features, in_features)`` (any topology).
        layout: ``"csr"`` (unstructured) or ``"bsr"`` (``block_size x block_size`` blocks) for ``density``.
        block_size: BSR block size; must divide both dimensions.
        generator: ``torch.Generator`` for the random pattern.

    Shapes: input ``(*, in_features)``, output ``(*, out_features)``; float32, float64 or bfloat16 on CPU
    (``layer.to(torch.bfloat16)``: bf16 kernels with fp32 accumulation), float32, float16 or bfloat16 with the
    Triton kernels on CUDA. Initialisation is ``nn.Linear``'s, ``U(-1/sqrt(in), 1/sqrt(in))`` for the
    live weights and the bias, so a sparsified model starts from the weights its dense twin would have had.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, density: Optional[float] = None,
                 pattern: Optional[Pattern] = None, layout: str = "csr", block_size: Optional[int] = None,
                 device=None, dtype=None, generator: Optional[torch.Generator] = None):
        super().__init__()
        if (density is None) == (pattern is None):
            raise ValueError("give exactly one of density= (a random pattern) or pattern=")
        if layout not in ("csr", "bsr"):
            raise ValueError(f"layout must be 'csr' or 'bsr', got {layout!r}")
        self.in_features, self.out_features = int(in_features), int(out_features)
        if pattern is None:
            if not (isinstance(density, (int, float)) and 0 < density <= 1):
                raise ValueError(f"density must be in (0, 1], got {density!r}")
            bs = 1 if layout == "csr" else (block_size or 32)
            pattern = _random_pattern(self.out_features, self.in_features, float(density), layout, bs, generator)
        elif not isinstance(pattern, Pattern):
            raise TypeError(f"pattern must be a sparsecore.Pattern, got {type(pattern).__name__}")
        if pattern.shape != (self.out_features, self.in_features):
            raise ValueError(f"pattern has shape {pattern.shape}, expected (out_features, in_features) = "
                             f"{(self.out_features, self.in_features)}")
        factory = {"device": device, "dtype": dtype}
        for name, t in pattern.tensors().items():
            self.register_buffer(name, t.to(device) if device is not None else t.clone())
        self.block_size = pattern.block_size
        self.values = nn.Parameter(torch.empty(pattern.values_shape, **factory))
        self.bias = nn.Parameter(torch.empty(self.out_features, **factory)) if bias else None
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
                       **{n: b[n] for n in _PATTERN_BUFFERS})

    def set_pattern(self, pattern: Pattern, values: Tensor) -> None:
        """Install a new structure and its values (CSR order). Keeps the same ``values`` Parameter object when
        nnz is unchanged; an optimizer's state must be remapped by the caller (see ``sparsecore.dst``)."""
        if pattern.shape != (self.out_features, self.in_features) or pattern.block_size != self.block_size:
            raise ValueError("the new pattern must have the layer's shape and block size")
        if tuple(values.shape) != pattern.values_shape:
            raise ValueError(f"values must have shape {pattern.values_shape}, got {tuple(values.shape)}")
        dev = self.values.device
        for name, t in pattern.tensors().items():
            setattr(self, name, t.to(dev))
        with torch.no_grad():
            if values.shape == self.values.shape:
                self.values.copy_(values)
            else:
                self.values.data = values.detach().to(dev, self.values.dtype).clone()

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
        """A read-only dense copy of W (out, in), for inspection; never used in the training step."""
        return self.pattern.to_dense(self.values.detach())

    # ------------------------------------------------------------------ conversions
    @classmethod
    def from_dense(cls, linear: nn.Linear, mask: Optional[Tensor] = None, density: Optional[float] = None,
                   layout: str = "csr", block_size: Optional[int] = None) -> "SparseLinear":
        """A SparseLinear with ``linear``'s weights at ``mask`` (bool (out, in)), or at the largest-magnitude
        ``density`` fraction of weights (of blocks, by L2 norm, for BSR)."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be an nn.Linear, got {type(linear).__name__}")
        if (mask is None) == (density is None):
            raise ValueError("give exactly one of mask= or density=")
        w = linear.weight.detach()
        bs = 1 if layout == "csr" else (block_size or 32)
        if layout not in ("csr", "bsr"):
            raise ValueError(f"layout must be 'csr' or 'bsr', got {layout!r}")
        if mask is not None:
            if tuple(mask.shape) != tuple(w.shape):
                raise ValueError(f"mask must have the weight's shape {tuple(w.shape)}, got {tuple(mask.shape)}")
            pattern = Pattern.from_mask(mask.to(w.device), block_size=bs)
        else:
            if not (0 < density <= 1):
                raise ValueError(f"density must be in (0, 1], got {density}")
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
        return sparse_linear(input, self.values, self.pattern, self.bias)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # A checkpoint may hold a different topology (nnz differs after pruning): resize before the copy.
        for name in _PATTERN_BUFFERS:
            t = state_dict.get(prefix + name)
            if isinstance(t, Tensor) and t.shape != getattr(self, name).shape:
                setattr(self, name, torch.empty_like(t, device=getattr(self, name).device))
        v = state_dict.get(prefix + "values")
        if isinstance(v, Tensor) and v.shape != self.values.shape:
            self.values.data = torch.empty(v.shape, dtype=self.values.dtype, device=self.values.device)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        if not error_msgs and all(isinstance(state_dict.get(prefix + n), Tensor) for n in ("rowptr", "col")):
            Pattern.from_csr(self.rowptr, self.col, (self.out_features, self.in_features), self.block_size)

    def extra_repr(self) -> str:
        layout = "csr" if self.block_size == 1 else f"bsr, block_size={self.block_size}"
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"nnz={self.nnz}, density={self.density:.4g}, layout={layout}")


def sparsify(model: nn.Module, density: Optional[float] = None, *, method: str = "uniform",
             epsilon: Optional[float] = None, skip: Iterable = (), layout: str = "csr",
             block_size: Optional[int] = None, generator: Optional[torch.Generator] = None) -> nn.Module:
    """Replace every ``nn.Linear`` of ``model`` (in place) by a :class:`SparseLinear`; returns ``model``.

    method: ``"uniform"`` (random, ``density``), ``"er"`` (Erdos-Renyi, ``epsilon``: epsilon*(in+out)
    connections), ``"erk"`` (ERK densities across the layers, overall ``density``), or ``"magnitude"`` (keep the
    largest ``density`` fraction of the existing weights). The kept weights and biases are the dense ones.
    skip: module names (as in ``named_modules``) or module types to leave dense.
    """
    from . import topology

    if method not in ("uniform", "er", "erk", "magnitude"):
        raise ValueError(f"method must be 'uniform', 'er', 'erk' or 'magnitude', got {method!r}")
    if method == "er" and epsilon is None:
        raise ValueError("method='er' needs epsilon=")
    if method != "er" and density is None:
        raise ValueError(f"method={method!r} needs density=")
    skip = list(skip)
    skip_names = {s for s in skip if isinstance(s, str)}
    skip_types = tuple(s for s in skip if isinstance(s, type))
    targets = [(name, m) for name, m in model.named_modules()
               if isinstance(m, nn.Linear) and name not in skip_names and not (skip_types and isinstance(m, skip_types))]
    densities = [density] * len(targets)
    if method == "erk":
        densities = topology.erk_densities([(m.out_features, m.in_features) for _, m in targets], density)
    bs = 1 if layout == "csr" else (block_size or 32)
    for (name, lin), d in zip(targets, densities):
        if method == "magnitude":
            new = SparseLinear.from_dense(lin, density=d, layout=layout, block_size=bs)
        else:
            if method == "er":
                if layout != "csr":
                    raise ValueError("method='er' is unstructured: use layout='csr'")
                p = topology.erdos_renyi(lin.out_features, lin.in_features, epsilon, generator=generator)
            else:
                p = _random_pattern(lin.out_features, lin.in_features, d, layout, bs, generator)
            new = SparseLinear(lin.in_features, lin.out_features, bias=lin.bias is not None, pattern=p,
                               device=lin.weight.device, dtype=lin.weight.dtype)
            with torch.no_grad():
                new.values.copy_(p.to(lin.weight.device).gather(lin.weight.detach()))
                if lin.bias is not None:
                    new.bias.copy_(lin.bias)
        parent = model
        *path, leaf = name.split(".") if name else [""]
        for part in path:
            parent = getattr(parent, part)
        if name == "":
            return new  # the model itself is a Linear
        setattr(parent, leaf, new)
    return model
