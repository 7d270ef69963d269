"""The bundled "shapes16" set (``sparsecore/_data/shapes16.npz``): 16x16 line drawings of ten shapes, so that the
main job and the tests run without any download."""
from __future__ import annotations

from pathlib import Path
from typing import Dict, Optional, Tuple

import numpy as np

from .dataset import Dataset, assemble
from .folders import PathLike

__all__ = ["make_builtin", "write_builtin", "load_builtin", "BUILTIN_PATH", "BUILTIN_CLASSES"]

BUILTIN_CLASSES = ("ring", "disk", "plus", "cross", "square", "triangle", "equals", "bar", "corner", "tee")
BUILTIN_PATH = Path(__file__).resolve().parents[2] / "_data" / "shapes16.npz"

_BUILTIN_SEED = 20240601
_B_H = 16
# Strokes of each class in a local frame whose unit is half the image side: segments (x0, y0, x1, y1).
_B_SEGMENTS = {
    2: [(-0.6, 0, 0.6, 0), (0, -0.6, 0, 0.6)],                                           # plus
    3: [(-0.5, -0.5, 0.5, 0.5), (-0.5, 0.5, 0.5, -0.5)],                                 # cross
    4: [(-0.45, -0.45, 0.45, -0.45), (0.45, -0.45, 0.45, 0.45),
        (0.45, 0.45, -0.45, 0.45), (-0.45, 0.45, -0.45, -0.45)],                          # square
    5: [(-0.55, 0.45, 0.55, 0.45), (0.55, 0.45, 0.0, -0.55), (0.0, -0.55, -0.55, 0.45)],  # triangle
    6: [(-0.55, -0.25, 0.55, -0.25), (-0.55, 0.25, 0.55, 0.25)],                         # equals
    7: [(0, -0.65, 0, 0.65)],                                                            # bar
    8: [(-0.4, -0.55, -0.4, 0.45), (-0.4, 0.45, 0.5, 0.45)],                             # corner (L)
    9: [(-0.55, -0.45, 0.55, -0.45), (0, -0.45, 0, 0.6)],                                # tee
}


def _segdist(px, py, x0, y0, x1, y1):
    dx, dy = x1 - x0, y1 - y0
    t = np.clip(((px - x0) * dx + (py - y0) * dy) / (dx * dx + dy * dy), 0.0, 1.0)
    return np.hypot(px - x0 - t * dx, py - y0 - t * dy)


def _render_shapes(rng: np.random.Generator, n: int) -> Tuple[np.ndarray, np.ndarray]:
    """``n`` images of the built-in set (balanced classes, random order). Draws only ``rng.random``."""
    def uni(lo, hi, size=None):
        return lo + (hi - lo) * rng.random(n if size is None else size)

    y = (np.arange(n) % 10)[np.argsort(rng.random(n), kind="stable")]
    c = (np.arange(_B_H) + 0.5) / _B_H * 2 - 1
    gx, gy = np.meshgrid(c, c)  # gx: column position, gy: row position, both in [-1, 1]
    theta = np.deg2rad(uni(-25, 25))
    scale = uni(0.65, 1.15)
    tx, ty = uni(-0.3, 0.3), uni(-0.3, 0.3)
    width = uni(1.0, 2.0)       # stroke width in pixels
    amp = uni(0.55, 1.0)        # stroke brightness
    ct, st = np.cos(theta)[:, None, None], np.sin(theta)[:, None, None]
    X, Y = gx[None] - tx[:, None, None], gy[None] - ty[:, None, None]
    lx = (ct * X + st * Y) / scale[:, None, None]
    ly = (-st * X + ct * Y) / scale[:, None, None]
    d = np.full((n, _B_H, _B_H), np.inf)
    for k, segs in _B_SEGMENTS.items():
        m = y == k
        for s in segs:
            d[m] = np.minimum(d[m], _segdist(lx[m], ly[m], *s))
    r = np.hypot(lx, ly)
    m = y == 0
    d[m] = np.abs(r[m] - 0.5)               # ring
    m = y == 1
    d[m] = np.maximum(r[m] - 0.42, 0.0)     # filled disk
    dpx = d * (_B_H / 2) * scale[:, None, None]
    img = np.clip(0.5 * width[:, None, None] - dpx + 0.5, 0.0, 1.0) * amp[:, None, None]  # anti-aliased strokes
    # a distractor stroke in 60% of the images
    has = rng.random(n) < 0.6
    a, b, ang, ln = uni(-1, 1), uni(-1, 1), uni(0, np.pi), uni(0.2, 0.6)
    x0, x1 = a - ln * np.cos(ang), a + ln * np.cos(ang)
    y0, y1 = b - ln * np.sin(ang), b + ln * np.sin(ang)
    dd = _segdist(gx[None], gy[None], *(v[:, None, None] for v in (x0, y0, x1, y1))) * (_B_H / 2)
    img = np.maximum(img, np.clip(1.0 - dd, 0.0, 1.0) * (uni(0.3, 0.8) * has)[:, None, None])
    # Gaussian noise (Box-Muller from uniforms) of per-image strength, a dark offset, 16 grey levels
    u1, u2 = rng.random((n, _B_H, _B_H)), rng.random((n, _B_H, _B_H))
    noise = np.sqrt(-2.0 * np.log1p(-u1)) * np.cos(2 * np.pi * u2)
    img = np.clip(img + 0.25 * uni(0.5, 1.0)[:, None, None] * noise - 0.2, 0.0, 1.0)
    return (np.round(img * 15) * 17).astype(np.uint8), y.astype(np.uint8)


def make_builtin(n_train: int = 4000, n_test: int = 1000, seed: int = _BUILTIN_SEED) -> Dict[str, np.ndarray]:
    """Generate the built-in "shapes16" set (deterministic for a seed).

    Ten classes of 16x16 grayscale line drawings (:data:`BUILTIN_CLASSES`: ring, disk, plus, cross, square,
    triangle, equals, bar, corner, tee), each randomly rotated (+-25 deg), scaled (0.65-1.15), shifted
    (+-2.4 px), with random stroke width and brightness, a random distractor stroke in 60% of the images and
    Gaussian pixel noise, quantised to 16 grey levels (uint8 multiples of 17). Classes are balanced. Measured
    on the bundled file (seed 0 split, Adam 1e-3, batch 64, 30 epochs): a 256-256 ReLU MLP reaches about 79%
    test accuracy, a 100-100 MLP about 76%, logistic regression about 51% (chance 10%), while every MLP fits
    the training set: learnable, not trivial, and with room between models.

    Returns ``x_train (n_train, 16, 16) uint8``, ``y_train (n_train,) uint8``, ``x_test``, ``y_test``.
    Only ``Generator.random`` (a stable PCG64 stream) is drawn, so the NumPy version does not change it;
    the tests check that the regenerated arrays match the bundled file.
    """
    rng = np.random.Generator(np.random.PCG64(seed))
    x_tr, y_tr = _render_shapes(rng, n_train)
    x_te, y_te = _render_shapes(rng, n_test)
    return {"x_train": x_tr, "y_train": y_tr, "x_test": x_te, "y_test": y_te}


def write_builtin(path: Optional[PathLike] = None, **kw) -> Path:
    """Regenerate the built-in set with :func:`make_builtin` and save it (compressed .npz) to ``path``
    (default: the bundled :data:`BUILTIN_PATH`)."""
    path = Path(path) if path is not None else BUILTIN_PATH
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = make_builtin(**kw)
    with open(path, "wb") as f:
        np.savez_compressed(f, **arrays, class_names=np.array(BUILTIN_CLASSES))
    return path


def load_builtin(*, val_fraction: float, seed: int, normalize: str) -> Dataset:
    if not BUILTIN_PATH.is_file():
        raise FileNotFoundError(f"built-in dataset missing: {BUILTIN_PATH} (regenerate it with "
                                f"`python -m sparsecore.apps.data make-builtin`)")
    with np.load(BUILTIN_PATH, allow_pickle=False) as z:
        arrays = {k: z[k] for k in ("x_train", "y_train", "x_test", "y_test")}
    return assemble("builtin", x_trainval=arrays["x_train"], y_trainval=arrays["y_train"].astype(np.int64),
                     x_test=arrays["x_test"], y_test=arrays["y_test"].astype(np.int64), n_classes=10,
                     input_shape=(_B_H, _B_H, 1), image=True, classes=BUILTIN_CLASSES,
                     val_fraction=val_fraction, seed=seed, normalize=normalize,
                     info={"test_fraction": None, "test_split": "fixed (bundled train/test)",
                           "source": [str(BUILTIN_PATH)]})
