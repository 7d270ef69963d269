"""The applications built on the library: ready MLPs of the methods (:mod:`.models`), the training command
(:mod:`.train`), dataset readers (:mod:`.data`), the end-to-end comparison (:mod:`.e2e`), the kernel benchmark
(:mod:`.bench_kernels`) and the command line (:mod:`.cli`).

Nothing in the library (``sparsecore.pattern``, ``ops``, ``nn``, ``topology``, ``dst``) imports from here.
"""
