"""``sparsecore train``: train one method's MLP on one dataset, with checkpoints, resume and a JSON report.

    sparsecore train --method set --dataset fashion-mnist --data-dir shared/data --epochs 100 \\
        --hidden 1000,1000,1000 --json set.json --checkpoint ckpt/set [--resume]

Python API: :func:`train` takes a :class:`TrainConfig` (or a dict of its fields) and returns the report dict.

Training: SGD (Nesterov momentum 0.9, lr 0.01, L2 ``weight_decay`` 1e-4, batch 100 by default: CTRE's reference
settings), cross-entropy, the data order drawn from a seeded generator. After every optimizer step the method's
:class:`sparsecore.dst.Updater` (if any, see :func:`sparsecore.apps.models.make_updater`) gets ``step()``; after every
epoch, once validation and test accuracy are measured, it gets ``report_validation(val_accuracy)`` then
``epoch_end()`` (the per-epoch methods rewire there, except after the last epoch), so the model evaluated at an
epoch is the one trained in it, and the final model is the one evaluated last. Validation and test accuracy are
measured after every epoch; the reported ``test_accuracy`` is the one at the
epoch of best validation accuracy (the first such epoch; the last epoch when there is no validation set).

Report (``--json``): ``test_accuracy`` (fraction), ``best_epoch``, ``best_val_accuracy``, ``final_*``,
``epoch_seconds`` (per epoch: the training steps plus the topology update, without evaluation or checkpointing),
``history``, ``nnz``/``dense_params``/``density``/``n_params``/``layers`` (after training), ``nnz_initial``,
``peak_memory_mb`` and ``state_memory_mb`` (see below), the method, every argument, the dataset split, and the
machine (CPU, threads, versions).

Memory: ``peak_memory_mb`` is the peak resident set size (Linux ``VmHWM``) of the process while it trained this
model: the high-water mark is reset (``/proc/self/clear_refs``) after the data is loaded and before the model is
built (free allocator pages are first returned to the OS with glibc's ``malloc_trim``, so memory cached by earlier
work in the same process does not hide this run's), so it covers the model, the training and the data already in
memory, plus the interpreter and libraries.
``peak_memory_delta_mb`` is that peak minus the resident size at the reset: what the model and its training added.
Where the reset is not possible the peak is the process's since it started (``resource.getrusage`` max RSS).
``state_memory_mb`` is exact tensor bytes of the training state: parameters, gradients, optimizer state and
buffers (topology indices included), after training.

Checkpoints (``--checkpoint DIR``): ``DIR/checkpoint.pt`` after every epoch, written atomically (a temporary file in
the same folder, flushed and fsync'ed, then ``os.replace``, then the folder fsync'ed), so a crash at any moment
leaves the previous good checkpoint. It holds the model (values *and* topology buffers), the optimizer, the
updater, the epoch, the best-validation bookkeeping, the history and every RNG state (torch, numpy, python, the
data-order generator). ``--resume`` continues from it to the same result as an uninterrupted run (bit for bit on
CPU with the same thread count); the settings that shape the result must match the checkpoint's. The file is a
pickle: load only checkpoints you wrote.

Data parallelism (``torchrun --nproc-per-node N -m sparsecore train ...`` or ``sparsecore train --nproc N ...``, see
:mod:`.dist` and docs/DISTRIBUTED.md): ``--batch-size`` is the global batch, each rank trains on its contiguous share
of every batch of the seeded order under DDP (gloo), the updater keeps one topology on every rank, accuracies and
losses are over every rank's samples, rank 0 writes the report and the checkpoints, ``--resume`` works on any
number of ranks, and a rank that dies or hangs stops every rank with a one-line error within ``--dist-timeout``.

Modules: :mod:`.config` (the settings), :mod:`.loop` (the loop), :mod:`.checkpoint` (atomic checkpoints and RNG
states), :mod:`.report` (memory and machine records), :mod:`.dist` (process group, ``--nproc`` launcher), :mod:`.cli`
(the command line).
"""
from .checkpoint import CHECKPOINT_NAME, load_checkpoint, save_checkpoint_atomic, write_text_atomic
from .cli import main
from .config import TrainConfig, TrainError
from .loop import train
from .report import machine_info

__all__ = ["TrainConfig", "TrainError", "train", "main", "save_checkpoint_atomic", "load_checkpoint",
           "write_text_atomic", "machine_info", "CHECKPOINT_NAME"]
