"""``sparsecore lm``: a character-level GPT whose projections are SparseLinear, trained dense, static, SET or RigL.

    sparsecore lm --data input.txt --method rigl --density 0.1 --steps 300 --json rigl.json

Modules: :mod:`.data` (vocabulary, split, windows), :mod:`.model` (the GPT and its per-projection densities),
:mod:`.train` (the loop, checkpoints, report), :mod:`.cli` (the command line). See docs/LM.md.
"""
from .cli import main
from .model import GPT, layer_densities, projection_shapes
from .train import LMConfig, train_lm

__all__ = ["main", "GPT", "LMConfig", "train_lm", "layer_densities", "projection_shapes"]
