"""sparsecore: true sparse kernels for training neural networks on CPU (C++) and GPU (Triton).

    import sparsecore
    layer = sparsecore.SparseLinear(784, 1000, density=0.1)      # drop-in for nn.Linear
    model = sparsecore.sparsify(model, density=0.1)              # swap every nn.Linear
"""
from .backend import apply_isa_cap_from_env, get_backend, set_backend, use_backend
from .attention import SparseMultiheadAttention
from .chain import SparseSequential
from .nn import SparseLinear, reset_optimizer_state, sparsify
from .ops import feature_major, sparse_linear
from .pattern import Pattern

__version__ = "0.1.0"

apply_isa_cap_from_env()
__all__ = ["Pattern", "SparseLinear", "SparseMultiheadAttention", "SparseSequential", "sparsify", "sparse_linear", "feature_major", "reset_optimizer_state",
           "use_backend", "get_backend", "set_backend"]
