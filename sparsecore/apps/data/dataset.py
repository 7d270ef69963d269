"""The :class:`Dataset` every reader returns, and how one is made: seeded stratified splits and normalisation
fitted on the training part (see :mod:`sparsecore.apps.data`)."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

__all__ = ["Dataset", "stratified_split", "assemble", "split_all", "check_fraction"]


@dataclass(repr=False)
class Dataset:
    """A split, normalised classification dataset (see the module docstring for how it is made).

    ``x_*`` are float32 ``(n, n_features)`` tensors, ``y_*`` int64 ``(n,)`` labels in ``0..n_classes-1``;
    ``x_val``/``y_val`` are empty (0 rows) when ``val_fraction == 0``. ``input_shape`` is the layout of one
    sample's features, ``(H, W, C)`` channels-last for images (feature ``(h * W + w) * C + c``) or
    ``(n_features,)`` for tabular data. ``split_info`` is a JSON-serialisable record of the split and the
    normalisation, for reports. ``classes[k]`` is the original label (or class name) of label ``k``.
    ``mean``/``std`` are the ``(n_features,)`` normalisation: ``x = (x_raw - mean) / std``.
    """

    x_train: torch.Tensor
    x_val: torch.Tensor
    x_test: torch.Tensor
    y_train: torch.Tensor
    y_val: torch.Tensor
    y_test: torch.Tensor
    n_features: int
    n_classes: int
    input_shape: Tuple[int, ...]
    name: str
    split_info: Dict[str, Any] = field(default_factory=dict)
    classes: Tuple[Any, ...] = ()
    mean: Optional[torch.Tensor] = None
    std: Optional[torch.Tensor] = None

    @property
    def n_train(self) -> int:
        return int(self.y_train.shape[0])

    @property
    def n_val(self) -> int:
        return int(self.y_val.shape[0])

    @property
    def n_test(self) -> int:
        return int(self.y_test.shape[0])

    def to(self, device) -> "Dataset":
        """A copy with every tensor moved to ``device``."""
        kw = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        for k, v in kw.items():
            if isinstance(v, torch.Tensor):
                kw[k] = v.to(device)
        return Dataset(**kw)

    def __repr__(self) -> str:
        return (f"Dataset(name={self.name!r}, train={self.n_train}, val={self.n_val}, test={self.n_test}, "
                f"n_features={self.n_features}, n_classes={self.n_classes}, input_shape={self.input_shape}, "
                f"normalization={self.split_info.get('normalization', {}).get('kind')!r})")




def _rng(seed: int, stream: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([int(seed) & 0xFFFFFFFF, stream])))


def check_fraction(name: str, f: float) -> float:
    try:
        f = float(f)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a number in [0, 1), got {f!r}") from None
    if not (0.0 <= f < 1.0):
        raise ValueError(f"{name} must be in [0, 1), got {f}")
    return f


def stratified_split(y, fraction: float, seed: int = 0, *, stream: int = 0) -> Tuple[np.ndarray, np.ndarray]:
    """Split sample indices into ``(keep, held_out)``, both sorted int64 arrays.

    ``held_out`` has exactly ``round(fraction * n)`` samples (half rounds up), spread over the classes in
    proportion to their sizes (largest remainders; ties go to the lower label). Which samples of a class are
    held out is a seeded random choice (``seed`` and ``stream`` select an independent PCG64 stream).
    """
    fraction = check_fraction("fraction", fraction)
    y = np.asarray(y).ravel()
    n = y.shape[0]
    k = int(math.floor(fraction * n + 0.5))
    if k == 0:
        return np.arange(n, dtype=np.int64), np.zeros(0, dtype=np.int64)
    u = _rng(seed, stream).random(n)
    labels, inv, counts = np.unique(y, return_inverse=True, return_counts=True)
    quota = fraction * counts
    take = np.floor(quota).astype(np.int64)
    extra = k - int(take.sum())
    if extra > 0:
        order = np.argsort(-(quota - take), kind="stable")
        take[order[:extra]] += 1
    take = np.minimum(take, counts)
    held = np.zeros(n, dtype=bool)
    order = np.lexsort((u, inv))  # grouped by class, random order within a class
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    for c in range(len(labels)):
        held[order[starts[c]:starts[c] + take[c]]] = True
    return np.flatnonzero(~held).astype(np.int64), np.flatnonzero(held).astype(np.int64)



_CHUNK = 8192


def _moments(x: torch.Tensor, per_feature: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """Mean and (population) std, two passes over row chunks: each chunk is summed in the data's precision
    (torch's pairwise summation), the chunk sums are accumulated in float64; no full float64 copy."""
    n = x.shape[0]
    shape = (x.shape[1],) if per_feature else ()
    s = torch.zeros(shape, dtype=torch.float64)
    for c in x.split(_CHUNK):
        s += (c.sum(dim=0) if per_feature else c.sum()).double()
    count = n if per_feature else n * x.shape[1]
    mean = s / max(count, 1)
    ss = torch.zeros(shape, dtype=torch.float64)
    m32 = mean.to(x.dtype)
    for c in x.split(_CHUNK):
        d = c - m32
        ss += ((d * d).sum(dim=0) if per_feature else (d * d).sum()).double()
    std = (ss / max(count, 1)).sqrt()
    return mean, std


def _fit_normalization(x_train: torch.Tensor, kind: str) -> Tuple[torch.Tensor, torch.Tensor, Dict[str, Any]]:
    f = x_train.shape[1]
    if kind == "none" or x_train.shape[0] == 0:
        info = {"kind": "none" if kind == "none" else f"{kind} (no training samples: none)"}
        return torch.zeros(f, dtype=torch.float32), torch.ones(f, dtype=torch.float32), info
    if kind == "minmax":  # per feature to [0, 1] on the training part (CTRE's reference scaling)
        lo, hi = x_train.min(dim=0).values.double(), x_train.max(dim=0).values.double()
        span = hi - lo
        const = ~(span > 1e-7 * (1.0 + lo.abs()))
        span = torch.where(const, torch.ones_like(span), span)
        info = {"kind": "minmax", "fitted_on": "train", "n_constant_features": int(const.sum())}
        return lo.to(torch.float32).contiguous(), span.to(torch.float32).contiguous(), info
    mean, std = _moments(x_train, per_feature=(kind == "feature"))
    const = ~(std > 1e-7 * (1.0 + mean.abs()))  # also catches NaN
    std = torch.where(const, torch.ones_like(std), std)
    info: Dict[str, Any] = {"kind": kind, "fitted_on": "train"}
    if kind == "global":
        info.update(mean=float(mean), std=float(std), constant=bool(const))
        mean, std = mean.expand(f), std.expand(f)
    else:
        info["n_constant_features"] = int(const.sum())
    return mean.to(torch.float32).contiguous(), std.to(torch.float32).contiguous(), info


def _apply_normalization(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    return x.sub_(mean).div_(std)




def _to_float(x: np.ndarray, scale: Optional[float]) -> torch.Tensor:
    """(n, ...) array -> float32 (n, features) tensor, times ``scale`` if given."""
    x = x.reshape(x.shape[0], -1)
    if x.dtype == np.uint8:  # images: torch converts in parallel
        t = torch.from_numpy(np.ascontiguousarray(x)).to(torch.float32)
    else:  # always a fresh array: it is normalised in place
        t = torch.from_numpy(np.array(x, dtype=np.float32, order="C", copy=True))
    if scale is not None:
        t.mul_(scale)
    return t


def _class_counts(y: torch.Tensor, c: int) -> List[int]:
    return torch.bincount(y, minlength=c).tolist() if y.numel() else [0] * c


def _check_finite(name: str, part: str, x: np.ndarray) -> None:
    """ValueError naming the first NaN/inf feature value: one of them would make every normalised value NaN."""
    if np.issubdtype(x.dtype, np.floating) or np.issubdtype(x.dtype, np.complexfloating):
        bad = ~np.isfinite(x.reshape(x.shape[0], -1)) if x.size else np.zeros((0, 0), dtype=bool)
        if bad.any():
            r, c = np.argwhere(bad)[0]
            raise ValueError(f"{name}: {int(bad.sum())} non-finite feature value(s) (NaN/inf) in the {part} data, "
                             f"first at sample {r}, feature {c}")


def assemble(name: str, *, x_trainval: np.ndarray, y_trainval: np.ndarray, x_test: np.ndarray,
              y_test: np.ndarray, n_classes: int, input_shape: Tuple[int, ...], image: bool,
              classes: Sequence[Any], val_fraction: float, seed: int, normalize: str,
              info: Dict[str, Any]) -> Dataset:
    """Hold out the validation part, convert, fit the normalisation on the training part, apply it."""
    for part, x in (("training", x_trainval), ("test", x_test)):
        _check_finite(name, part, x)
    tr, va = stratified_split(y_trainval, val_fraction, seed, stream=1)
    scale = 1.0 / 255.0 if image else None
    x_tr = _to_float(x_trainval[tr], scale)
    x_va = _to_float(x_trainval[va], scale) if len(va) else torch.zeros((0, x_tr.shape[1]), dtype=torch.float32)
    x_te = _to_float(x_test, scale) if len(x_test) else torch.zeros((0, x_tr.shape[1]), dtype=torch.float32)
    kind = normalize
    if kind == "auto":
        kind = "global" if image else "feature"
    mean, std, ninfo = _fit_normalization(x_tr, kind)
    if ninfo["kind"] != "none":
        for t in (x_tr, x_va, x_te):
            _apply_normalization(t, mean, std)
    y_tr = torch.from_numpy(np.ascontiguousarray(y_trainval[tr], dtype=np.int64))
    y_va = torch.from_numpy(np.ascontiguousarray(y_trainval[va], dtype=np.int64))
    y_te = torch.from_numpy(np.ascontiguousarray(y_test, dtype=np.int64))
    n_features = int(x_tr.shape[1])
    if math.prod(input_shape) != n_features:
        raise ValueError(f"input_shape {input_shape} does not match the {n_features} features of {name}")
    split_info: Dict[str, Any] = {
        "dataset": name,
        "seed": int(seed),
        "val_fraction": float(val_fraction),
        "n_train": int(y_tr.shape[0]),
        "n_val": int(y_va.shape[0]),
        "n_test": int(y_te.shape[0]),
        "n_features": n_features,
        "n_classes": int(n_classes),
        "stratified": True,
        "val_split": f"stratified, seeded: {val_fraction:g} of the training set",
    }
    split_info.update(info)
    split_info.update({
        "train_class_counts": _class_counts(y_tr, n_classes),
        "val_class_counts": _class_counts(y_va, n_classes),
        "test_class_counts": _class_counts(y_te, n_classes),
        "pixel_scale": "x / 255" if image else None,
        "normalization": ninfo,
    })
    return Dataset(x_train=x_tr, x_val=x_va, x_test=x_te, y_train=y_tr, y_val=y_va, y_test=y_te,
                   n_features=n_features, n_classes=int(n_classes), input_shape=tuple(int(d) for d in input_shape),
                   name=name, split_info=split_info, classes=tuple(classes), mean=mean, std=std)


def _remap_labels(y: np.ndarray) -> Tuple[np.ndarray, Tuple[Any, ...]]:
    values, inv = np.unique(y, return_inverse=True)
    classes = tuple(v.item() if hasattr(v, "item") else v for v in values)
    return inv.reshape(-1).astype(np.int64), classes


def split_all(name: str, x: np.ndarray, y: np.ndarray, *, test_fraction: float, val_fraction: float, seed: int,
               normalize: str, input_shape, info: Dict[str, Any]) -> Dataset:
    """For sets with no fixed split: seeded stratified test split, then the validation split of the rest."""
    test_fraction = check_fraction("test_fraction", test_fraction)
    if x.ndim != 2:
        raise ValueError(f"{name}: features must be a 2-D (samples, features) array, got shape {x.shape}")
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"{name}: {x.shape[0]} samples in X but {y.shape[0]} labels")
    if x.shape[0] == 0 or x.shape[1] == 0:
        raise ValueError(f"{name}: empty data, shape {x.shape}")
    if not np.issubdtype(x.dtype, np.number) or np.issubdtype(x.dtype, np.complexfloating):
        raise ValueError(f"{name}: features must be real numbers, got dtype {x.dtype}")
    yi, classes = _remap_labels(y)
    trv, te = stratified_split(yi, test_fraction, seed, stream=0)
    if input_shape is None:
        input_shape = (x.shape[1],)
    info = dict(info, test_fraction=test_fraction,
                test_split=f"stratified, seeded: {test_fraction:g} of all samples (no fixed split)")
    return assemble(name, x_trainval=x[trv], y_trainval=yi[trv], x_test=x[te], y_test=yi[te],
                     n_classes=len(classes), input_shape=tuple(input_shape), image=False, classes=classes,
                     val_fraction=val_fraction, seed=seed, normalize=normalize, info=info)
