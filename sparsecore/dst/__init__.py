"""Dynamic sparse training: topology updates of :class:`~sparsecore.nn.SparseLinear` layers during training.

:class:`Updater` runs the methods of docs/METHODS.md (``static``, ``set``, ``rigl``, ``ctre`` and its variants,
``g2g``, ``gmp``/``etsm``) on a model and its optimizer. The building blocks are public too:

* :mod:`sparsecore.dst.edit`: magnitude pruning, random / top-k regrowth, the merge into a new pattern and the
  remap of values and optimizer state by one gather (O(nnz), C++ in ``csrc/dst.cpp``);
* :mod:`sparsecore.dst.scores`: RigL's dense gradient, CTRE's cosine and G2G's correlation, in chunks of rows,
  and the bounded-memory activation statistics;
* :mod:`sparsecore.dst.schedule`: RigL's cosine decay and the cubic gradual-pruning schedule;
* :mod:`sparsecore.dst.distributed`: one topology on every rank under ``torch.distributed`` (reductions of the
  scores' statistics, checksums, DDP's reducer after nnz changes, the pattern buffers out of DDP's broadcast).
"""
from . import distributed, edit, schedule, scores
from .distributed import DivergenceError
from .edit import apply_edit, derive_seed, merge, prune_keep, random_absent, remap_state, replace_values
from .schedule import cubic_sparsity, rigl_fraction
from .scores import ActivationStats, dense_grad_chunks, similarity_chunks
from .updater import METHODS, Updater

__all__ = [
    "Updater", "METHODS", "edit", "scores", "schedule", "distributed", "DivergenceError",
    "apply_edit", "derive_seed", "merge", "prune_keep", "random_absent", "remap_state", "replace_values",
    "cubic_sparsity", "rigl_fraction", "ActivationStats", "dense_grad_chunks", "similarity_chunks",
]
