"""The seed papers' comparison protocols for ``sparsecore bench e2e --protocol NAME``, as data.

A protocol is the shared settings under which a paper compared its method with its baselines, and the rows
(methods with their options) it compared. ``sparsecore bench e2e --protocol ctre`` trains every row under those
settings; any option the user gives explicitly on the command line (``--epochs``, ``--lr``, ``--normalize``, ...)
overrides the protocol's value, and ``--methods`` selects rows by label. See docs/REPRODUCTION.md for where every
value comes from and how the results compare with the papers' claims.

Each entry of :data:`PROTOCOLS`:

* ``paper``, ``claim``, ``source``: what is being reproduced and where the settings come from;
* ``settings``: :class:`~sparsecore.apps.train.TrainConfig` fields shared by every row (``normalize`` may be a dict
  ``{dataset: kind, "default": kind}``: the reference scales madelon by standardisation and the others by MinMax);
* ``model_options``: model options shared by every row (a row's own win);
* ``rows``: ``{"label", "method", "epsilon", "density", "model_options", "dst_options"}`` (as ``--run``); the
  dense MLP is always trained too (as ``bench e2e`` does), with the shared settings;
* ``notes``: the values that are ours, where the paper gives none.
"""
from __future__ import annotations

import copy
from typing import Any, Dict, List

__all__ = ["PROTOCOLS", "protocol", "resolve", "protocol_names"]

# CTRE (Atashgahi et al., Machine Learning 2022), from the authors' code github.com/zahraatashgahi/CTRE:
# code/utils.py (flags, data scaling), code/model_utils.py (network, optimizer, ER counts), code/main.py (schedule,
# whole-training-set cosine), code/sparse_optimizers.py (prune/regrow rules), run.sbatch (the command line).
_CTRE_SPARSE = {"zeta": 0.2, "regrow_pruned": "keep"}
PROTOCOLS: Dict[str, Dict[str, Any]] = {
    "ctre": {
        "paper": "CTRE: A brain-inspired algorithm for training highly sparse neural networks (Atashgahi et al. 2022)",
        "claim": "at extreme sparsity (epsilon 1, ~0.2% density, 3 x 1000 hidden) CTRE beats SET and RigL by a "
                 "large margin",
        "source": "github.com/zahraatashgahi/CTRE (run.sbatch, code/utils.py, code/model_utils.py, code/main.py, "
                  "code/sparse_optimizers.py)",
        "settings": {
            "hidden": (1000, 1000, 1000), "batch_size": 100, "lr": 0.01, "momentum": 0.9, "nesterov": True,
            "weight_decay": 1e-4, "decay_biases": False,        # l2_regularizer(1e-4) on the kernels only
            "shuffle": False, "drop_last": True,                # tf.data without shuffle; num_batches = n // 100
            "val_fraction": 0.1, "epochs": 500,                  # run.sbatch --epochs 500 (lr drop at 500: none)
            "normalize": {"default": "minmax", "mat:madelon": "feature"},   # utils.load_data: madelon standardised
        },
        "model_options": {"init": "glorot"},  # TF glorot_uniform kernels (masked), zero biases
        "rows": [
            # ctre_sim is run.sbatch's --train_alg; regrown weights U(+-sqrt(6/in)) (grow_init random_uniform)
            {"label": "ctre", "method": "ctre", "epsilon": 1.0,
             "dst_options": dict(_CTRE_SPARSE, variant="ctre_sim", stats="full", init="kaiming_uniform")},
            # SET with the same grow_init as CTRE (define_flags: every method but rigl gets --weight_init)
            {"label": "set", "method": "set", "epsilon": 1.0,
             "dst_options": dict(_CTRE_SPARSE, init="kaiming_uniform")},
            # RigL: grow_init zeros, constant drop fraction, mask update every num_batches steps to the end
            {"label": "rigl", "method": "rigl", "epsilon": 1.0,
             "dst_options": dict(_CTRE_SPARSE, init="zero", per_epoch=True, anneal=False, stop_fraction=1.0)},
            {"label": "static", "method": "static", "epsilon": 1.0},
        ],
        "notes": [
            "our splits are seeded stratified splits (mat: 20% test), the reference's fixed ones (madelon: UCI "
            "train/valid; Isolet: the 7797-sample UCI set, ours the 1560-sample scikit-feature subset)",
            "scaling is fitted on the training part after the validation split (the reference: before it)",
            "baselines SNFS, SNIP and GMP of the reference are not run (not in sparsecore, or not comparable: GMP "
            "starts dense)",
            "prune counts are rounded (reference: floored): at most one connection per layer and update",
            "the reference's first topology update after step 1 with all-zero cosine scores is not reproduced",
        ],
    },
    # G2GNet: published facts only (docs/METHODS.md); the optimiser settings are sparsecore's defaults.
    "g2g": {
        "paper": "G2GNet: ensemble-to-ensemble connectivity (seed paper)",
        "claim": "up to 75% sparsity while improving accuracy by up to 4.3% over dense (Fashion-MNIST, CIFAR)",
        "source": "the paper's published facts (docs/METHODS.md); no reference code available to us",
        "settings": {"hidden": (1000, 1000, 1000), "batch_size": 100, "lr": 0.05, "momentum": 0.9,
                     "nesterov": True, "weight_decay": 1e-4, "val_fraction": 0.1, "epochs": 20},
        "model_options": {},
        "rows": [
            {"label": "g2g", "method": "g2g", "model_options": {"groups": 4, "links": 1}},     # 75% sparsity
            {"label": "g2g-static", "method": "g2g", "model_options": {"groups": 4, "links": 1},
             "dst_options": {"zeta": 0.0}},   # the ensemble topology without the Hebbian rewiring
        ],
        "notes": ["lr, momentum, weight decay, widths and epochs are ours (the paper's were not available)"],
    },
    # TSM / ETSM: published facts only; every sparse row at the same overall density (equal parameter counts).
    "tsm": {
        "paper": "TSM / ETSM: topographical sparse mapping (seed paper)",
        "claim": "beats several sparse training methods, with faster convergence than unstructured pruning",
        "source": "the paper's published facts (docs/METHODS.md); no reference code available to us",
        "settings": {"hidden": (1000, 1000, 1000), "batch_size": 100, "lr": 0.05, "momentum": 0.9,
                     "nesterov": True, "weight_decay": 1e-4, "val_fraction": 0.1, "epochs": 10},
        "model_options": {},
        "rows": [
            {"label": "tsm", "method": "tsm"},                                   # deep layers dense (the paper)
            {"label": "tsm-er", "method": "tsm", "epsilon": 20.0},               # deep layers ER(20), like SET's
            {"label": "etsm", "method": "etsm", "density": 0.1},
            {"label": "set", "method": "set", "density": 0.1},
            {"label": "rigl", "method": "rigl", "density": 0.1},
        ],
        "notes": ["etsm, set and rigl at overall density 0.1 (equal parameter counts); tsm-er at SET's ER(20) "
                  "deep layers; tsm with dense deep layers as the paper's TSM; optimiser settings ours"],
    },
}


def protocol_names() -> List[str]:
    return sorted(PROTOCOLS)


def protocol(name: str) -> Dict[str, Any]:
    """A deep copy of protocol ``name`` (ValueError naming the known ones otherwise)."""
    if name not in PROTOCOLS:
        raise ValueError(f"unknown protocol {name!r}: expected one of {', '.join(protocol_names())}")
    return copy.deepcopy(PROTOCOLS[name])


def _normalize_for(spec, dataset: str) -> str:
    if isinstance(spec, dict):
        return spec.get(str(dataset).lower(), spec.get(str(dataset), spec["default"]))
    return spec


def resolve(name: str, dataset: str, explicit: Dict[str, Any], methods=None) -> Dict[str, Any]:
    """The settings and rows of protocol ``name`` on ``dataset``.

    ``explicit``: TrainConfig fields the user gave explicitly (they win over the protocol's). ``methods``: row labels
    to keep (None: all; ``"dense"`` is always run). Returns ``{"settings", "rows", "overridden", "protocol"}``:
    ``settings`` are TrainConfig fields (shared ``model_options`` included), ``rows`` are ``--run`` specs with the
    shared model options merged in, ``overridden`` lists the protocol values the user replaced.
    """
    p = protocol(name)
    settings = dict(p["settings"])
    settings["normalize"] = _normalize_for(settings.get("normalize", "auto"), dataset)
    overridden = sorted(k for k in explicit if k in settings and explicit[k] != settings[k])
    settings.update(explicit)
    rows = []
    for r in p["rows"]:
        row = {"label": r["label"], "method": r["method"], "epsilon": r.get("epsilon"), "density": r.get("density"),
               "model_options": dict(p["model_options"], **r.get("model_options", {})),
               "dst_options": dict(r.get("dst_options", {}))}
        rows.append(row)
    if methods is not None:
        labels = [r["label"] for r in rows]
        bad = [m for m in methods if m not in labels and m != "dense"]
        if bad:
            raise ValueError(f"protocol {name!r} has no row(s) {', '.join(bad)}: its rows are {', '.join(labels)} "
                             f"(and dense)")
        rows = [r for r in rows if r["label"] in methods]
    settings["model_options"] = dict(p["model_options"])   # the dense row's (the shared ones)
    return {"settings": settings, "rows": rows, "overridden": overridden,
            "protocol": {k: p[k] for k in ("paper", "claim", "source", "notes")} | {"name": name}}
