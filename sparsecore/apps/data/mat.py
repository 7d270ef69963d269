"""scikit-feature MATLAB ``.mat`` files (keys ``X`` and ``Y``), split by a seeded stratified test split."""
from __future__ import annotations

import numpy as np

from .dataset import Dataset, split_all
from .folders import find_file

__all__ = ["load_mat"]


def load_mat(spec: str, data_dir, *, x_key: str, y_key: str, **kw) -> Dataset:
    path = find_file(spec, data_dir, ".mat", ("scikit-feature",), ".mat")
    try:
        import scipy.io
        import scipy.sparse
    except ImportError as e:  # pragma: no cover
        raise ImportError("reading .mat files needs scipy (pip install 'sparsecore[data]')") from e
    try:
        d = scipy.io.loadmat(str(path))
    except NotImplementedError as e:
        raise ValueError(f"{path}: MATLAB v7.3 (HDF5) files are not supported; re-save with -v7 ({e})") from e
    except Exception as e:  # scipy raises many kinds for a corrupt file
        raise ValueError(f"{path}: cannot read as a MATLAB .mat file ({type(e).__name__}: {e})") from e
    keys = [k for k in d if not k.startswith("__")]
    for k in (x_key, y_key):
        if k not in d:
            raise ValueError(f"{path}: no variable {k!r} (found: {', '.join(keys) or 'none'}); "
                             f"the scikit-feature format has X (samples x features) and Y (labels)")
    x = d[x_key]
    if scipy.sparse.issparse(x):
        x = x.toarray()
    x = np.asarray(x)
    y = np.asarray(d[y_key])
    if y.dtype == object:
        y = np.array([str(np.squeeze(v)) for v in y.ravel()])
    if y.ndim == 2 and 1 not in y.shape:
        raise ValueError(f"{path}: {y_key} must be a vector of labels, got shape {y.shape}")
    y = y.ravel()
    name = f"mat:{path.stem}"
    return split_all(name, x, y, info={"source": [str(path)]}, **kw)
