"""Dataset readers: IDX (MNIST / Fashion-MNIST), scikit-feature ``.mat``, CSV, and a small built-in set.

Nothing is downloaded: every reader takes files from a path. The one entry point is :func:`load_dataset`,
which returns a :class:`Dataset` of float32 feature tensors ``(n, features)`` and int64 labels ``0..C-1``,
already split into train / validation / test and normalised.

Names understood by :func:`load_dataset`
----------------------------------------
``"mnist"``, ``"fashion-mnist"``
    The four standard IDX files ``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``,
    ``t10k-images-idx3-ubyte``, ``t10k-labels-idx1-ubyte`` (each raw or gzip-compressed: compression is
    detected from the bytes, a ``.gz`` name is optional) in ``data_dir`` or in its sub-folder
    ``fashion-mnist`` / ``mnist`` (other spellings: see ``_IDX_SUBDIRS``). The standard split is kept:
    60,000 training images (of which ``val_fraction`` are held out) and 10,000 test images.
    ``input_shape = (28, 28, 1)``.
``"mat:<path or name>"`` or a path ending in ``.mat``
    A scikit-feature MATLAB file with keys ``X`` (samples x features) and ``Y`` (labels, any values; they are
    remapped to ``0..C-1`` in sorted order, the original values kept in ``Dataset.classes``). A bare name
    (``"mat:Isolet"``) is looked up, case-insensitively and with or without ``.mat``, in the data folders and
    their ``scikit-feature`` sub-folder. These sets have no fixed split: the test set is a seeded stratified
    ``test_fraction`` (default 0.2) of all samples, then the validation set a seeded stratified
    ``val_fraction`` of the rest. ``input_shape = (features,)`` unless given.
``"csv:<path>"`` or a path ending in ``.csv``
    One sample per line, comma-separated (``delimiter``), numeric features, the label in the *last* column by
    default (``label_column``: an index, negative counts from the end, or a header name). An optional first
    header line is detected automatically (it is a header if any of its feature fields is not a number) or
    forced with ``header=True/False``. Labels may be numbers or strings; they are remapped to ``0..C-1`` in
    sorted order (numerically if all are numbers). Empty lines are skipped; a missing or non-numeric feature
    is an error naming the line. Split as for ``.mat``.
``"builtin"`` (also ``"shapes16"``)
    The bundled set in ``sparsecore/_data/shapes16.npz``, no ``data_dir`` needed: see :func:`make_builtin`.

Data folders
------------
With ``data_dir=None`` the readers search, in order: the folders in the environment variable
``SPARSECORE_DATA`` (``os.pathsep``-separated), ``./data``, and ``shared/data`` beside the source checkout
(the development layout: ``<repo>/../shared/data``). A missing file raises ``FileNotFoundError`` naming
every folder searched and the file names expected there.

Splits and normalisation
------------------------
Every split is stratified (class proportions kept, per-class counts by largest remainders so the total is
exactly ``round(fraction * n)``) and seeded: the same ``seed`` gives the same split on any machine, since only
``numpy.random.Generator(PCG64).random`` is drawn (a stable bit stream). Within each part samples keep the file
order; shuffle with :func:`batches`.

Images (IDX and built-in) are first scaled to ``[0, 1]`` (pixel / 255). Then ``normalize``:

* ``"auto"`` (default): ``"global"`` for images, ``"feature"`` for tabular data (``.mat``, CSV);
* ``"global"``: one mean and one standard deviation over all training values (keeps the relative contrast of
  pixels, and a blank border stays constant rather than being blown up to unit variance);
* ``"feature"``: per-feature mean and standard deviation; a constant feature (std below
  ``1e-7 * (1 + |mean|)``) gets std 1, so it becomes exactly 0, never NaN;
* ``"minmax"``: per feature to ``[0, 1]`` by the training part's minimum and maximum (a constant feature becomes 0;
  validation and test values may fall outside ``[0, 1]``), CTRE's reference scaling;
* ``"none"``: leave the values as they are (images still in ``[0, 1]``).

The statistics are fitted on the *training part only* (after the validation hold-out) and applied unchanged
to validation and test. They are kept in ``Dataset.mean`` / ``Dataset.std`` (``(n_features,)`` tensors):
``x = (x_raw - mean) / std``.

Modules: :mod:`.load` (:func:`load_dataset`), one reader per format (:mod:`.idx`, :mod:`.mat`, :mod:`.csv_file`,
:mod:`.builtin`), :mod:`.dataset` (the :class:`Dataset`, splits, normalisation), :mod:`.folders` (where files are
looked for) and :mod:`.batches`.
"""
from .batches import batches
from .builtin import BUILTIN_CLASSES, BUILTIN_PATH, make_builtin, write_builtin
from .dataset import Dataset, stratified_split
from .folders import default_data_dirs
from .idx import _IDX_FILES, FASHION_MNIST_CLASSES, read_idx, write_idx  # noqa: F401 (_IDX_FILES: tests)
from .load import load_dataset

__all__ = ["Dataset", "load_dataset", "read_idx", "write_idx", "stratified_split", "batches", "make_builtin",
           "write_builtin", "default_data_dirs", "BUILTIN_PATH", "BUILTIN_CLASSES", "FASHION_MNIST_CLASSES"]
