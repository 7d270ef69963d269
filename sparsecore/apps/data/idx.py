"""The IDX format (MNIST, Fashion-MNIST): :func:`read_idx`, :func:`write_idx`, and the reader of the four standard
files."""
from __future__ import annotations

import gzip
import math
import zlib
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np

from .dataset import Dataset, assemble
from .folders import PathLike, search_dirs

__all__ = ["read_idx", "write_idx", "load_idx_dataset", "FASHION_MNIST_CLASSES"]

FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")

# IDX dtype code -> (numpy dtype as stored: big-endian, name)
_IDX_DTYPES = {
    0x08: (np.dtype("u1"), "unsigned byte"),
    0x09: (np.dtype("i1"), "signed byte"),
    0x0B: (np.dtype(">i2"), "short (int16)"),
    0x0C: (np.dtype(">i4"), "int (int32)"),
    0x0D: (np.dtype(">f4"), "float (float32)"),
    0x0E: (np.dtype(">f8"), "double (float64)"),
}
_IDX_CODES = {np.dtype(v[0]).newbyteorder("=").str: k for k, v in _IDX_DTYPES.items()}
_GZIP_MAGIC = b"\x1f\x8b"


def _read_maybe_gzip(path: Path) -> bytes:
    """The file's bytes, gunzipped if they start with the gzip magic (whatever the file is called)."""
    if not path.exists():
        raise FileNotFoundError(f"file not found: {path}")
    if not path.is_file():
        raise ValueError(f"{path}: not a regular file")
    raw = path.read_bytes()
    if raw[:2] == _GZIP_MAGIC:
        try:
            return gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as e:  # BadGzipFile is an OSError
            raise ValueError(f"{path}: corrupt or truncated gzip data ({e})") from e
    return raw


def read_idx(path: PathLike) -> np.ndarray:
    """Read one IDX file (the MNIST format), raw or gzip-compressed (detected from the magic bytes).

    Returns an array of the stored dtype in native byte order (``uint8`` for MNIST), shaped as the header says.
    Raises ``FileNotFoundError`` if the file is missing, and ``ValueError`` naming the file and the problem if
    the gzip stream is corrupt, the magic number or dtype code is wrong, or the data length does not match
    the header (truncated or with trailing bytes).
    """
    path = Path(path)
    data = _read_maybe_gzip(path)
    n = len(data)
    if n < 4:
        raise ValueError(f"{path}: too short for an IDX header ({n} bytes; an IDX file starts with a 4-byte magic "
                         f"number)")
    if data[0] != 0 or data[1] != 0:
        raise ValueError(f"{path}: bad magic number 0x{data[:4].hex()}: not an IDX file (an IDX magic number is "
                         f"two zero bytes, a dtype code and the number of dimensions, e.g. 0x00000803)")
    code, ndim = data[2], data[3]
    if code not in _IDX_DTYPES:
        raise ValueError(f"{path}: unknown IDX dtype code 0x{code:02x} in magic number 0x{data[:4].hex()} "
                         f"(valid: {', '.join(f'0x{c:02x}' for c in _IDX_DTYPES)})")
    if ndim == 0:
        raise ValueError(f"{path}: IDX header declares 0 dimensions")
    header = 4 + 4 * ndim
    if n < header:
        raise ValueError(f"{path}: truncated IDX header: {ndim} dimensions need {header} header bytes, "
                         f"the file has {n}")
    dims = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    dtype, dname = _IDX_DTYPES[code]
    expected = math.prod(dims) * dtype.itemsize
    got = n - header
    if got < expected:
        raise ValueError(f"{path}: truncated IDX file: header says shape {dims} of {dname} = {expected} data bytes, "
                         f"but only {got} follow the header")
    if got > expected:
        raise ValueError(f"{path}: malformed IDX file: header says shape {dims} of {dname} = {expected} data bytes, "
                         f"but {got} follow the header ({got - expected} trailing bytes)")
    arr = np.frombuffer(data, dtype=dtype, count=math.prod(dims), offset=header).reshape(dims)
    return arr.astype(dtype.newbyteorder("="), copy=True)  # native order, writeable


def write_idx(path: PathLike, array, compress: Optional[bool] = None) -> Path:
    """Write ``array`` as an IDX file (the inverse of :func:`read_idx`); gzip it if ``compress`` is true, or,
    with ``compress=None``, if the name ends in ``.gz``. Supported dtypes: uint8, int8, int16, int32,
    float32, float64."""
    path = Path(path)
    a = np.asarray(array)
    key = a.dtype.newbyteorder("=").str
    if key not in _IDX_CODES or a.ndim == 0 or a.ndim > 255:
        raise ValueError(f"cannot write {a.dtype} array of {a.ndim} dimensions as IDX")
    code = _IDX_CODES[key]
    body = (bytes([0, 0, code, a.ndim]) + np.asarray(a.shape, dtype=">u4").tobytes()
            + np.ascontiguousarray(a, dtype=_IDX_DTYPES[code][0]).tobytes())
    if compress is None:
        compress = path.name.endswith(".gz")
    path.write_bytes(gzip.compress(body, compresslevel=6, mtime=0) if compress else body)
    return path


_IDX_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
_IDX_SUBDIRS = {
    "mnist": ("mnist", "MNIST", "MNIST/raw"),
    "fashion-mnist": ("fashion-mnist", "fashion_mnist", "FashionMNIST", "FashionMNIST/raw", "fashionmnist"),
}


def _idx_candidates(folder: Path, stem: str) -> List[Path]:
    alt = stem.replace("-idx", ".idx")  # train-images.idx3-ubyte, as some mirrors spell it
    return [folder / f for s in (stem, alt) for f in (s, s + ".gz")]


def _find_idx_files(kind: str, data_dir: Optional[PathLike]) -> Dict[str, Path]:
    roots, explicit = search_dirs(data_dir)
    folders: List[Path] = []
    for r in roots:
        for f in [r] + [r / s for s in _IDX_SUBDIRS[kind]]:
            if f not in folders:
                folders.append(f)
    partial = []
    for folder in folders:
        if not folder.is_dir():
            continue
        found = {}
        for key, stem in _IDX_FILES.items():
            hit = next((p for p in _idx_candidates(folder, stem) if p.is_file()), None)
            if hit is not None:
                found[key] = hit
        if len(found) == len(_IDX_FILES):
            return found
        if found:
            partial.append((folder, [s for k, s in _IDX_FILES.items() if k not in found]))
    expected = ", ".join(f"{s}[.gz]" for s in _IDX_FILES.values())
    if partial:
        folder, missing = partial[0]
        raise FileNotFoundError(f"{kind}: incomplete IDX files in {folder}: missing {', '.join(missing)} "
                                f"(raw or .gz); expected the four standard files {expected}")
    where = ", ".join(str(f) for f in folders)
    hint = "" if explicit else " (pass data_dir=... or set SPARSECORE_DATA)"
    raise FileNotFoundError(f"{kind}: IDX files not found; expected {expected} in one of: {where}{hint}")


def load_idx_dataset(kind: str, data_dir, *, val_fraction: float, seed: int, normalize: str) -> Dataset:
    files = _find_idx_files(kind, data_dir)
    arrays = {k: read_idx(p) for k, p in files.items()}
    for split in ("train", "test"):
        xi, yi = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        fx, fy = files[f"{split}_images"], files[f"{split}_labels"]
        if xi.ndim not in (3, 4):
            raise ValueError(f"{fx}: expected images of shape (n, H, W) or (n, H, W, C), got {xi.shape}")
        if yi.ndim != 1:
            raise ValueError(f"{fy}: expected labels of shape (n,), got {yi.shape}")
        if xi.shape[0] != yi.shape[0]:
            raise ValueError(f"{kind}: {xi.shape[0]} images in {fx} but {yi.shape[0]} labels in {fy}")
        if yi.size and (yi.min() < 0 or not np.issubdtype(yi.dtype, np.integer)):
            raise ValueError(f"{fy}: labels must be non-negative integers")
    tr_x, te_x = arrays["train_images"], arrays["test_images"]
    if tr_x.shape[1:] != te_x.shape[1:]:
        raise ValueError(f"{kind}: training images {tr_x.shape[1:]} and test images {te_x.shape[1:]} differ in shape")
    y_tr = arrays["train_labels"].astype(np.int64)
    y_te = arrays["test_labels"].astype(np.int64)
    n_classes = int(max(y_tr.max(initial=-1), y_te.max(initial=-1)) + 1)
    shape = tr_x.shape[1:] if tr_x.ndim == 4 else tr_x.shape[1:] + (1,)
    scaled = tr_x.dtype == np.uint8
    classes = FASHION_MNIST_CLASSES if kind == "fashion-mnist" and n_classes == 10 else tuple(range(n_classes))
    info = {"test_fraction": None, "test_split": "fixed (standard t10k files)",
            "source": [str(p) for p in files.values()]}
    if not scaled:  # non-uint8 IDX images: leave the values as stored
        return assemble(kind, x_trainval=tr_x.astype(np.float32), y_trainval=y_tr, x_test=te_x.astype(np.float32),
                         y_test=y_te, n_classes=n_classes, input_shape=shape, image=False, classes=classes,
                         val_fraction=val_fraction, seed=seed,
                         normalize="global" if normalize == "auto" else normalize, info=info)
    return assemble(kind, x_trainval=tr_x, y_trainval=y_tr, x_test=te_x, y_test=y_te, n_classes=n_classes,
                     input_shape=shape, image=True, classes=classes, val_fraction=val_fraction, seed=seed,
                     normalize=normalize, info=info)
