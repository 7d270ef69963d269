""":func:`load_dataset`, the one entry point: a name or path in, a split and normalised :class:`Dataset` out."""
from __future__ import annotations

import os
from typing import Optional, Sequence, Union

from .builtin import load_builtin
from .csv_file import load_csv
from .dataset import Dataset, check_fraction
from .folders import PathLike
from .idx import load_idx_dataset
from .mat import load_mat

__all__ = ["load_dataset"]

_NORMALIZE = ("auto", "global", "feature", "minmax", "none")


def load_dataset(name: Union[str, PathLike], data_dir: Optional[PathLike] = None, *, val_fraction: float = 0.1,
                 seed: int = 0, test_fraction: float = 0.2, normalize: Union[str, bool] = "auto",
                 input_shape: Optional[Sequence[int]] = None, label_column: Union[int, str] = -1,
                 delimiter: str = ",", header: Optional[bool] = None, x_key: str = "X",
                 y_key: str = "Y") -> Dataset:
    """Load, split and normalise a dataset (see the module docstring for names, folders, splits).

    Args:
        name: ``"mnist"``, ``"fashion-mnist"``, ``"builtin"``, ``"mat:<path or name>"``, ``"csv:<path>"``, or a
            path ending in ``.mat`` / ``.csv``.
        data_dir: folder with the files (``None``: :func:`default_data_dirs`). Unused for ``"builtin"``.
        val_fraction: fraction of the training set held out for validation, seeded and stratified; 0 gives
            empty validation tensors.
        seed: seed of every split.
        test_fraction: for ``.mat`` and CSV (no fixed split): fraction of all samples used as the test set.
        normalize: ``"auto"`` (images: ``"global"``, tabular: ``"feature"``), ``"global"``, ``"feature"``, ``"minmax"``,
            ``"none"``; ``True``/``False`` mean ``"auto"``/``"none"``. Fitted on the training part only.
        input_shape: for ``.mat``/CSV, the layout of the features (e.g. ``(32, 32, 1)`` for COIL20), used by
            the topographic input layer; default ``(n_features,)``.
        label_column, delimiter, header: CSV only (see the module docstring).
        x_key, y_key: ``.mat`` only: the variable names of features and labels.
    """
    if normalize is True:
        normalize = "auto"
    elif normalize is False:
        normalize = "none"
    if normalize not in _NORMALIZE:
        raise ValueError(f"normalize must be one of {_NORMALIZE} or a bool, got {normalize!r}")
    val_fraction = check_fraction("val_fraction", val_fraction)
    seed = int(seed)
    spec = os.fspath(name)
    key = spec.strip().lower().replace("_", "-")
    common = dict(val_fraction=val_fraction, seed=seed, normalize=normalize)
    if key in ("builtin", "shapes16"):
        return load_builtin(**common)
    if key == "mnist":
        return load_idx_dataset("mnist", data_dir, **common)
    if key in ("fashion-mnist", "fashionmnist", "fmnist"):
        return load_idx_dataset("fashion-mnist", data_dir, **common)
    tab = dict(common, test_fraction=test_fraction, input_shape=input_shape)
    kind = key[:3] if key[:4] in ("mat:", "csv:") else key[-3:] if key[-4:] in (".mat", ".csv") else None
    rest = spec.strip()[4:] if key[:4] in ("mat:", "csv:") else spec
    if kind == "mat":
        return load_mat(rest, data_dir, x_key=x_key, y_key=y_key, **tab)
    if kind == "csv":
        return load_csv(rest, data_dir, label_column=label_column, delimiter=delimiter, header=header, **tab)
    raise ValueError(f"unknown dataset {spec!r}: expected 'mnist', 'fashion-mnist', 'builtin', 'mat:<path or name>', "
                     f"'csv:<path>', or a path ending in .mat or .csv")
